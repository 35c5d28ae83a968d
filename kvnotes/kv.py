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
from dataclasses import dataclass
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


# -- RoPE repositioning of cached keys (edit_compose_spec §3.2-3.3; paper_spec §3.13 D4 donors, §8 W7) --------------

# model_type values whose attention rotates the whole head dim in the half-split (GPT-NeoX) layout, q/k-norm (if any)
# before RoPE, through one rotary module on the decoder (`model.get_decoder().rotary_emb`): checked in transformers
# 5.x's modeling_llama / modeling_qwen2 / modeling_gemma3 (apply_rotary_pos_emb with rotate_half)
ROPE_ARCHS = ("llama", "qwen2", "gemma3_text")
# rope types whose inverse frequencies do not depend on the sequence length, so a rotation by (q - p) moves a key
# from p to q exactly; "dynamic" (NTK), "longrope" (switches frequency sets at a length) and anything newer are not
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedRopeError(ValueError):
    """A model whose rotary embedding `reposition_keys` cannot shift exactly (architecture, rope type or layout)."""


@dataclass(frozen=True)
class RopeLayer:
    """The rotary parameters one decoder layer's keys were rotated with."""
    layer: int
    layer_type: str | None      # Gemma-3: "sliding_attention" / "full_attention" (own bases); None: one rotary for all
    rope_type: str              # transformers' rope_type ("default", "linear", "llama3", "yarn")
    inv_freq: torch.Tensor      # [d_head / 2] fp32, the model's own buffer (after any scaling rule)
    attention_scaling: float    # m that transformers multiplies cos/sin by (YaRN mscale; 1 otherwise): already inside
                                # the cached keys, so a shift must not apply it again


def rope_layer(model, layer: int) -> RopeLayer:
    """The rotary parameters of decoder layer `layer`, read from the model's own rotary module (transformers 5.x:
    `model.get_decoder().rotary_emb`, with per-layer-type buffers `<layer_type>_inv_freq` on Gemma-3, whose local
    (sliding) layers use base 1e4 and global layers 1e6 plus any scaling; `inv_freq` on Llama / Qwen2).

    Raises UnsupportedRopeError naming the fix for an architecture outside ROPE_ARCHS, a rope type outside
    ROPE_TYPES, a layer without rotary parameters (NoPE), or a partial rotary dim."""
    cfg = model.config
    arch = getattr(cfg, "model_type", None)
    if arch not in ROPE_ARCHS:
        raise UnsupportedRopeError(
            f"reposition_keys knows the rotary layout of {', '.join(ROPE_ARCHS)}, not model_type {arch!r}. To add it, "
            f"check that its attention rotates the whole head dim with rotate_half (half-split layout) through "
            f"model.get_decoder().rotary_emb, add it to kvnotes.kv.ROPE_ARCHS, and extend tests/test_reposition.py's "
            f"layer-0 invariant to a tiny model of it")
    n_layers = int(cfg.num_hidden_layers)
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range for a {n_layers}-layer model")
    rotary = model.get_decoder().rotary_emb
    if isinstance(rotary.rope_type, dict):        # one rotary module, per-layer-type parameters (Gemma-3)
        layer_type = cfg.layer_types[layer]
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
        rope_type = rotary.rope_type.get(layer_type)
        scaling = getattr(rotary, f"{layer_type}_attention_scaling", None)
    else:
        layer_type, inv_freq, rope_type, scaling = None, rotary.inv_freq, rotary.rope_type, rotary.attention_scaling
    if inv_freq is None:
        raise UnsupportedRopeError(f"layer {layer} ({layer_type}) has no rotary parameters (a NoPE layer): its keys "
                                   f"carry no position; skip the layer instead of repositioning it")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedRopeError(
            f"layer {layer}: rope_type {rope_type!r} is not a position-independent rotation (reposition_keys handles "
            f"{', '.join(ROPE_TYPES)}); its frequencies depend on the sequence length, so a shifted key is not the "
            f"key a prefill at the target position writes. Pin the model to a supported rope_type or re-prefill")
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if 2 * inv_freq.numel() != d_head:
        raise UnsupportedRopeError(
            f"layer {layer}: the rotary dim ({2 * inv_freq.numel()}) is not the head dim ({d_head}): partial rotary "
            f"is not handled; rotate keys[..., :{2 * inv_freq.numel()}] only and pass the rest through")
    return RopeLayer(layer, layer_type, rope_type, inv_freq.detach().float(), float(scaling))


def _as_positions(x, n: int, what: str) -> torch.Tensor:
    pos = torch.as_tensor(x, dtype=torch.long).reshape(-1)
    if pos.numel() == 1:
        pos = pos.expand(n)
    if pos.numel() != n:
        raise ValueError(f"{what} has {pos.numel()} positions for {n} keys: give one per key (or one for all)")
    if len(pos) and pos.min() < 0:
        raise ValueError(f"{what} must be absolute token positions >= 0, got {pos.min().item()}")
    return pos


def reposition_keys(model, keys: torch.Tensor, layer: int, from_positions, to_positions) -> torch.Tensor:
    """Post-RoPE cached keys of decoder layer `layer`, computed at absolute positions `from_positions`, rotated to
    be the keys a prefill at `to_positions` writes (values need nothing: they carry no position).

    keys: `[batch, n_kv_heads, seq, d_head]` (any float dtype; the result has the same shape and dtype);
    from_positions / to_positions: `[seq]` absolute token positions (ints), or one int for every key.

    The rotation is the model's own (`rope_layer`: per layer, so Gemma-3's sliding layers use the local base and
    its global layers the global one). Angles are formed as transformers forms them, fl32(position * inv_freq) in
    fp32, and differenced in float64: R(fl32(q w) - fl32(p w)) applied to a key rotated by fl32(p w) gives the key
    rotated by fl32(q w), the angle a prefill at q uses, up to fp32 rounding of cos/sin and of the product (a few
    ulp of |key|) rather than up to the fp32 angle error of |q - p| w. The rotation runs in fp32 and is cast to the
    keys' dtype once. transformers multiplies cos/sin by `attention_scaling` (YaRN's mscale): that factor is already
    in the cached keys and a rotation keeps norms, so it is not applied again (applying it on an un-rotate and a
    re-rotate would scale keys by m^2; edit_compose_spec §3.2). A shift of 0 returns the keys unchanged (cos 1,
    sin 0 exactly).

    Raises UnsupportedRopeError (see `rope_layer`), ValueError for positions that do not match the keys.
    paper_spec §3.13 (D4 donors from other prompts), edit_compose_spec §3.2-3.3.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be [batch, n_kv_heads, seq, d_head], got shape {tuple(keys.shape)}")
    rope = rope_layer(model, layer)
    n, d = keys.shape[-2], keys.shape[-1]
    if 2 * rope.inv_freq.numel() != d:
        raise ValueError(f"keys have head dim {d}, layer {layer}'s rotary dim is {2 * rope.inv_freq.numel()}")
    src = _as_positions(from_positions, n, "from_positions")
    dst = _as_positions(to_positions, n, "to_positions")
    w = rope.inv_freq.to(keys.device)
    # fl32(q w) - fl32(p w), exact in float64 (both terms are fp32 numbers)
    angle = (dst.to(w.device, torch.float32)[:, None] * w).double() - (src.to(w.device, torch.float32)[:, None] * w)
    cos, sin = angle.cos().float(), angle.sin().float()            # [seq, d/2]
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)   # [seq, d]: half-split layout
    k = keys.float()
    half = d // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)       # transformers' rotate_half
    return (k * cos + rot * sin).to(keys.dtype)


def splice_mapped(model, base, donor, mapping, layers: Sequence[int] | None = None, which: str = "KV"):
    """A copy of `base` whose K and/or V at recipient positions q come from `donor` at positions p, for each (q, p)
    of `mapping` ({q: p} or pairs), keys repositioned from p to q (`reposition_keys`, per layer), values copied.

    Unlike `splice`, the caches may differ in length: this is a splice of notes from another prompt (paper_spec
    §3.13 D4). Nothing is recomputed. A q outside a layer's stored (sliding) window in `base` is skipped there (the
    decode step cannot see it); a p outside the donor's stored window is an IndexError: prefill the donor into a
    cache that stores every position (`prefill(model, ids, past=transformers.DynamicCache())`). With p == q for
    every pair the result equals `splice(base, donor, qs)` exactly.

    Raises ValueError for a bad `which` or a q mapped twice, IndexError for positions outside the caches,
    UnsupportedRopeError for a model `reposition_keys` cannot shift (when keys are spliced)."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    pairs = sorted((int(q), int(p)) for q, p in (mapping.items() if hasattr(mapping, "items") else mapping))
    qs = torch.as_tensor([q for q, _ in pairs], dtype=torch.long)
    ps = torch.as_tensor([p for _, p in pairs], dtype=torch.long)
    if len(qs) != len(set(qs.tolist())):
        raise ValueError("a recipient position is mapped to two donor positions; give each q one p")
    n_base, n_donor = cache_length(base), cache_length(donor)
    if len(qs) and (qs.min() < 0 or qs.max() >= n_base):
        raise IndexError(f"recipient positions must lie in [0, {n_base}), got {qs.min().item()}..{qs.max().item()}")
    if len(ps) and (ps.min() < 0 or ps.max() >= n_donor):
        raise IndexError(f"donor positions must lie in [0, {n_donor}), got {ps.min().item()}..{ps.max().item()}")
    out = copy.deepcopy(base)
    for li in (range(len(out.layers)) if layers is None else layers):
        lo, ld = out.layers[li], donor.layers[li]
        keep = qs >= _layer_offset(lo)
        q, p = qs[keep], ps[keep]
        if len(q) == 0:
            continue
        off_d = _layer_offset(ld)
        if p.min() < off_d:
            raise IndexError(f"layer {li}: donor position {p.min().item()} is outside the donor's stored window "
                             f"[{off_d}, {n_donor}) (a sliding-window layer); prefill the donor with "
                             f"past=transformers.DynamicCache() so that every position is stored")
        iq, ip = q - _layer_offset(lo), p - off_d
        if "K" in which:
            lo.keys[:, :, iq] = reposition_keys(model, ld.keys[:, :, ip], li, p, q)
        if "V" in which:
            lo.values[:, :, iq] = ld.values[:, :, ip]
    return out
