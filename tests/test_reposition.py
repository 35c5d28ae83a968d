"""RoPE repositioning of cached keys (kvnotes.kv.reposition_keys, splice_mapped) on the tiny models, fp32 and bf16.

The invariant that makes a repositioned key trustworthy: at the FIRST layer a key depends only on its token and its
position (embedding, norm, k_proj, q/k-norm, RoPE), so the first-layer keys of tokens prefilled after a prefix of
length d equal the keys of the same tokens prefilled from position 0, repositioned by d. It is checked on every tiny
architecture, for Gemma-3 on a sliding (local base 1e4) first layer (tiny-gemma3) and on a global (base 1e6) first
layer (tiny-gemma3 with its two layer types swapped: built from the same config, since the tiny model's global
layer is its second, whose keys depend on the context). Every later layer is checked against the model's own
rotary module (transformers' rotary_emb + apply_rotary_pos_emb applied to the layer's pre-RoPE keys). A YaRN model
(attention_scaling m != 1) checks that m is not applied again, and the refusals name their fix.

Tolerances: a repositioned key and a native one differ by fp32 rounding of the rotation (observed <= 2 ulp of
|K|: 6e-8 on llama/qwen2 keys of magnitude ~0.6, 5e-7 on Gemma-3's normed keys ~3); each equality is paired with a
check that the unrepositioned keys differ by far more.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvnotes import kv
from kvnotes.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

KV_TOL = 1e-6        # per unit of key magnitude (fp32)
BF16_TOL = 2 ** -7   # two bf16 roundings (one per shift), relative to the key magnitude
DIFFERENT = 1e-2     # how far an unshifted / wrongly rotated key must be off for a check to be able to fail
SHIFTS = (1, 23, 24, 25, 301)   # around tiny-gemma3's window of 24, and a long one


def max_abs(x, y) -> float:
    return float((x.float() - y.float()).abs().max())


def close(x, ref, tol=KV_TOL) -> bool:
    return max_abs(x, ref) <= tol * max(1.0, float(ref.abs().max()))


def full_prefill(model, ids):
    """A cache storing every position on every layer (sliding ones too): no position falls out of a window."""
    return kv.prefill(model, ids, past=DynamicCache())


def tokens(lm, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, len(lm.tokenizer), (n,), generator=g)


def variant(name: str, **config):
    """A tiny model of `name`'s architecture with config fields replaced (seeded like the registry's)."""
    cfg = copy.deepcopy(load_model(name).model.config)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def first_layer_shift_error(model, ids, d: int, layer_for_rotation: int = 0) -> tuple[float, float, float]:
    """(|repositioned - native|, |unshifted - native|, |native|) of layer-0 keys of `ids` prefilled after d tokens vs
    from position 0, the repositioning using `layer_for_rotation`'s rotary parameters."""
    prefix = torch.randint(10, 60, (d,), generator=torch.Generator().manual_seed(d))
    native = full_prefill(model, torch.cat([prefix, ids])).layers[0].keys[:, :, d:]
    at_zero = full_prefill(model, ids).layers[0].keys
    pos = torch.arange(len(ids))
    moved = kv.reposition_keys(model, at_zero, layer_for_rotation, pos, pos + d)
    return max_abs(moved, native), max_abs(at_zero, native), float(native.abs().max())


# ---------------------------------------------------------------- the first-layer invariant
@pytest.mark.parametrize("d", SHIFTS)
def test_first_layer_keys_after_a_prefix_are_the_repositioned_keys(tiny, d):
    model = tiny.model
    err, unshifted, scale = first_layer_shift_error(model, tokens(tiny, 60), d)
    assert err <= KV_TOL * max(1.0, scale), f"{tiny.spec['name']}: layer-0 keys shifted by {d} off by {err}"
    assert unshifted > DIFFERENT          # position matters, so the equality is not between two unrotated copies


def test_gemma3_first_layer_invariant_on_a_sliding_and_a_global_layer(tiny_by_name):
    lm = tiny_by_name("tiny-gemma3")
    ids = tokens(lm, 60)
    sliding = lm.model
    glob = variant("tiny-gemma3", layer_types=["full_attention", "sliding_attention"])
    assert kv.rope_layer(sliding, 0).layer_type == "sliding_attention"
    assert kv.rope_layer(glob, 0).layer_type == "full_attention"
    # the two layer types really rotate differently: local base 1e4, global 1e6 (w_1 = base^(-2/d_head))
    w_local, w_global = kv.rope_layer(sliding, 0).inv_freq, kv.rope_layer(sliding, 1).inv_freq
    d_head = 2 * w_local.numel()
    assert float(w_local[1]) == pytest.approx(1e4 ** (-2 / d_head)) and float(w_global[1]) == pytest.approx(
        1e6 ** (-2 / d_head))
    for model, wrong_layer in ((sliding, 1), (glob, 1)):
        for d in SHIFTS:
            err, _, scale = first_layer_shift_error(model, ids, d)
            assert err <= KV_TOL * max(1.0, scale), f"layer type {kv.rope_layer(model, 0).layer_type}, shift {d}"
        # rotating with the other layer type's frequencies (one rotary for all layers) is far off
        wrong, _, _ = first_layer_shift_error(model, ids, 301, layer_for_rotation=wrong_layer)
        assert wrong > DIFFERENT


def test_yarn_attention_scaling_is_not_applied_twice():
    """YaRN bakes m = 0.1 ln(factor) + 1 into cos/sin, so the cached keys carry it once; a shift must keep it once
    (un-rotating and re-rotating with the scaled cos/sin would scale keys by m^2 = 1.30 here)."""
    model = variant("tiny-llama", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 1024})
    rope = kv.rope_layer(model, 0)
    assert rope.rope_type == "yarn" and rope.attention_scaling == pytest.approx(1 + 0.1 * torch.log(
        torch.tensor(4.0)).item())
    ids = torch.randint(10, 200, (40,), generator=torch.Generator().manual_seed(1))
    for d in (5, 301):
        err, unshifted, scale = first_layer_shift_error(model, ids, d)
        assert err <= KV_TOL * max(1.0, scale) and unshifted > DIFFERENT
    # the double-scaled shift is measurably wrong (the check above can tell)
    at_zero = full_prefill(model, ids).layers[0].keys
    assert max_abs(kv.reposition_keys(model, at_zero, 0, 0, 5) * rope.attention_scaling ** 2,
                   kv.reposition_keys(model, at_zero, 0, 0, 5)) > DIFFERENT


# ---------------------------------------------------------------- every layer against the model's own rotary
def _pre_rope_keys(model, ids) -> dict:
    """{layer: keys [1, kvh, seq, d] before RoPE} of a plain forward (k_norm output on Gemma-3, k_proj otherwise)."""
    out, handles = {}, []
    for li, layer in enumerate(model.get_decoder().layers):
        attn = layer.self_attn
        if hasattr(attn, "k_norm"):
            hook = (lambda li: lambda m, a, o: out.__setitem__(li, o.detach().clone()))(li)
            handles.append(attn.k_norm.register_forward_hook(hook))
        else:
            def hook(m, a, o, li=li, d=attn.head_dim):
                out[li] = o.detach().view(*o.shape[:-1], -1, d).transpose(1, 2).clone()
            handles.append(attn.k_proj.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def test_every_layer_matches_the_models_own_rotary(tiny):
    """Layer by layer (Gemma-3's global layer included): a cached key at p repositioned to q equals transformers'
    own rotary embedding (cos/sin at q, attention_scaling included) applied to that layer's pre-RoPE key."""
    import importlib
    model = tiny.model
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}[tiny.spec["arch"]]
    modeling = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    ids = tokens(tiny, 50)
    cache = full_prefill(model, ids)
    pre = _pre_rope_keys(model, ids)
    rotary = model.get_decoder().rotary_emb
    n = len(ids)
    for li, layer in enumerate(cache.layers):
        stored = layer.keys
        # sanity: the hook sees what the cache stores (rotated at its own positions 0..n-1)
        own = kv.reposition_keys(model, stored, li, torch.arange(n), torch.arange(n))
        assert torch.equal(own, stored)
        for d in (3, 417):
            q = torch.arange(n) + d
            args = (pre[li], q[None]) + ((model.config.layer_types[li],) if arch == "gemma3" else ())
            cos, sin = rotary(*args)
            _, want = modeling.apply_rotary_pos_emb(pre[li], pre[li], cos, sin)
            got = kv.reposition_keys(model, stored, li, torch.arange(n), q)
            assert close(got, want), f"layer {li}, shift {d}: {max_abs(got, want)}"
            assert max_abs(stored, want) > DIFFERENT


# ---------------------------------------------------------------- algebra, dtypes
def test_shift_by_zero_is_a_no_op_and_a_shift_and_back_is_the_identity(tiny):
    model = tiny.model
    cache = full_prefill(model, tokens(tiny, 40))
    n = kv.cache_length(cache)
    pos = torch.arange(n)
    for li, layer in enumerate(cache.layers):
        k = layer.keys
        assert torch.equal(kv.reposition_keys(model, k, li, pos, pos), k)          # exactly: cos 1, sin 0
        assert torch.equal(kv.reposition_keys(model, k, li, 7, 7), k)
        for d in (1, 24, 1000):
            there = kv.reposition_keys(model, k, li, pos, pos + d)
            back = kv.reposition_keys(model, there, li, pos + d, pos)
            assert close(back, k), f"layer {li}, shift {d}"
            assert max_abs(there, k) > DIFFERENT
        # per-key shifts: each key moves by its own delta
        deltas = torch.arange(n) * 3
        mixed = kv.reposition_keys(model, k, li, pos, pos + deltas)
        for j in (0, 5, n - 1):
            one = kv.reposition_keys(model, k[:, :, j:j + 1], li, j, j + int(deltas[j]))
            assert torch.equal(mixed[:, :, j:j + 1], one)


def test_bf16_keys_stay_bf16_and_round_trip_within_two_roundings(tiny):
    model = tiny.model
    k = full_prefill(model, tokens(tiny, 30)).layers[0].keys.to(torch.bfloat16)
    pos = torch.arange(k.shape[-2])
    assert torch.equal(kv.reposition_keys(model, k, 0, pos, pos), k)
    there = kv.reposition_keys(model, k, 0, pos, pos + 100)
    assert there.dtype == torch.bfloat16
    back = kv.reposition_keys(model, there, 0, pos + 100, pos)
    assert close(back, k, BF16_TOL) and max_abs(there, k) > DIFFERENT
    # the rotation itself runs in fp32: the bf16 result is the fp32 result rounded once
    ref = kv.reposition_keys(model, k.float(), 0, pos, pos + 100).to(torch.bfloat16)
    assert torch.equal(there, ref)


# ---------------------------------------------------------------- splice_mapped
def test_splice_mapped_at_delta_zero_equals_the_plain_splice(tiny, case):
    c = case(tiny, "short")
    for positions in (range(c.a, c.d), range(c.b, c.d), [c.a, c.d - 1]):
        for which in kv.WHICH:
            plain = kv.splice(c.stale, c.oracle, positions, which=which)
            mapped = kv.splice_mapped(c.model, c.stale, c.oracle, {p: p for p in positions}, which=which)
            for li, (lp, lm_) in enumerate(zip(plain.layers, mapped.layers)):
                assert torch.equal(lp.keys, lm_.keys) and torch.equal(lp.values, lm_.values), f"layer {li} {which}"
    moved = kv.splice_mapped(c.model, c.stale, c.oracle, {c.d - 1: c.d - 2})    # a real shift changes the keys
    assert max_abs(moved.layers[0].keys[:, :, -1], c.stale.layers[0].keys[:, :, -1]) > DIFFERENT


def test_splice_mapped_moves_notes_between_prompts_of_different_lengths(tiny):
    """Donor: prefix B (length 9) + notes; recipient: prefix A (length 30) + the same notes. Splicing the donor's
    notes to the recipient's positions gives, on the first layer, the recipient's own keys and values (the notes'
    tokens at the recipient's positions): K repositioned, V copied."""
    model = tiny.model
    notes = tokens(tiny, 20, seed=3)
    recipient = full_prefill(model, torch.cat([tokens(tiny, 30, seed=1), notes]))
    donor = full_prefill(model, torch.cat([tokens(tiny, 9, seed=2), notes]))
    mapping = {30 + j: 9 + j for j in range(20)}
    blank = kv.splice(recipient, recipient, [])
    for layer in blank.layers:                  # start from zeros so that only what was spliced can match
        layer.keys.zero_()
        layer.values.zero_()
    out = kv.splice_mapped(model, blank, donor, mapping)
    got, want = out.layers[0], recipient.layers[0]
    assert close(got.keys[:, :, 30:], want.keys[:, :, 30:])
    assert close(got.values[:, :, 30:], want.values[:, :, 30:])
    assert max_abs(donor.layers[0].keys[:, :, 9:], want.keys[:, :, 30:]) > DIFFERENT     # unshifted: wrong
    assert float(got.keys[:, :, :30].abs().max()) == 0                                   # nothing else written
    unchanged = kv.splice_mapped(model, blank, donor, mapping, which="V")
    assert float(unchanged.layers[0].keys.abs().max()) == 0


def test_splice_mapped_on_sliding_layers(tiny_by_name):
    """Gemma-3: a recipient position outside its sliding layer's stored window is skipped there; a donor position
    outside the donor's stored window is an error naming the fix (store every position)."""
    lm = tiny_by_name("tiny-gemma3")
    model = lm.model
    ids = tokens(lm, 80)
    windowed = kv.prefill(model, ids)                     # layer 0 stores the last 23 positions
    full = full_prefill(model, ids)
    off = kv._layer_offset(windowed.layers[0])
    assert off > 0 and kv._layer_offset(full.layers[0]) == 0
    out = kv.splice_mapped(model, windowed, full, {5: 5, 79: 70})
    assert torch.equal(out.layers[0].values[:, :, 79 - off], full.layers[0].values[:, :, 70])
    assert torch.equal(out.layers[1].values[:, :, 5], full.layers[1].values[:, :, 5])
    assert out.layers[0].keys.shape == windowed.layers[0].keys.shape
    with pytest.raises(IndexError, match="DynamicCache"):
        kv.splice_mapped(model, full, windowed, {70: 10})


# ---------------------------------------------------------------- refusals
def test_unsupported_rotary_is_refused_naming_the_fix(tiny_by_name):
    dynamic = variant("tiny-llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    k = torch.zeros(1, 2, 3, 16)
    with pytest.raises(kv.UnsupportedRopeError, match=r"rope_type 'dynamic'.*Pin the model"):
        kv.reposition_keys(dynamic, k, 0, 0, 1)
    stub = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gptj"))
    with pytest.raises(kv.UnsupportedRopeError, match=r"'gptj'.*ROPE_ARCHS.*test_reposition"):
        kv.reposition_keys(stub, k, 0, 0, 1)
    model = tiny_by_name("tiny-llama").model
    with pytest.raises(IndexError):
        kv.rope_layer(model, 2)
    with pytest.raises(ValueError, match="one per key"):
        kv.reposition_keys(model, k, 0, [0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match=r"\[batch, n_kv_heads, seq, d_head\]"):
        kv.reposition_keys(model, k[0], 0, 0, 1)
    with pytest.raises(ValueError, match="two donor positions"):
        c = full_prefill(model, torch.arange(10, 20))
        kv.splice_mapped(model, c, c, [(3, 4), (3, 5)])
