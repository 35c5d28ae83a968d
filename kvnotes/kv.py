"""The KV-splice substrate: prefill a prompt to a cache, splice K/V between caches, decode the last token.

This is the paper's *cache-state* semantics (paper_spec §3): K/V at chosen positions and layers are copied from a
source cache into a base cache and nothing else is recomputed; positions after the splice keep the base's K/V. The
decision is one decode step of the final prompt token, which equals the full forward's last logits (tested).

Caches are transformers `DynamicCache` objects, tensors `[batch, n_kv_heads, seq, d_head]`, post-RoPE. Positions are
absolute token positions; sliding-window layers (Gemma-3) store only the last `window - 1` positions, so a position
outside a layer's stored window is skipped on that layer (the decode step cannot see it there anyway).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Sequence

import torch

WHICH = ("KV", "K", "V")


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, past=None):
    """Run `ids` (1-D) and return the cache it writes. With `past` (a cache of the preceding tokens, left untouched)
    the run continues from it: old and new prompts share their prefix, so it is computed once."""
    past = copy.deepcopy(past) if past is not None else None
    out = model(input_ids=ids[None, :], past_key_values=past, use_cache=True, logits_to_keep=1)  # no [L, vocab]
    return out.past_key_values


def _layer_offset(layer) -> int:
    """Absolute position of index 0 of this layer's stored K/V (non-zero only for a full sliding window)."""
    total = layer.cumulative_length if hasattr(layer, "cumulative_length") else layer.keys.shape[-2]
    return int(total) - layer.keys.shape[-2]


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def splice(base, source, positions: Iterable[int], layers: Sequence[int] | None = None, which: str = "KV"):
    """A copy of `base` whose K and/or V at `positions` (absolute) in `layers` (default all) come from `source`.

    Nothing is recomputed. `base` and `source` must be caches of the same length (aligned prompts)."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    n_base, n_src = cache_length(base), cache_length(source)
    if n_base != n_src:
        raise ValueError(f"cannot splice caches of different lengths ({n_base} vs {n_src}): prompts are not aligned")
    pos = torch.as_tensor(sorted(set(int(p) for p in positions)), dtype=torch.long)
    if len(pos) and (pos.min() < 0 or pos.max() >= n_base):
        raise IndexError(f"splice positions must lie in [0, {n_base}), got {pos.min().item()}..{pos.max().item()}")
    out = copy.deepcopy(base)
    layer_ids = range(len(out.layers)) if layers is None else layers
    for li in layer_ids:
        lo, ls = out.layers[li], source.layers[li]
        idx = pos - _layer_offset(lo)
        idx = idx[idx >= 0]
        if len(idx) == 0:
            continue
        if "K" in which:
            lo.keys[:, :, idx] = ls.keys[:, :, idx]
        if "V" in which:
            lo.values[:, :, idx] = ls.values[:, :, idx]
    return out


def stack(caches: Sequence):
    """One cache whose batch rows are `caches` (all of batch 1 and equal length), for a batched decode step."""
    n = {cache_length(c) for c in caches}
    if len(n) != 1:
        raise ValueError(f"cannot stack caches of different lengths: {sorted(n)}")
    out = copy.copy(caches[0])
    out.layers = [copy.copy(layer) for layer in caches[0].layers]
    for li, layer in enumerate(out.layers):
        layer.keys = torch.cat([c.layers[li].keys for c in caches], dim=0)
        layer.values = torch.cat([c.layers[li].values for c in caches], dim=0)
    return out


@torch.inference_mode()
def decode(model, caches: Sequence, last_token: int, batch_size: int = 16) -> torch.Tensor:
    """Logits (fp32, `[len(caches), vocab]`) of one decode step of `last_token` on each cache.

    The caches are not modified (each batch decodes on a stacked copy)."""
    outs = []
    for i in range(0, len(caches), batch_size):
        chunk = caches[i:i + batch_size]
        batch = stack(chunk)
        ids = torch.full((len(chunk), 1), int(last_token), dtype=torch.long)
        logits = model(input_ids=ids, past_key_values=batch, use_cache=True).logits
        outs.append(logits[:, -1].float())
    return torch.cat(outs, dim=0)


@torch.inference_mode()
def full_forward_last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits (fp32, `[vocab]`) of a forward over the whole prompt, no cache: the reference for decode."""
    return model(input_ids=ids[None, :], use_cache=False, logits_to_keep=1).logits[0, -1].float()


# -- the frozen full-forward path (the TransformerLens-style realisation of a cache-state splice) ---------------------

FROZEN_ATTN = "kvnotes_frozen"
_FROZEN: list = []


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Temporarily route every attention module of `model` through the implementation registered as `name`."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention after overwriting the freshly computed K/V of every cached position with the frozen ones."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    layer = _FROZEN[-1].layers[module.layer_idx]
    start, stop = _layer_offset(layer), _layer_offset(layer) + layer.keys.shape[-2]
    key, value = key.clone(), value.clone()
    key[:, :, start:stop] = layer.keys
    value[:, :, start:stop] = layer.values
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_frozen():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(FROZEN_ATTN, _frozen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FROZEN_ATTN, sdpa_mask)


@torch.inference_mode()
def frozen_forward(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Last-position logits (fp32, `[vocab]`) of a full forward over `ids` (1-D, the whole prompt) in which every
    layer's K and V at the positions `cache` holds are overwritten by the cache's (paper_spec §9.2 item 3).

    This is how TransformerLens patches a cache state: hooks on every layer's (rotated) K/V that replace all positions
    before the decision token with stored tensors, the base's except where the splice put the source's. Nothing the
    last query reads is recomputed, so it equals one decode step on `cache`; it costs a forward over the whole prompt
    per intervention, which is what the batched engine is measured against."""
    if cache_length(cache) != len(ids) - 1:
        raise ValueError(f"the cache holds {cache_length(cache)} positions; a frozen forward of {len(ids)} tokens "
                         f"needs the {len(ids) - 1} before the decision token")
    _register_frozen()
    _FROZEN.append(cache)
    try:
        with attention_implementation(model, FROZEN_ATTN):
            return model(input_ids=ids[None, :], use_cache=False, logits_to_keep=1).logits[0, -1].float()
    finally:
        _FROZEN.pop()
