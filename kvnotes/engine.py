"""The batched splice engine: many cache-state splices of one aligned pair, decoded in one forward per chunk.

A sweep (every downstream position, every layer, top-k sets, random-k nulls) asks for hundreds of caches that each
differ from the base cache at a handful of (layer, position) entries. Materialising them (`kv.splice` + `kv.decode`)
copies the whole cache per intervention and decodes them one small batch at a time. Here the base cache is stored
once and each intervention is only its edits:

* the decode token of all B interventions runs as one batch through the model's own layers (HF modules, so every
  architecture the registry loads works unchanged); only the attention kernel is replaced, through the transformers
  `AttentionInterface`, by one that reads the shared base K/V;
* scores against the base keys are one GEMM for all B x (query heads per KV head) queries; an edited position's
  score is recomputed with its new key, and an edited value enters as `p * (V_new - V_base)` added to `P @ V_base`;
* chunks of `chunk_size` interventions bound memory: the cache is never copied, activations scale with the chunk.

The semantics are exactly those of `kv.splice` + `kv.decode` (frozen cache, nothing recomputed); the tests check
equality on mixed batches, and `kv.frozen_forward` (the TransformerLens-style full forward with frozen K/V) agrees.

Knockouts (`Splice(positions, layers, which="mask")`) remove positions from the decode query's softmax in the given
layers (score -inf after any softcap, so the rest renormalises), the paper's attention knockout. With
`attention_groups`, `run` also reports how each intervention moved the decode query's attention (mass per position
group, entropy and KL to the unedited row, per layer and head): what a knockout or splice does to the pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kvnotes import kv

ATTN_NAME = "kvnotes_splice"


@dataclass(frozen=True)
class Splice:
    """One intervention: K and/or V at `positions` (absolute) in `layers` (None = all) and `kv_heads` (None = all)
    come from the source cache named `source`; or, with `which="mask"`, those positions are knocked out of the
    decode query's attention there."""
    positions: tuple[int, ...]
    layers: tuple[int, ...] | None = None
    which: str = "KV"
    kv_heads: tuple[int, ...] | None = None
    source: str = "source"

    def __post_init__(self):
        if self.which not in kv.WHICH + ("mask",):
            raise ValueError(f"Splice.which must be one of {kv.WHICH + ('mask',)}, got {self.which!r}")
        object.__setattr__(self, "positions", tuple(sorted({int(p) for p in self.positions})))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.kv_heads is not None:
            object.__setattr__(self, "kv_heads", tuple(sorted({int(x) for x in self.kv_heads})))


@dataclass
class _LayerEdits:
    batch: torch.Tensor      # [E] which batch row
    pos: torch.Tensor        # [E] index into the layer's stored K/V
    keys: torch.Tensor | None    # [E, kvh, d] new keys (None: no key edited in this layer)
    values: torch.Tensor | None  # [E, kvh, d] new values minus base values (None: no value edited)
    mask: tuple | None = None    # (batch [M], pos [M], heads [M, kvh] bool): scores knocked out to -inf


class _Context:
    """What the attention kernel needs for the current batched forward (set only inside `SpliceEngine._forward`)."""

    def __init__(self, keys, values, offsets, query_pos, edits, groups=None):
        self.keys, self.values, self.offsets, self.query_pos, self.edits = keys, values, offsets, query_pos, edits
        self.groups = groups          # per layer [Lc + 1, G] one-hot position groups, or None: no attention log
        self.attention = {}           # layer -> (mass [B, H, G], entropy [B, H], kl to row 0 [B, H])


_ACTIVE: list[_Context] = []


def _splice_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """Attention of one decode query per batch row over the shared base cache plus that row's edits, plus itself."""
    ctx = _ACTIVE[-1]
    li = module.layer_idx
    ext_k, ext_v = ctx.keys[li], ctx.values[li]            # [kvh, Lc + 1, d]: the base cache plus a zero row
    kvh, n_ext, d = ext_k.shape
    n_stored = n_ext - 1
    bsz, n_heads, q_len, _ = query.shape
    if q_len != 1:
        raise RuntimeError("the splice engine decodes exactly one token per intervention")
    g = n_heads // kvh
    q = (query * scaling).view(bsz, kvh, g, d)
    # one GEMM per KV head for all B x g queries; the zero row's column (last) is where the token's own score goes
    scores = torch.matmul(q.transpose(0, 1).reshape(kvh, bsz * g, d), ext_k.transpose(1, 2))
    scores4 = scores.view(kvh, bsz, g, n_ext)
    scores4[..., n_stored] = (q * key.view(bsz, kvh, 1, d)).sum(-1).transpose(0, 1)
    ed = ctx.edits[li]
    if ed is not None and ed.keys is not None:
        # [E, kvh, g] scores of the edited rows against their new keys, written over the base-key scores
        new = torch.einsum("ekgd,ekd->ekg", q[ed.batch], ed.keys)
        scores4.permute(1, 3, 0, 2)[ed.batch, ed.pos] = new
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
        scores4 = scores.view(kvh, bsz, g, n_ext)
    if sliding_window is not None:
        # the query at position Q sees keys at positions > Q - window (as transformers' sliding mask)
        first = ctx.query_pos - int(sliding_window) + 1 - ctx.offsets[li]
        if first > 0:
            scores[..., :first] = float("-inf")
    if ed is not None and ed.mask is not None:
        m_batch, m_pos, m_heads = ed.mask
        view = scores4.permute(1, 3, 0, 2)                             # [B, Lc + 1, kvh, g]
        view[m_batch, m_pos] = view[m_batch, m_pos].masked_fill(m_heads.unsqueeze(-1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)    # [kvh, B * g, Lc + 1]
    if ctx.groups is not None:
        _log_attention(ctx, li, probs.view(kvh, bsz, g, n_ext))
    out = torch.matmul(probs, ext_v).view(kvh, bsz, g, d)           # the zero row adds nothing ...
    probs = probs.view(kvh, bsz, g, n_ext)
    out = out + probs[..., n_stored:] * value.view(bsz, kvh, 1, d).transpose(0, 1)   # ... the token's own value
    if ed is not None and ed.values is not None:
        p_e = probs.permute(1, 3, 0, 2)[ed.batch, ed.pos]           # [E, kvh, g]
        out = out.transpose(0, 1).index_add(0, ed.batch, p_e.unsqueeze(-1) * ed.values.unsqueeze(2)).transpose(0, 1)
    return out.transpose(0, 1).reshape(bsz, 1, n_heads, d), None


def _log_attention(ctx, li: int, probs: torch.Tensor) -> None:
    """Mass per position group, entropy, and KL(row || row 0) of each row's decode-query attention, per head."""
    p = probs.float().permute(1, 0, 2, 3).reshape(probs.shape[1], -1, probs.shape[3])   # [B, H, Lc + 1]
    logp = torch.log(p.clamp_min(1e-30))
    ent = -(p * logp).sum(-1)
    kl = (p * (logp - logp[:1])).sum(-1)
    ctx.attention[li] = (p @ ctx.groups[li], ent, kl)


def _register():
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, _splice_attention)


def join_rows(n: int):
    """A forward pre-hook for a decoder layer that appends `n` copies of batch row 0's hidden states to the batch:
    rows whose first edit is in this layer join the unedited row there (the layers before it ran once for them)."""
    def hook(module, args, kwargs):
        if args:
            h = args[0]
            return (torch.cat([h, h[:1].expand(n, *h.shape[1:])]), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        kwargs["hidden_states"] = torch.cat([h, h[:1].expand(n, *h.shape[1:])])
        return args, kwargs
    return hook


def _layer_kv(cache, zero_row: bool = False):
    """Per layer: stored keys/values `[kvh, Lc, d]` (batch row 0) and the absolute position of stored index 0.
    With `zero_row`, each gets one more row of zeros at the end (the slot of the decode token's own key/value)."""
    keys, values, offsets = [], [], []
    for layer in cache.layers:
        if layer.keys.shape[0] != 1:
            raise ValueError("the splice engine takes caches of batch 1 (one prefill each)")
        k, v = layer.keys[0], layer.values[0]
        if zero_row:
            k = torch.cat([k, k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
            v = torch.cat([v, v.new_zeros(v.shape[0], 1, v.shape[2])], dim=1)
        keys.append(k)
        values.append(v)
        offsets.append(kv._layer_offset(layer))
    return keys, values, offsets


class SpliceEngine:
    """Decode many splices of `base` from named `sources` (caches of the same aligned prompt length).

        engine = SpliceEngine(lm.model, stale, {"source": oracle}, last_token)
        logits = engine.run([Splice((p,)) for p in range(a, dpos)], tokens=[safe_id, unsafe_id])

    `tokens` restricts the unembedding to those vocabulary rows (what a margin needs, and ~15 % of the FLOPs of a
    1.5B decode step saved); `tokens=None` returns full-vocabulary logits. Logits are fp32 `[n_splices, n_tokens]`.
    """

    def __init__(self, model, base, sources, last_token: int, chunk_size: int = 256):
        _register()
        self.model = model
        self.decoder = model.get_decoder()
        self.last_token = int(last_token)
        self.chunk_size = int(chunk_size)
        if not isinstance(sources, Mapping):
            sources = {"source": sources}
        self.length = kv.cache_length(base)
        for name, src in sources.items():
            if kv.cache_length(src) != self.length:
                raise ValueError(f"source {name!r} has length {kv.cache_length(src)}, base {self.length}: "
                                 "the prompts are not aligned")
        self.keys, self.values, self.offsets = _layer_kv(base, zero_row=True)
        self.sources = {name: _layer_kv(src) for name, src in sources.items()}
        for name, (_, _, offs) in self.sources.items():
            if offs != self.offsets:
                raise ValueError(f"source {name!r} stores different windows than the base")
        self.n_layers = len(self.keys)
        self.n_kv_heads = self.keys[0].shape[0]
        self.rows_by_layer_run = torch.zeros(self.n_layers, dtype=torch.long)   # work counter, for benchmarks

    # -- building the edits of one chunk -------------------------------------------------------------------------
    def _plan(self, splices: Sequence[Splice]) -> tuple[list[_LayerEdits | None], torch.Tensor]:
        """Per-layer edits of a chunk (batch index = splice index) and each splice's first edited layer.

        An edit that writes the value already there (e.g. layer-0 K/V of a downstream position, which do not depend
        on the field) is dropped: it changes nothing, and dropping it lets that splice share the layers before its
        first real edit with the base row."""
        n = len(splices)
        layer_mask = torch.zeros(n, self.n_layers, dtype=torch.bool)
        head_mask = torch.ones(n, self.n_kv_heads, dtype=torch.bool)
        k_flag = torch.tensor([("K" in sp.which) for sp in splices], dtype=torch.bool)
        v_flag = torch.tensor([("V" in sp.which) for sp in splices], dtype=torch.bool)
        src_id = torch.empty(n, dtype=torch.long)
        names = list(self.sources)
        flat_s, flat_p = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
        mask_s, mask_p = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
        for i, sp in enumerate(splices):
            if sp.which != "mask" and sp.positions and sp.source not in self.sources:
                raise KeyError(f"unknown splice source {sp.source!r}; the engine has {sorted(self.sources)}")
            src_id[i] = names.index(sp.source) if sp.source in self.sources else -1
            if sp.positions and (sp.positions[0] < 0 or sp.positions[-1] >= self.length):
                raise IndexError(f"splice positions must lie in [0, {self.length}), got {list(sp.positions)}")
            if sp.layers is None:
                layer_mask[i] = True
            else:
                if sp.layers and (sp.layers[0] < 0 or sp.layers[-1] >= self.n_layers):
                    raise IndexError(f"layers {list(sp.layers)} out of range for a {self.n_layers}-layer model")
                layer_mask[i, list(sp.layers)] = True
            if sp.kv_heads is not None:
                if sp.kv_heads and (sp.kv_heads[0] < 0 or sp.kv_heads[-1] >= self.n_kv_heads):
                    raise IndexError(f"kv_heads {list(sp.kv_heads)} out of range ({self.n_kv_heads} KV heads)")
                head_mask[i] = False
                head_mask[i, list(sp.kv_heads)] = True
            (mask_s if sp.which == "mask" else flat_s).append(torch.full((len(sp.positions),), i, dtype=torch.long))
            (mask_p if sp.which == "mask" else flat_p).append(torch.as_tensor(sp.positions, dtype=torch.long))
        flat_s, flat_p = torch.cat(flat_s), torch.cat(flat_p)
        mask_s, mask_p = torch.cat(mask_s), torch.cat(mask_p)
        first = torch.full((n,), self.n_layers, dtype=torch.long)     # n_layers = never edited
        out: list[_LayerEdits | None] = []
        for li in range(self.n_layers):
            sel = layer_mask[mask_s, li] & (mask_p >= self.offsets[li])   # outside a sliding window: invisible
            mask = None
            if sel.any():
                m_s = mask_s[sel]
                mask = (m_s, mask_p[sel] - self.offsets[li], head_mask[m_s])
                first[m_s] = torch.minimum(first[m_s], torch.tensor(li))
            sel = layer_mask[flat_s, li] & (flat_p >= self.offsets[li])
            s_idx, pos = flat_s[sel], flat_p[sel] - self.offsets[li]
            if len(s_idx) == 0:
                out.append(_LayerEdits(s_idx, pos, None, None, mask) if mask is not None else None)
                continue
            base_k = self.keys[li][:, pos].transpose(0, 1)              # [E, kvh, d]
            base_v = self.values[li][:, pos].transpose(0, 1)
            new_k, new_v = base_k, base_v
            for j, name in enumerate(names):
                rows = src_id[s_idx] == j
                if not rows.any():
                    continue
                src_k, src_v, _ = self.sources[name]
                heads = head_mask[s_idx].unsqueeze(-1)
                use_k = (rows & k_flag[s_idx]).view(-1, 1, 1) & heads
                use_v = (rows & v_flag[s_idx]).view(-1, 1, 1) & heads
                new_k = torch.where(use_k, src_k[li][:, pos].transpose(0, 1), new_k)
                new_v = torch.where(use_v, src_v[li][:, pos].transpose(0, 1), new_v)
            k_changed = (new_k != base_k).flatten(1).any(1)
            v_changed = (new_v != base_v).flatten(1).any(1)
            keep = k_changed | v_changed
            if not keep.any():
                out.append(_LayerEdits(s_idx[:0], pos[:0], None, None, mask) if mask is not None else None)
                continue
            s_idx, pos = s_idx[keep], pos[keep]
            first[s_idx] = torch.minimum(first[s_idx], torch.tensor(li))
            out.append(_LayerEdits(s_idx, pos, new_k[keep] if k_changed.any() else None,
                                   (new_v - base_v)[keep] if v_changed.any() else None, mask))
        return out, first

    # -- the batched decode step ----------------------------------------------------------------------------------
    def _forward(self, splices: Sequence[Splice], tokens, groups=None):
        """Row 0 of the batch is the unedited base; splice rows join it at their first edited layer (copies of the
        base row's hidden state there), so layers before a splice's first real edit are computed once, not B times.
        Splices with no real edit at all return the base row's logits."""
        edits, first = self._plan(splices)
        order = torch.argsort(first, stable=True)
        order = order[first[order] < self.n_layers]
        row_of = torch.zeros(len(splices), dtype=torch.long)       # splices with no edit read row 0 (the base)
        row_of[order] = torch.arange(1, len(order) + 1)
        joiners = torch.bincount(first[order], minlength=self.n_layers)
        self.rows_by_layer_run += 1 + torch.cumsum(joiners, 0)        # batch rows each layer actually ran
        joiners = joiners.tolist()
        for li, ed in enumerate(edits):
            if ed is not None:
                ed.batch = row_of[ed.batch]
                if ed.mask is not None:
                    ed.mask = (row_of[ed.mask[0]], *ed.mask[1:])

        handles = [layer.register_forward_pre_hook(join_rows(joiners[li]), with_kwargs=True)
                   for li, layer in enumerate(self.decoder.layers[:self.n_layers]) if joiners[li]]
        ctx = _Context(self.keys, self.values, self.offsets, self.length, edits, groups)
        ids = torch.full((1, 1), self.last_token, dtype=torch.long)
        position_ids = torch.full((1, 1), self.length, dtype=torch.long)
        _ACTIVE.append(ctx)
        try:
            with kv.attention_implementation(self.model, ATTN_NAME):
                hidden = self.decoder(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
        finally:
            _ACTIVE.pop()
            for h in handles:
                h.remove()
        logits = unembed(self.model, hidden[:, -1], tokens)[row_of]
        if groups is None:
            return logits, None
        # a row that joined at layer j ran no layer before j: there its attention is the base row's (row 0)
        attn = []
        for li in range(self.n_layers):
            mass, ent, kl = ctx.attention[li]
            rows = torch.where(row_of < mass.shape[0], row_of, torch.zeros_like(row_of))
            attn.append((mass[rows], ent[rows], kl[rows]))
        return logits, {name: torch.stack([a[j] for a in attn], 1) for j, name in enumerate(("mass", "entropy", "kl"))}

    def _groups(self, attention_groups: Mapping[str, Sequence[int]]) -> list[torch.Tensor]:
        """Per layer, the one-hot `[Lc + 1, G]` map of stored positions (and the decode token's own slot, group
        "self") to groups; positions in no group and outside a sliding window count nowhere."""
        names = list(attention_groups)
        out = []
        for li in range(self.n_layers):
            n_ext = self.keys[li].shape[1]
            m = torch.zeros(n_ext, len(names) + 1)
            for j, name in enumerate(names):
                idx = torch.as_tensor([p - self.offsets[li] for p in attention_groups[name]
                                       if p >= self.offsets[li]], dtype=torch.long)
                if len(idx) and (idx.max() >= n_ext - 1):
                    raise IndexError(f"attention group {name!r} has positions outside the cache [0, {self.length})")
                m[idx, j] = 1.0
            m[n_ext - 1, len(names)] = 1.0
            out.append(m)
        return out

    @torch.inference_mode()
    def run(self, splices: Sequence[Splice], tokens=None, progress=None, attention_groups=None):
        """fp32 logits `[len(splices), len(tokens) or vocab]`, one row per splice, in order.

        With `attention_groups` ({name: positions}), returns `(logits, attention)`: the decode query's attention
        per splice, layer and query head: `mass` `[n, layers, heads, G + 1]` (the groups in order, then the token's
        own slot "self"), `entropy` `[n, layers, heads]` and `kl` (KL(splice || unedited base) `[n, layers, heads]`).
        """
        groups = self._groups(attention_groups) if attention_groups is not None else None
        outs, attns = [], []
        for i in range(0, len(splices), self.chunk_size):
            logits, attn = self._forward(splices[i:i + self.chunk_size], tokens, groups)
            outs.append(logits.float())
            attns.append(attn)
            if progress is not None:
                progress.update(len(splices[i:i + self.chunk_size]))
        if not outs:
            n = len(tokens) if tokens is not None else self.model.get_output_embeddings().weight.shape[0]
            logits = torch.empty(0, n)
            return (logits, None) if groups is not None else logits
        logits = torch.cat(outs)
        if groups is None:
            return logits
        return logits, {k: torch.cat([a[k] for a in attns]) for k in attns[0]}


def unembed(model, hidden: torch.Tensor, tokens=None) -> torch.Tensor:
    """Logits of the final hidden states `[n, D]` (already final-normed), for vocabulary rows `tokens` or all."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if tokens is not None:
        idx = torch.as_tensor(list(tokens), dtype=torch.long)
        weight = weight[idx]
        bias = bias[idx] if bias is not None else None
    logits = torch.nn.functional.linear(hidden, weight, bias)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
