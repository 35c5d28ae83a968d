"""One small vocabulary of component-level interventions, realised through nnsight and through TransformerLens.

The circuit probes (`circuits/`, paper_spec §4, §9.2 items 6-9) patch a query head's output, add or project out a
residual direction, ablate a component, read attention patterns and apply the logit lens. Each of those is declared
once here as a frozen dataclass (the auto-circuit habit: a typed vocabulary, no string plumbing), and each backend
turns a list of them into its own mechanism:

* `NNsightBackend`: an nnsight trace over the loaded HF model (the module tree of transformers). `remote=True` runs the
  same trace on NDIF, which is how the paper's 8B-70B models are reached from a laptop; `remote="local"` is nnsight's
  serverless dry run of that path (what the tests use: nothing here may call out).
* `LensBackend`: the TransformerLens 4.x `TransformerBridge` and its hook points.

Sites, with the HF module each means and the TransformerLens hook it equals (checked by tests/test_interventions.py
on the three tiny architectures and on smollm2-135m):

============  ============================================================  =====================================
site          HF / nnsight                                                  TransformerLens bridge
============  ============================================================  =====================================
z             input of `layers[l].self_attn.o_proj`, [S, H*d_head]            `blocks.l.attn.hook_z` [S, H, d_head]
attn_out      what the attention block adds to the residual: `self_attn`      `blocks.l.hook_attn_out`
              output, or `post_attention_layernorm` output where the
              architecture norms it (Gemma-3)
mlp_out       `mlp` output, or `post_feedforward_layernorm` output (Gemma-3)  `blocks.l.hook_mlp_out`
resid_post    output of decoder layer l (= hidden_states[l + 1])            `blocks.l.hook_resid_post`
pattern       attention probabilities, [H, S, S] (eager attention)          `blocks.l.attn.hook_pattern`
k, v          output of `self_attn.k_proj` / `v_proj`, [S, n_kv_heads *        `blocks.l.attn.hook_k` / `hook_v`
              d_head]: before any k-norm and RoPE, which are functions of    (flattened over the KV heads)
              it and the position, so patching k and v at a position sets
              the cached K/V there (`kv_splice` below)
============  ============================================================  =====================================

All positions are absolute indices into the one sequence a run takes (no batch axis: a run is one prompt; batching
many patches per forward is the job of the batched circuit path, not of these reference realisations).

Why hand-written: nnsight and TransformerLens each give the hooks, but neither gives one intervention description
that both execute, which is what lets a test require the two libraries to agree number for number.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

SITES = ("z", "attn_out", "mlp_out", "resid_post", "pattern", "k", "v")
RESID_SITES = ("attn_out", "mlp_out", "resid_post")
PATCH_SITES = (*RESID_SITES, "k", "v")


def _rows(owner: str, name: str, tensor: torch.Tensor, n: int, width: str) -> None:
    """ValueError unless `tensor` is [n, width]: one row per position of the intervention."""
    if tensor.dim() != 2 or tensor.shape[0] != n:
        raise ValueError(f"{owner}.{name} must be [len(positions)={n}, {width}]; got {tuple(tensor.shape)}")


def _positions(positions) -> tuple[int, ...]:
    out = tuple(int(p) for p in positions)
    if not out:
        raise ValueError("an intervention needs at least one position; got none")
    if len(set(out)) != len(out):
        raise ValueError(f"positions repeat: {out}; give each position once")
    return out


@dataclass(frozen=True, eq=False)
class HeadPatch:
    """Set query head `head`'s output z (the attention-weighted values, before W_O) at `positions` of layer `layer`
    to `values` [len(positions), d_head]: head output patching (paper_spec §4.1 step 2 at the decision token, §4.2
    step 1 at an aggregator during prefill). Later positions and layers recompute from the patched residual."""
    layer: int
    head: int
    positions: tuple[int, ...]
    values: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "positions", _positions(self.positions))
        _rows("HeadPatch", "values", self.values, len(self.positions), "d_head")


@dataclass(frozen=True, eq=False)
class Patch:
    """Set a whole component at `positions` of layer `layer` to `values` [len(positions), width]: activation
    patching of `site` "attn_out", "mlp_out" or "resid_post" (width d_model; paper_spec §9.2; for one head use
    HeadPatch), or of the key / value projections "k" / "v" (width n_kv_heads * d_head: a K/V splice, `kv_splice`)."""
    site: str
    layer: int
    positions: tuple[int, ...]
    values: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "positions", _positions(self.positions))
        if self.site not in PATCH_SITES:
            raise ValueError(f"Patch.site must be one of {PATCH_SITES}; got {self.site!r}")
        _rows("Patch", "values", self.values, len(self.positions), "d_model" if self.site in RESID_SITES
              else "n_kv_heads * d_head")


@dataclass(frozen=True, eq=False)
class ResidAdd:
    """Add `vectors` [len(positions), d_model] to the residual stream after decoder layer `layer` (hook_resid_post)
    at `positions` (paper_spec §4.4 step 3, the sufficiency test of a direction; §9.2 item 8)."""
    layer: int
    positions: tuple[int, ...]
    vectors: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "positions", _positions(self.positions))
        _rows("ResidAdd", "vectors", self.vectors, len(self.positions), "d_model")


@dataclass(frozen=True, eq=False)
class ResidProject:
    """Project the unit direction `direction` [d_model] out of the residual after layer `layer` at `positions`:
    r <- r - (r . d) d (paper_spec §4.4 step 5, the necessity test). The direction is normalised here."""
    layer: int
    positions: tuple[int, ...]
    direction: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "positions", _positions(self.positions))
        d = self.direction
        if d.dim() != 1 or not torch.isfinite(d).all() or float(d.norm()) == 0.0:
            raise ValueError(f"ResidProject.direction must be a finite non-zero vector [d_model]; got shape "
                             f"{tuple(d.shape)}")
        object.__setattr__(self, "direction", d / d.norm())


@dataclass(frozen=True, eq=False)
class Ablate:
    """Zero-ablate a component at `positions` of layer `layer`: `site` "attn_out" or "mlp_out" (what the block adds
    to the residual), or "z" with `head` (one query head's output before W_O)."""
    site: str
    layer: int
    positions: tuple[int, ...]
    head: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "positions", _positions(self.positions))
        if self.site not in ("z", "attn_out", "mlp_out"):
            raise ValueError(f"Ablate.site must be 'z', 'attn_out' or 'mlp_out'; got {self.site!r}")
        if (self.site == "z") != (self.head is not None):
            raise ValueError("Ablate: give head= exactly when site='z'")


Intervention = HeadPatch | Patch | ResidAdd | ResidProject | Ablate


def kv_splice(donor: dict, base: dict, n_layers: int, splice: Sequence[int], end: int) -> list[Patch]:
    """A K/V cache splice written as full-forward patches, so that a library backend (nnsight, also remote on NDIF,
    or TransformerLens) computes what `kvnotes.engine.SpliceEngine` computes (paper_spec §3.1 cache-state splice).

    The engine decodes the token at `end` from the base prompt's cache [0, end) with the K/V at `splice` taken from
    the donor's; nothing before `end` is recomputed. In one forward of base ids[:end + 1] that is: at every layer,
    k and v at `splice` from `donor`, and at every later position before `end` the base run's own k and v (held,
    so the recomputed positions cannot carry the splice on; positions before the first spliced one are untouched).
    k / v are the projections before any k-norm and RoPE, which depend only on them and the position, so the
    cached K/V equal the engine's. donor, base: {Capture("k" | "v", layer): [S, n_kv_heads * d_head]} of the donor
    and the base run (the same positions). Returns the Patch list; ValueError when `splice` is empty or not before
    `end`."""
    splice = sorted(int(p) for p in splice)
    if not splice or splice[-1] >= end or splice[0] < 0:
        raise ValueError(f"kv_splice: spliced positions {splice} must be non-empty and lie in [0, end={end})")
    spliced = set(splice)
    pos = list(range(splice[0], end))
    out = []
    for li in range(n_layers):
        for site in ("k", "v"):
            c = Capture(site, li)
            rows = [donor[c][p] if p in spliced else base[c][p] for p in pos]
            out.append(Patch(site, li, pos, torch.stack(rows)))
    return out


@dataclass(frozen=True)
class Capture:
    """Read `site` (one of SITES) of layer `layer` after this run's interventions. Shapes returned (one sequence of
    S tokens): z [S, H, d_head]; attn_out, mlp_out, resid_post [S, d_model]; pattern [H, S, S] (query, key);
    k, v [S, n_kv_heads * d_head]."""
    site: str
    layer: int

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"Capture.site must be one of {SITES}; got {self.site!r}")


@dataclass
class RunResult:
    """logits [S, vocab] (fp32) of the intervened run, and each requested Capture's tensor (fp32, shapes above)."""
    logits: torch.Tensor
    acts: dict[Capture, torch.Tensor] = field(default_factory=dict)


class Backend(Protocol):
    name: str
    n_layers: int
    n_heads: int
    d_head: int

    def run(self, ids: torch.Tensor, interventions: Sequence[Intervention] = (),
            captures: Sequence[Capture] = ()) -> RunResult: ...

    def logit_lens(self, resid: torch.Tensor) -> torch.Tensor: ...


def _check(backend, ids: torch.Tensor, interventions, captures) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty 1-D token tensor; got shape {tuple(ids.shape)}")
    S = ids.numel()
    for iv in interventions:
        if not 0 <= iv.layer < backend.n_layers:
            raise ValueError(f"{type(iv).__name__}: layer {iv.layer} outside [0, {backend.n_layers})")
        if max(iv.positions) >= S or min(iv.positions) < -S:
            raise ValueError(f"{type(iv).__name__}: positions {iv.positions} outside a {S}-token sequence")
        head = getattr(iv, "head", None)
        if head is not None and not 0 <= head < backend.n_heads:
            raise ValueError(f"{type(iv).__name__}: head {head} outside [0, {backend.n_heads})")
    for c in captures:
        if not 0 <= c.layer < backend.n_layers:
            raise ValueError(f"Capture {c.site}: layer {c.layer} outside [0, {backend.n_layers})")
    return ids


def _edit_rows(x: torch.Tensor, iv) -> None:
    """Apply one residual-stream or component intervention in place to x [S, d_model] (or [S, H, d_head] for z)."""
    P = list(iv.positions)
    if isinstance(iv, HeadPatch):
        x[P, iv.head] = iv.values.to(x.dtype)
    elif isinstance(iv, Patch):
        x[P] = iv.values.to(x.dtype)
    elif isinstance(iv, ResidAdd):
        x[P] = x[P] + iv.vectors.to(x.dtype)
    elif isinstance(iv, ResidProject):
        d = iv.direction.to(x.dtype)
        rows = x[P]
        x[P] = rows - (rows @ d)[:, None] * d
    elif isinstance(iv, Ablate):
        if iv.site == "z":
            x[P, iv.head] = 0
        else:
            x[P] = 0
    else:  # pragma: no cover - the dataclasses above are the whole vocabulary
        raise TypeError(f"not an intervention: {iv!r}")


def _site_of(iv) -> str:
    if isinstance(iv, HeadPatch):
        return "z"
    if isinstance(iv, (ResidAdd, ResidProject)):
        return "resid_post"
    return iv.site


# ---------------------------------------------------------------- nnsight
def norms_block_outputs(layer_module) -> bool:
    """True where the decoder layer norms the attention / MLP outputs before adding them (Gemma-2/3)."""
    return hasattr(layer_module, "post_feedforward_layernorm")


class NNsightBackend:
    """The vocabulary through an nnsight trace of a transformers causal LM (paper_spec §9.2 items 6-9).

    `model`: a loaded `transformers` model (wrapped here in nnsight's `TransformersModel`), or an nnsight model already
    built, e.g. `TransformersModel("meta-llama/Llama-3.1-8B", task="text-generation")` for NDIF. `remote`: False runs
    locally; True ships
    each trace to NDIF (an API key in nnsight's config; the model must be one NDIF hosts); "local" is nnsight's
    serverless dry run of the remote path: the trace is serialised exactly as for NDIF, deserialised with this
    project's modules hidden, and run here, so a passing "local" run shows that the request a remote run sends is
    complete (the tests use it; nothing here calls out). Pattern captures run with eager attention (the only
    implementation that returns probabilities); everything else in the model's own.

    Raises ValueError for out-of-range layers, heads or positions (naming them), and for remote=True on a model
    loaded here (NDIF runs only the checkpoints it hosts, named by repo id)."""
    name = "nnsight"

    def __init__(self, model, tokenizer=None, remote: bool | str = False):
        from nnsight import TransformersModel
        from nnsight.intervention.envoy import Envoy
        if isinstance(model, Envoy):
            self.envoy = model
        else:
            if remote is True:
                raise ValueError("remote=True needs an nnsight model named by an NDIF-hosted repo id (NDIF runs its "
                                 "own copy of the weights); got a model loaded here. Build NNsightBackend("
                                 "TransformersModel('meta-llama/Llama-3.1-8B', task='text-generation'), "
                                 "remote=True), or use remote='local' for the serverless dry run")
            self.envoy = TransformersModel(model, tokenizer=tokenizer, task="text-generation")
        self.remote = remote
        hf = self.envoy._module
        cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        self.hf = hf
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.post_norms = norms_block_outputs(hf.model.layers[0])

    def run(self, ids, interventions=(), captures=()) -> RunResult:
        from nnsight import save
        from kvnotes import kv
        ids = _check(self, ids, interventions, captures)
        S, H, dh, post_norms, envoy = ids.numel(), self.n_heads, self.d_head, self.post_norms, self.envoy
        # plain data for the trace body: what to do at each (site, layer); the body below is all a remote run ships
        todo = {}
        for iv in interventions:
            todo.setdefault((_site_of(iv), iv.layer), ([], []))[0].append(iv)
        for c in captures:
            todo.setdefault((c.site, c.layer), ([], []))[1].append(c)
        layers = sorted({li for _, li in todo})
        eager = any(c.site == "pattern" for c in captures)
        kwargs = {"remote": self.remote} if self.remote else {}
        ctx = kv.attention_implementation(self.hf, "eager") if eager else contextlib.nullcontext()
        with ctx, torch.inference_mode(), envoy.trace(ids[None], **kwargs):
            saved = save({})
            for li in layers:
                layer = envoy.model.layers[li]
                for site, proj in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj)):
                    ivs, caps = todo.get((site, li), ((), ()))
                    if ivs or caps:
                        x = proj.output[0]                                       # [S, n_kv_heads * d_head]
                        for iv in ivs:
                            _edit_rows(x, iv)
                        for c in caps:
                            saved[c] = x.clone()
                ivs, caps = todo.get(("z", li), ((), ()))
                if ivs or caps:
                    z = layer.self_attn.o_proj.input[0].view(S, H, dh)
                    for iv in ivs:
                        _edit_rows(z, iv)
                    for c in caps:
                        saved[c] = z.clone()
                ivs, caps = todo.get(("attn_out", li), ((), ()))
                pats = todo.get(("pattern", li), ((), ()))[1]
                if pats or ((ivs or caps) and not post_norms):
                    attn = layer.self_attn.output
                    for c in pats:
                        saved[c] = attn[1][0].clone()
                if ivs or caps:
                    a = (layer.post_attention_layernorm.output if post_norms else attn[0])[0]
                    for iv in ivs:
                        _edit_rows(a, iv)
                    for c in caps:
                        saved[c] = a.clone()
                ivs, caps = todo.get(("mlp_out", li), ((), ()))
                if ivs or caps:
                    m = (layer.post_feedforward_layernorm.output if post_norms else layer.mlp.output)[0]
                    for iv in ivs:
                        _edit_rows(m, iv)
                    for c in caps:
                        saved[c] = m.clone()
                ivs, caps = todo.get(("resid_post", li), ((), ()))
                if ivs or caps:
                    r = layer.output[0]
                    for iv in ivs:
                        _edit_rows(r, iv)
                    for c in caps:
                        saved[c] = r.clone()
            logits = envoy.output.logits[0].save()
        return RunResult(logits.float(), {c: v.float() for c, v in saved.items()})

    def logit_lens(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] of residual-stream vectors resid [..., d_model]: final norm, unembedding, final
        soft-cap (paper_spec §9.2 item 9). At the last layer this is the model's own output (tested)."""
        from kvnotes.engine import unembed
        with torch.inference_mode():
            x = resid.to(self.hf.dtype)
            return unembed(self.hf, self.hf.model.norm(x)).float()


# ---------------------------------------------------------------- TransformerLens
_TL_HOOK = {"z": "blocks.{l}.attn.hook_z", "attn_out": "blocks.{l}.hook_attn_out",
            "mlp_out": "blocks.{l}.hook_mlp_out", "resid_post": "blocks.{l}.hook_resid_post",
            "pattern": "blocks.{l}.attn.hook_pattern", "k": "blocks.{l}.attn.hook_k", "v": "blocks.{l}.attn.hook_v"}
_FLAT = ("k", "v")      # the bridge gives [batch, S, n_kv_heads, d_head]; the vocabulary's k / v are [S, n_kv * d_head]


class LensBackend:
    """The vocabulary through TransformerLens 4.x `TransformerBridge` hook points (paper_spec §9.2, "TL").

    `bridge`: a booted `TransformerBridge` (it switches its HF model to eager attention in place, so give it its own
    model instance). Hooks run in the order added, so captures see the intervened values. Raises ValueError as
    `NNsightBackend` does."""
    name = "transformer_lens"

    def __init__(self, bridge):
        self.bridge = bridge
        cfg = bridge.cfg
        self.n_layers, self.n_heads, self.d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)

    def run(self, ids, interventions=(), captures=()) -> RunResult:
        ids = _check(self, ids, interventions, captures)
        hooks, saved = [], {}
        for iv in interventions:
            def edit(x, hook, iv=iv):
                x = x.clone()
                _edit_rows(x[0].flatten(1) if _site_of(iv) in _FLAT else x[0], iv)
                return x
            hooks.append((_TL_HOOK[_site_of(iv)].format(l=iv.layer), edit))
        for c in captures:
            def keep(x, hook, c=c):
                saved[c] = (x[0].flatten(1) if c.site in _FLAT else x[0]).detach().clone()
            hooks.append((_TL_HOOK[c.site].format(l=c.layer), keep))
        with torch.inference_mode():
            logits = self.bridge.run_with_hooks(ids[None], fwd_hooks=hooks, return_type="logits")
        return RunResult(logits[0].float(), {c: v.float() for c, v in saved.items()})

    def logit_lens(self, resid: torch.Tensor) -> torch.Tensor:
        """As `NNsightBackend.logit_lens`, through the bridge's ln_final and unembed."""
        with torch.inference_mode():
            return self.bridge.unembed(self.bridge.ln_final(resid[None] if resid.dim() == 1 else resid)).float()


def lens_backend(lm) -> LensBackend:
    """A `LensBackend` for a registry model `lm` (kvnotes.models.LoadedModel), on its own fp32 copy of the weights:
    the bridge switches the model it is given to eager attention in place, so it must not get `lm.model`."""
    from transformer_lens.model_bridge import TransformerBridge
    if lm.spec.get("kind") == "tiny":
        from kvnotes.tiny import build_tiny
        model = build_tiny(lm.spec["arch"], seed=int(lm.spec.get("seed", 0)))[0]
    else:
        from transformers import AutoModelForCausalLM
        from kvnotes.models import prepare_cache
        model = AutoModelForCausalLM.from_pretrained(str(prepare_cache(lm.spec)), dtype=torch.float32)
    return LensBackend(TransformerBridge.boot_transformers(lm.spec.get("hf_name") or lm.spec["name"], hf_model=model,
                                                           tokenizer=lm.tokenizer, device="cpu", dtype=torch.float32))
