"""Invariant I11 (paper_spec §9.4): two independent backends agree on the tiny models (fp32).

Backend 1 is kvnotes.kv on the HF model: prefill to a `DynamicCache`, splice K/V, decode the last token.
Backend 2 is TransformerLens 4.3 (`TransformerBridge`), doing the same cache-state splice the §9.2 item 3 way: run the
whole base prompt with hooks on every layer's `hook_k` / `hook_v` that overwrite ALL positions < dpos with stored
tensors (the base run's values, except at the splice positions P, where the source run's values go). Only the decision
position dpos is computed, so nothing the splice leaves alone is recomputed, as in the cache splice.

Which K does the hook carry? In the installed TransformerLens 4.3.0, `blocks.{l}.attn.hook_k` is an alias of
`attn.k.hook_out`: the k_proj output, i.e. PRE-RoPE (and, on Gemma-3, also before `k_norm`); the post-RoPE key is
`hook_rot_k` (see position_embeddings_attention.py: hook_k fires at `self.k(hidden_states)`, hook_rot_k after
`apply_rotary_pos_emb`). The HF cache stores post-RoPE (post-k_norm) keys. For a same-position splice between aligned
prompts this is immaterial: RoPE and k_norm act per position, so overwriting the pre-RoPE K at p with the source's
gives the source's post-RoPE K at p. test_hook_k_is_pre_rope_and_hook_rot_k_is_the_cache pins this down, so a
TransformerLens upgrade that moves the hook shows up there rather than as a mysterious splice mismatch.

The bridge switches the HF model it is given to eager attention in place, so it gets its own instance, built from the
same config and seed (identical weights, checked); the kvnotes backend keeps the registry's model, in its own
attention implementation (sdpa), untouched.

Pair: diverse order_cancel/000 (~130 tokens, one-token field near the end). On tiny-gemma3 the field lies outside the
sliding layer's window of the decision token (only the full-attention layer sees it) while the mid downstream position
lies inside it, so both the skipped and the applied sliding-window case are compared.
"""
from __future__ import annotations

import functools

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from kvnotes import kv
from kvnotes.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-4          # fp32 agreement between the two backends (observed: <= 3e-7)
MOVES = 1e-3        # a field-only splice on a random tiny model moves the logits by more than this (observed >= 2.5e-3)
FINER = 0.05        # the backends' disagreement must also be this small a fraction of the splice's own effect: the
                    # single mid-position splice moves llama/qwen2 logits by only ~5e-5..9e-5, below TOL


def max_abs(x, y) -> float:
    return float((x.float() - y.float()).abs().max())


def is_kv_hook(name: str) -> bool:
    return name.endswith(("attn.hook_k", "attn.hook_v"))


class Backends:
    """One tiny model's aligned diverse pair on both backends, with the expensive runs computed once."""

    def __init__(self, lm, pair):
        self.lm, self.hf = lm, lm.model
        self.old, self.new = pair.old_ids, pair.new_ids
        self.a, self.b = pair.span
        self.d = pair.dpos
        self.last = int(self.old[-1])
        assert int(self.new[-1]) == self.last and len(self.old) == len(self.new) == self.d + 1
        self.n_layers = self.hf.config.num_hidden_layers

    @functools.cached_property
    def bridge(self):
        spec = self.lm.spec
        model2, tok = build_tiny(spec["arch"], seed=int(spec.get("seed", 0)))
        ref = self.hf.state_dict()
        assert all(torch.equal(t, ref[k]) for k, t in model2.state_dict().items()), "second instance differs"
        attn_before = self.hf.config._attn_implementation
        bridge = TransformerBridge.boot_transformers(spec["name"], hf_model=model2, tokenizer=tok, device="cpu",
                                                     dtype=torch.float32)
        assert model2.config._attn_implementation == "eager"
        assert self.hf.config._attn_implementation == attn_before   # the kvnotes backend's model is not touched
        return bridge

    @torch.inference_mode()
    def tl_logits(self, ids, fwd_hooks=()) -> torch.Tensor:
        """Last-position logits of the bridge on the 1-D `ids` (token tensors: no TL tokenisation or BOS)."""
        if fwd_hooks:
            out = self.bridge.run_with_hooks(ids[None], fwd_hooks=list(fwd_hooks), return_type="logits")
        else:
            out = self.bridge(ids[None], return_type="logits")
        return out[0, -1].float()

    @functools.cached_property
    def tl_runs(self):
        """(base, source) `run_with_cache` activations: every layer's hook_k / hook_v / hook_rot_k."""
        with torch.inference_mode():
            names = lambda n: is_kv_hook(n) or n.endswith("attn.hook_rot_k")  # noqa: E731
            _, base = self.bridge.run_with_cache(self.old[None], names_filter=names)
            _, source = self.bridge.run_with_cache(self.new[None], names_filter=names)
        kv_names = [n for n in base.keys() if is_kv_hook(n)]
        assert len(kv_names) == 2 * self.n_layers, kv_names
        return base, source

    def tl_splice_hooks(self, positions, frozen: bool = True):
        """Hooks realising the splice over `positions` on a run of the base prompt.

        frozen=True: the cache-state splice, every position < dpos overwritten (base values, source at P).
        frozen=False: ordinary activation patching (only P overwritten; the rest recomputes), for the control."""
        base, source = self.tl_runs
        P = torch.as_tensor(sorted(set(int(p) for p in positions)), dtype=torch.long)
        hooks = []
        for name in (n for n in base.keys() if is_kv_hook(n)):
            if frozen:
                stored = base[name][:, :self.d].clone()
                stored[:, P] = source[name][:, P]
                sl = slice(0, self.d)
            else:
                stored, sl = source[name][:, P], P

            def hook(x, hook, stored=stored, sl=sl):
                x = x.clone()
                assert x.shape[1] == self.d + 1          # a full-prompt run: position axis is dim 1
                x[:, sl] = stored
                return x
            hooks.append((name, hook))
        return hooks

    @functools.cached_property
    def hf_caches(self):
        """(stale, oracle): the HF caches of old[:dpos] and new[:dpos]."""
        return kv.prefill(self.hf, self.old[:self.d]), kv.prefill(self.hf, self.new[:self.d])

    def hf_splice_logits(self, positions) -> torch.Tensor:
        stale, oracle = self.hf_caches
        return kv.decode(self.hf, [kv.splice(stale, oracle, positions)], self.last)[0]

    @functools.cached_property
    def tl_base(self):
        return self.tl_logits(self.old)

    def positions(self, which: str) -> list[int]:
        return {"field": list(range(self.a, self.b)),
                "downstream": list(range(self.b, self.d)),
                "mid": [(self.b + self.d) // 2]}[which]


_BACKENDS: dict = {}


@pytest.fixture
def backends(tiny, get_pair):
    name = tiny.spec["name"]
    if name not in _BACKENDS:
        _BACKENDS[name] = Backends(tiny, get_pair(tiny, "diverse"))
    return _BACKENDS[name]


# ---------------------------------------------------------------- I11 (a): same logits
def test_I11_bridge_logits_equal_hf(backends):
    c = backends
    for ids in (c.old, c.new):
        hf = kv.full_forward_last_logits(c.hf, ids)
        tl = c.tl_logits(ids)
        assert tl.shape == hf.shape
        assert max_abs(tl, hf) <= TOL
    # the two prompts genuinely differ at the last position, so TOL could tell them apart
    assert max_abs(kv.full_forward_last_logits(c.hf, c.old), kv.full_forward_last_logits(c.hf, c.new)) > 10 * TOL


def test_hook_k_is_pre_rope_and_hook_rot_k_is_the_cache(backends):
    """The module docstring's claim, on the installed version: the HF cache holds what TL calls hook_rot_k (and
    hook_v); hook_k is the key before RoPE (and before Gemma-3's k_norm)."""
    c = backends
    base, _ = c.tl_runs
    stale, _ = c.hf_caches
    for li, layer in enumerate(stale.layers):
        n = layer.keys.shape[-2]                # stored positions [d - n, d) (sliding layers keep fewer)
        lo = c.d - n
        k = base[f"blocks.{li}.attn.hook_k"]    # [batch, pos, n_kv_heads, d_head]
        assert k.shape == (1, c.d + 1, c.hf.config.num_key_value_heads, layer.keys.shape[-1])
        rot_k = base[f"blocks.{li}.attn.hook_rot_k"][0, lo:c.d].transpose(0, 1)
        v = base[f"blocks.{li}.attn.hook_v"][0, lo:c.d].transpose(0, 1)
        scale = max(1.0, float(layer.keys.abs().max()))
        assert max_abs(rot_k, layer.keys[0]) <= 1e-5 * scale, f"layer {li}: hook_rot_k is not the cached key"
        assert max_abs(v, layer.values[0]) <= 1e-5 * max(1.0, float(layer.values.abs().max()))
        pre = k[0, max(lo, 1):c.d].transpose(0, 1)      # from position 1: RoPE at position 0 is the identity
        assert max_abs(pre, layer.keys[0, :, max(lo, 1) - lo:]) > 0.1, f"layer {li}: hook_k looks post-RoPE"


# ---------------------------------------------------------------- I11 (b): same splice results
@pytest.mark.parametrize("which", ["field", "downstream", "mid"])
def test_I11_hook_splice_equals_cache_splice(backends, which):
    c = backends
    P = c.positions(which)
    tl = c.tl_logits(c.old, c.tl_splice_hooks(P))
    hf = c.hf_splice_logits(P)
    diff = max_abs(tl, hf)
    assert diff <= TOL, f"{which} P={P[0]}..{P[-1]}: TL hook splice vs HF cache splice differ by {diff:.3g}"
    effect = max_abs(hf, kv.decode(c.hf, [c.hf_caches[0]], c.last)[0])
    assert effect > 0, f"{which}: the splice does not move the logits at all; the comparison would be empty"
    assert diff <= FINER * effect, f"{which}: disagreement {diff:.3g} is not small against the effect {effect:.3g}"


def test_I11_hook_splice_with_no_positions_is_the_base(backends):
    c = backends
    assert max_abs(c.tl_logits(c.old, c.tl_splice_hooks([])), c.tl_base) <= TOL
    assert max_abs(c.tl_base, kv.decode(c.hf, [c.hf_caches[0]], c.last)[0]) <= TOL


# ---------------------------------------------------------------- controls: the comparison has teeth
def test_control_field_splice_moves_the_logits(backends):
    c = backends
    P = c.positions("field")
    spliced = c.tl_logits(c.old, c.tl_splice_hooks(P))
    assert max_abs(spliced, c.tl_base) > MOVES       # so equality with the HF splice is not base == base
    assert max_abs(c.hf_splice_logits(P), c.tl_base) > MOVES


def test_control_frozen_splice_is_not_activation_patching(backends):
    """Freezing the non-patched positions matters (§9.2 item 3): letting them recompute after patching only the
    field gives other logits, so the hook splice above really realises the cache-state semantics."""
    c = backends
    P = c.positions("field")
    frozen = c.tl_logits(c.old, c.tl_splice_hooks(P))
    recomputed = c.tl_logits(c.old, c.tl_splice_hooks(P, frozen=False))
    assert max_abs(frozen, recomputed) > MOVES
    assert max_abs(recomputed, c.hf_splice_logits(P)) > MOVES


# ---------------------------------------------------------------- the engine and the frozen forward agree with TL
@pytest.mark.parametrize("which", ["field", "downstream", "mid"])
def test_I11_engine_and_frozen_forward_equal_the_tl_hook_splice(backends, which):
    """Three realisations of one cache-state splice: TL hooks over the full prompt, kvnotes' frozen full forward on
    the HF model, and the batched engine (one row of a batch that also holds the other splices)."""
    from kvnotes.engine import Splice, SpliceEngine
    c = backends
    P = c.positions(which)
    tl = c.tl_logits(c.old, c.tl_splice_hooks(P))
    stale, oracle = c.hf_caches
    frozen = kv.frozen_forward(c.hf, c.old, kv.splice(stale, oracle, P))
    batch = [Splice(tuple(c.positions(w))) for w in ("field", "downstream", "mid")]
    engine = SpliceEngine(c.hf, stale, oracle, c.last).run(batch)[batch.index(Splice(tuple(P)))]
    effect = max_abs(tl, c.tl_base)
    for name, got in (("frozen forward", frozen), ("engine", engine)):
        diff = max_abs(got, tl)
        assert diff <= TOL and diff <= FINER * effect, f"{which}: {name} vs TL hook splice differ by {diff:.3g}"
