"""Batched head output patching (and residual additions): many patched runs of one prompt, recomputing only the
suffix.

The circuit probes (paper_spec §4.1, §4.2) patch one query head's output z at a time, each in a full forward of the
whole prompt. That is wasteful twice over. A read-head patch acts at the decision token, so everything before it is
the unpatched prompt's prefill; a write-head patch acts at an aggregator position p, so everything before p is
shared. Here the prefix `ids[:start]` is prefilled once and its K/V kept; each patch set then runs only
`ids[start:]`, B sets to a forward, through the model's own HF layers:

* the suffix tokens of all B rows attend to the shared prefix K/V (one GEMM per KV head for all rows: the cache is
  never copied) and causally to their own suffix K/V; this kernel replaces the attention through the transformers
  `AttentionInterface` (sliding windows and soft-caps as the model declares them);
* a set's row joins the batch at its first patched layer, as a copy of the unpatched row 0 there (as in
  `kvnotes.engine`), so the layers before a patch are computed once, not B times;
* a forward pre-hook on each `o_proj` writes the patched heads' z into their rows, and a forward hook on a decoder
  layer adds the residual vectors of the rows that add one there (the direction probes' sufficiency / necessity).

Semantics are exactly those of `kvnotes.interventions.HeadPatch` in a full forward (the tests compare against the
nnsight backend on every tiny architecture). Why hand-written: neither nnsight nor TransformerLens shares a prefix
across many patched runs, and this is the hot loop of every circuit sweep (the speed target of issue 13).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvnotes import kv
from kvnotes.engine import _layer_kv, join_rows, unembed

ATTN_NAME = "kvnotes_prefix"


_EMPTY = torch.empty(0, dtype=torch.long)


@dataclass(frozen=True, eq=False)
class HeadSet:
    """One patched run: query heads `(layers[i], heads[i])` get z = `values[i]` [d_head] at position `positions[i]`
    (absolute); and `add_vectors[j]` [d_model] is added to the residual stream after decoder layer `add_layers[j]`
    at position `add_positions[j]` (`kvnotes.interventions.ResidAdd`). Build with `HeadSet.of(patches, adds)` from
    (layer, head, position, value) and (layer, position, vector) tuples."""
    layers: torch.Tensor       # [n] long
    heads: torch.Tensor        # [n] long
    positions: torch.Tensor    # [n] long
    values: torch.Tensor       # [n, d_head]
    add_layers: torch.Tensor = _EMPTY        # [m] long
    add_positions: torch.Tensor = _EMPTY     # [m] long
    add_vectors: torch.Tensor = torch.empty(0, 0)   # [m, d_model]

    @classmethod
    def of(cls, patches: Sequence[tuple[int, int, int, torch.Tensor]] = (),
           adds: Sequence[tuple[int, int, torch.Tensor]] = ()) -> "HeadSet":
        if patches:
            layers, heads, positions, values = zip(*patches)
            head_part = (torch.as_tensor(layers, dtype=torch.long), torch.as_tensor(heads, dtype=torch.long),
                         torch.as_tensor(positions, dtype=torch.long),
                         torch.stack([torch.as_tensor(v) for v in values]))
        else:
            head_part = (_EMPTY, _EMPTY, _EMPTY, torch.empty(0, 0))
        if adds:
            al, ap, av = zip(*adds)
            add_part = (torch.as_tensor(al, dtype=torch.long), torch.as_tensor(ap, dtype=torch.long),
                        torch.stack([torch.as_tensor(v) for v in av]))
        else:
            add_part = (_EMPTY, _EMPTY, torch.empty(0, 0))
        return cls(*head_part, *add_part)

    @property
    def first_layer(self) -> int | None:
        """The first layer this set edits (None: it edits nothing)."""
        firsts = [int(t.min()) for t in (self.layers, self.add_layers) if len(t)]
        return min(firsts) if firsts else None


class _Context:
    def __init__(self, keys, values, offsets, start):
        self.keys, self.values, self.offsets, self.start = keys, values, offsets, start


_ACTIVE: list[_Context] = []


def _prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """Attention of q suffix queries per row over the shared prefix K/V and, causally, the row's own suffix K/V."""
    ctx = _ACTIVE[-1]
    li = module.layer_idx
    pk, pv, off = ctx.keys[li], ctx.values[li], ctx.offsets[li]     # [kvh, Lc, d]
    kvh, n_pre, d = pk.shape
    bsz, n_heads, q_len, _ = query.shape
    g = n_heads // kvh
    qs = (query * scaling).view(bsz, kvh, g, q_len, d)
    # prefix scores: one GEMM per KV head for all B x g x q queries
    s_pre = torch.matmul(qs.transpose(0, 1).reshape(kvh, bsz * g * q_len, d), pk.transpose(1, 2))
    s_pre = s_pre.view(kvh, bsz, g, q_len, n_pre).transpose(0, 1)                # [B, kvh, g, q, Lc]
    s_self = torch.matmul(qs, key.unsqueeze(2).transpose(-1, -2))                 # [B, kvh, g, q, q]
    if softcap is not None:
        s_pre = torch.tanh(s_pre / softcap) * softcap
        s_self = torch.tanh(s_self / softcap) * softcap
    q_pos = ctx.start + torch.arange(q_len)
    ok_self = q_pos[None, :] <= q_pos[:, None]                                     # causal within the suffix
    ok_pre = torch.ones(q_len, n_pre, dtype=torch.bool)
    if sliding_window is not None:      # a query at Q sees keys at positions > Q - window (transformers' mask)
        lo = q_pos - int(sliding_window)
        ok_pre = (off + torch.arange(n_pre))[None, :] > lo[:, None]
        ok_self = ok_self & (q_pos[None, :] > lo[:, None])
    scores = torch.cat([s_pre.masked_fill(~ok_pre, float("-inf")), s_self.masked_fill(~ok_self, float("-inf"))], -1)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    p_pre, p_self = probs[..., :n_pre], probs[..., n_pre:]
    out = torch.matmul(p_pre.transpose(0, 1).reshape(kvh, bsz * g * q_len, n_pre), pv)
    out = out.view(kvh, bsz, g, q_len, d).transpose(0, 1)
    out = out + torch.matmul(p_self, value.unsqueeze(2))                             # [B, kvh, g, q, d]
    return out.reshape(bsz, n_heads, q_len, d).transpose(1, 2), None


def _register():
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, _prefix_attention)


class HeadPatchEngine:
    """Logits of `ids` (1-D, the whole prompt including the decision token) under many `HeadSet`s, the prefix
    `ids[:start]` computed once. Every patched position must be >= `start` (read heads: start = len(ids) - 1;
    write heads at aggregator p: start <= p).

        eng = HeadPatchEngine(lm.model, corrupt_ids, start=dpos)
        logits = eng.run([HeadSet.of([(l, h, dpos, z_clean[l][dpos, h])]) for l, h in heads], tokens=[safe, unsafe])

    Returns fp32 logits [len(sets), len(tokens) or vocab] at the last position. Raises ValueError for a patch before
    `start` or past the prompt, or a layer / head out of range, naming it. Source: paper_spec §4.1 step 2, §4.2
    step 1, §9.2 items 6-7."""

    def __init__(self, model, ids: torch.Tensor, start: int, chunk_size: int = 64):
        _register()
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not 0 < start < ids.numel():
            raise ValueError(f"start must lie in [1, {ids.numel()}) (the prefix is ids[:start]); got {start}")
        self.model, self.decoder = model, model.get_decoder()
        self.ids, self.start, self.chunk_size = ids, int(start), int(chunk_size)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_layers, self.n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.d_model = int(cfg.hidden_size)
        self.keys, self.values, self.offsets = _layer_kv(kv.prefill(model, ids[:start]))
        self.rows_by_layer_run = torch.zeros(self.n_layers, dtype=torch.long)      # work counter, for benchmarks

    def _check(self, s: HeadSet) -> None:
        if len(s.add_layers):
            if int(s.add_positions.min()) < self.start or int(s.add_positions.max()) >= self.ids.numel():
                raise ValueError(f"added positions {s.add_positions.tolist()} must lie in [{self.start}, "
                                 f"{self.ids.numel()}): this engine recomputes only from start={self.start}")
            if int(s.add_layers.min()) < 0 or int(s.add_layers.max()) >= self.n_layers:
                raise ValueError(f"add layers {s.add_layers.tolist()} outside [0, {self.n_layers})")
            if s.add_vectors.shape != (len(s.add_layers), self.d_model):
                raise ValueError(f"add_vectors must be [n_adds={len(s.add_layers)}, d_model={self.d_model}]; got "
                                 f"{tuple(s.add_vectors.shape)}")
        if len(s.layers) == 0:
            return
        if int(s.positions.min()) < self.start or int(s.positions.max()) >= self.ids.numel():
            raise ValueError(f"patched positions {s.positions.tolist()} must lie in [{self.start}, {self.ids.numel()})"
                             f": this engine recomputes only from start={self.start}")
        if int(s.layers.min()) < 0 or int(s.layers.max()) >= self.n_layers:
            raise ValueError(f"layers {s.layers.tolist()} outside [0, {self.n_layers})")
        if int(s.heads.min()) < 0 or int(s.heads.max()) >= self.n_heads:
            raise ValueError(f"heads {s.heads.tolist()} outside [0, {self.n_heads})")
        if s.values.shape != (len(s.layers), self.d_head):
            raise ValueError(f"values must be [n_patches={len(s.layers)}, d_head={self.d_head}]; got "
                             f"{tuple(s.values.shape)}")

    def _forward(self, sets: Sequence[HeadSet], tokens):
        n = len(sets)
        first = torch.tensor([self.n_layers if s.first_layer is None else s.first_layer for s in sets])
        order = torch.argsort(first, stable=True)
        order = order[first[order] < self.n_layers]
        row_of = torch.zeros(n, dtype=torch.long)          # sets with no patch read row 0 (the unpatched run)
        row_of[order] = torch.arange(1, len(order) + 1)
        joiners = torch.bincount(first[order], minlength=self.n_layers)
        self.rows_by_layer_run += 1 + torch.cumsum(joiners, 0)
        joiners = joiners.tolist()
        # per layer: (row, head, suffix position, value) of every patch there
        per_layer: dict[int, tuple] = {}
        for i, s in enumerate(sets):
            for li in s.layers.unique().tolist():
                sel = s.layers == li
                per_layer.setdefault(li, []).append((torch.full((int(sel.sum()),), int(row_of[i])), s.heads[sel],
                                                     s.positions[sel] - self.start, s.values[sel]))
        per_layer = {li: tuple(torch.cat(x) for x in zip(*parts)) for li, parts in per_layer.items()}
        adds: dict[int, list] = {}      # per layer: (row, suffix position, vector) of every residual addition there
        for i, s in enumerate(sets):
            for li in s.add_layers.unique().tolist():
                sel = s.add_layers == li
                adds.setdefault(li, []).append((torch.full((int(sel.sum()),), int(row_of[i])),
                                                s.add_positions[sel] - self.start, s.add_vectors[sel]))
        adds = {li: tuple(torch.cat(x) for x in zip(*parts)) for li, parts in adds.items()}
        dh = self.d_head

        def patch(li):
            rows, heads, pos, vals = per_layer[li]
            cols = heads[:, None] * dh + torch.arange(dh)                             # [E, d_head]

            def hook(module, args):
                z = args[0].clone()                                                  # [B, q, H * d_head]
                z[rows[:, None], pos[:, None], cols] = vals.to(z.dtype)
                return (z, *args[1:])
            return hook

        def add(li):
            rows, pos, vecs = adds[li]

            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                h = h.index_put((rows, pos), vecs.to(h.dtype), accumulate=True)
                return (h, *output[1:]) if isinstance(output, tuple) else h
            return hook

        layers = self.decoder.layers[:self.n_layers]
        handles = [layers[li].register_forward_pre_hook(join_rows(joiners[li]), with_kwargs=True)
                   for li in range(self.n_layers) if joiners[li]]
        handles += [layers[li].self_attn.o_proj.register_forward_pre_hook(patch(li)) for li in per_layer]
        handles += [layers[li].register_forward_hook(add(li)) for li in adds]
        suffix = self.ids[self.start:][None]
        position_ids = torch.arange(self.start, self.ids.numel())[None]
        _ACTIVE.append(_Context(self.keys, self.values, self.offsets, self.start))
        try:
            with kv.attention_implementation(self.model, ATTN_NAME):
                hidden = self.decoder(input_ids=suffix, position_ids=position_ids, use_cache=False).last_hidden_state
        finally:
            _ACTIVE.pop()
            for h in handles:
                h.remove()
        return unembed(self.model, hidden[:, -1], tokens)[row_of].float()

    @torch.inference_mode()
    def run(self, sets: Sequence[HeadSet], tokens=None, progress=None) -> torch.Tensor:
        for s in sets:
            self._check(s)
        outs = []
        for i in range(0, len(sets), self.chunk_size):
            outs.append(self._forward(sets[i:i + self.chunk_size], tokens))
            if progress is not None:
                progress.update(len(sets[i:i + self.chunk_size]))
        if not outs:
            n = len(tokens) if tokens is not None else self.model.get_output_embeddings().weight.shape[0]
            return torch.empty(0, n)
        return torch.cat(outs)
