"""kvnotes.kv on the tiny models (fp32): prefill / splice / stack / decode against paper_spec §9.4 I1-I4.

Three cases per architecture:
  diverse   order_cancel/000, ~130 tokens, one-token field near the end;
  family_a  account_role/000, ~830 tokens, three-token field near the start (longer than Gemma-3's window of 24,
            so the sliding-window layer holds only the last 23 positions and the field is outside it);
  short     the diverse pair cut to b + 8 tokens, so the field lies inside Gemma-3's sliding window and the
            splice's absolute-to-stored index arithmetic is exercised on a sliding layer.
Positions in a layer's stored K/V are located independently of kvnotes.kv: a cache of n tokens whose layer stores
s of them holds absolute positions [n - s, n).
"""
from __future__ import annotations

import pytest
import torch

from conftest import snapshot  # noqa: E402  (shared with the Case fixture)
from kvnotes import kv

pytestmark = pytest.mark.usefixtures("single_thread")

LOGIT_TOL = 1e-5
KV_TOL = 1e-6       # per unit of magnitude: Gemma-3's normed keys reach |K| ~ 2.4, where fp32 rounding of a
                    # 3-token vs an 800-token chunk differs by ~4 ulp (1.1e-6); llama/qwen2 differ by <= 2e-7
DIFFERENT = 1e-4    # how far two genuinely different states must be apart for a check to be able to fail


def max_abs(x, y) -> float:
    return float((x.float() - y.float()).abs().max())


def kv_close(x, ref) -> bool:
    """max |x - ref| <= KV_TOL, scaled by the tensor's magnitude when that exceeds 1."""
    return max_abs(x, ref) <= KV_TOL * max(1.0, float(ref.abs().max()))


def assert_unchanged(cache, snap):
    n, tensors = snap
    assert kv.cache_length(cache) == n
    assert len(cache.layers) == len(tensors)
    for layer, (k, v) in zip(cache.layers, tensors):
        assert layer.keys.shape == k.shape and torch.equal(layer.keys, k)
        assert layer.values.shape == v.shape and torch.equal(layer.values, v)


def offset(layer, n_tokens: int) -> int:
    """Absolute position of index 0 of `layer`'s stored K/V in a cache of `n_tokens` tokens."""
    return n_tokens - layer.keys.shape[-2]


def reference_splice(base, source, n_tokens, positions, layers=None, which="KV"):
    """[(keys, values)] per layer of what a cache-state splice must produce, built tensor by tensor."""
    out = []
    for li, (lb, ls) in enumerate(zip(base.layers, source.layers)):
        k, v = lb.keys.clone(), lb.values.clone()
        if layers is None or li in layers:
            off = offset(lb, n_tokens)
            for p in positions:
                if p - off >= 0:
                    if "K" in which:
                        k[:, :, p - off] = ls.keys[:, :, p - off]
                    if "V" in which:
                        v[:, :, p - off] = ls.values[:, :, p - off]
        out.append((k, v))
    return out


def assert_cache_equals(cache, expected):
    assert len(cache.layers) == len(expected)
    for li, (layer, (k, v)) in enumerate(zip(cache.layers, expected)):
        assert torch.equal(layer.keys, k), f"layer {li}: keys differ from the expected splice"
        assert torch.equal(layer.values, v), f"layer {li}: values differ from the expected splice"




# ---------------------------------------------------------------- I1: decode step == full forward
@pytest.mark.parametrize("name", ["diverse", "family_a"])
def test_I1_decode_equals_full_forward(tiny, name, case):
    c = case(tiny, name)
    cache = kv.prefill(c.model, c.old[:-1])
    assert kv.cache_length(cache) == c.d
    if c.is_gemma and name == "family_a":   # the long prompt really runs through a sliding-window cache layer
        assert type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"
        assert cache.layers[0].keys.shape[-2] < c.d
    logits = kv.decode(c.model, [cache], c.last)
    assert logits.dtype == torch.float32 and logits.shape == (1, c.full_old.shape[0])
    assert max_abs(logits[0], c.full_old) <= LOGIT_TOL


@pytest.mark.parametrize("name", ["diverse", "family_a", "short"])
def test_I1_shared_prefix_continuation_equals_full_forward(tiny, name, case):
    c = case(tiny, name)
    assert kv.cache_length(c.stale) == c.d and kv.cache_length(c.oracle) == c.d
    stale, oracle = c.decoded
    assert max_abs(stale, c.full_old) <= LOGIT_TOL
    assert max_abs(oracle, c.full_new) <= LOGIT_TOL
    # the two arms are genuinely different, so the tolerance can tell a wrong cache from a right one
    assert max_abs(c.full_old, c.full_new) > DIFFERENT


@pytest.mark.parametrize("name", ["diverse", "family_a"])
def test_prefill_with_past_leaves_past_unmodified(tiny, name, case):
    c = case(tiny, name)
    pre = c.pre
    _ = c.stale, c.oracle              # two continuations from the same prefix cache
    assert kv.cache_length(pre) == c.a
    assert_unchanged(pre, c.pre_snapshot)


def test_I1_every_split_point(tiny, case):
    """Continuing from a prefix of any length (below, at and beyond Gemma-3's window of 24) changes nothing."""
    c = case(tiny, "diverse")
    ids = c.old
    for split in (1, 5, 22, 23, 24, 25, c.a, c.d - 1):
        past = kv.prefill(c.model, ids[:split])
        cache = kv.prefill(c.model, ids[split:-1], past=past)
        assert kv.cache_length(cache) == c.d
        assert max_abs(kv.decode(c.model, [cache], c.last)[0], c.full_old) <= LOGIT_TOL, f"split at {split}"
    # three chunks
    cache = kv.prefill(c.model, ids[:10])
    cache = kv.prefill(c.model, ids[10:40], past=cache)
    cache = kv.prefill(c.model, ids[40:-1], past=cache)
    assert max_abs(kv.decode(c.model, [cache], c.last)[0], c.full_old) <= LOGIT_TOL


# ---------------------------------------------------------------- I2: full-downstream splice == source
@pytest.mark.parametrize("name", ["diverse", "family_a", "short"])
def test_I2_full_downstream_splice_reproduces_source_sanity_by_construction(tiny, name, case):
    c = case(tiny, name)
    spliced = kv.splice(c.stale, c.oracle, range(c.a, c.d))
    logits = kv.decode(c.model, [spliced], c.last)[0]
    stale, oracle = c.decoded
    assert max_abs(logits, oracle) <= LOGIT_TOL
    assert max_abs(stale, oracle) > DIFFERENT        # the splice had something to do


# ---------------------------------------------------------------- I3: splice(c, c, P) == c
@pytest.mark.parametrize("name", ["diverse", "short"])
def test_I3_self_splice_is_a_no_op(tiny, name, case):
    c = case(tiny, name)
    cache = c.stale
    ref_logits = kv.decode(c.model, [cache], c.last)[0]
    snap = snapshot(cache)
    position_sets = [[], [0], range(c.a, c.b), range(c.a, c.d), range(c.d), [c.d - 1, 3, 3, c.a],
                     torch.arange(c.d)[::7].tolist()]
    for positions in position_sets:
        for which in kv.WHICH:
            for layers in (None, [0], [len(cache.layers) - 1]):
                out = kv.splice(cache, cache, positions, layers=layers, which=which)
                assert out is not cache
                assert_unchanged(out, snap)
    out = kv.splice(cache, cache, range(c.d))
    assert torch.equal(kv.decode(c.model, [out], c.last)[0], ref_logits)
    assert_unchanged(cache, snap)


@pytest.mark.parametrize("which", kv.WHICH)
def test_splice_does_not_mutate_its_inputs(tiny, which, case):
    c = case(tiny, "short")
    base, source = c.stale, c.oracle
    snap_b, snap_s = snapshot(base), snapshot(source)
    out = kv.splice(base, source, range(c.a, c.d), which=which)
    assert_unchanged(base, snap_b)
    assert_unchanged(source, snap_s)
    # and the result does not share storage with the base: editing it leaves the base alone
    for layer in out.layers:
        layer.keys.add_(1.0)
        layer.values.add_(1.0)
    assert_unchanged(base, snap_b)
    assert_unchanged(source, snap_s)


# ---------------------------------------------------------------- I4: field copy == in-place recompute
@pytest.mark.parametrize("name", ["diverse", "family_a", "short"])
def test_I4_field_splice_equals_recompute_against_prefix_and_freezes_downstream(tiny, name, case):
    c = case(tiny, name)
    a, b, d = c.a, c.b, c.d
    spliced = kv.splice(c.stale, c.oracle, range(a, b))
    recomputed = kv.prefill(c.model, c.new[a:b], past=c.pre)
    assert kv.cache_length(spliced) == d and kv.cache_length(recomputed) == b

    compared = {}
    field_moved = downstream_differs = False
    for li, (ls, lr, lo, ln) in enumerate(zip(spliced.layers, recomputed.layers, c.stale.layers, c.oracle.layers)):
        off_s, off_r = offset(ls, d), offset(lr, b)
        assert off_s == offset(lo, d)
        compared[li] = 0
        for p in range(a, b):
            if p < off_s or p < off_r:
                continue            # not stored on this (sliding-window) layer
            i, j = p - off_s, p - off_r
            assert kv_close(ls.keys[:, :, i], lr.keys[:, :, j]), f"layer {li} K at {p}"
            assert kv_close(ls.values[:, :, i], lr.values[:, :, j]), f"layer {li} V at {p}"
            field_moved |= max_abs(ls.keys[:, :, i], lo.keys[:, :, i]) > DIFFERENT
            compared[li] += 1
        # frozen downstream: every position >= b is the OLD cache's, bit for bit
        lo_idx = max(b - off_s, 0)
        assert torch.equal(ls.keys[:, :, lo_idx:], lo.keys[:, :, lo_idx:]), f"layer {li}: downstream K moved"
        assert torch.equal(ls.values[:, :, lo_idx:], lo.values[:, :, lo_idx:]), f"layer {li}: downstream V moved"
        downstream_differs |= max_abs(ln.keys[:, :, lo_idx:], lo.keys[:, :, lo_idx:]) > DIFFERENT
        # the prefix is untouched too
        hi_idx = max(a - off_s, 0)
        assert torch.equal(ls.keys[:, :, :hi_idx], lo.keys[:, :, :hi_idx])
        assert torch.equal(ls.values[:, :, :hi_idx], lo.values[:, :, :hi_idx])

    for li, layer in enumerate(spliced.layers):
        if not getattr(layer, "is_sliding", False):
            assert compared[li] == b - a, f"full-attention layer {li}: field not compared"
    if name == "short":              # the field lies inside every layer's stored window, sliding ones included
        assert all(n == b - a for n in compared.values())
    assert field_moved               # the field's K really changed (else the comparison proves nothing)
    assert downstream_differs        # the new prefill's downstream differs: freezing it is a real constraint


# ---------------------------------------------------------------- which / layers select exactly what they name
@pytest.mark.parametrize("which", ["K", "V", "KV"])
def test_which_changes_only_keys_or_values(tiny, which, case):
    c = case(tiny, "short")
    positions = range(c.a, c.b)
    out = kv.splice(c.stale, c.oracle, positions, which=which)
    assert_cache_equals(out, reference_splice(c.stale, c.oracle, c.d, positions, which=which))
    keys_moved = any(max_abs(lo.keys, ls.keys) > DIFFERENT for lo, ls in zip(out.layers, c.stale.layers))
    values_moved = any(max_abs(lo.values, ls.values) > DIFFERENT for lo, ls in zip(out.layers, c.stale.layers))
    assert keys_moved == ("K" in which)
    assert values_moved == ("V" in which)


@pytest.mark.parametrize("layer", [0, 1])
def test_layers_changes_only_the_named_layer(tiny, layer, case):
    c = case(tiny, "short")
    positions = range(c.a, c.d)
    out = kv.splice(c.stale, c.oracle, positions, layers=[layer])
    assert_cache_equals(out, reference_splice(c.stale, c.oracle, c.d, positions, layers=[layer]))
    for li, (lo, ls) in enumerate(zip(out.layers, c.stale.layers)):
        moved = max_abs(lo.keys, ls.keys) > DIFFERENT or max_abs(lo.values, ls.values) > DIFFERENT
        assert moved == (li == layer), f"layer {li}"


def test_field_splice_inside_sliding_window_matches_reference(tiny, case):
    """All-layer field splice, checked tensor by tensor against positions located independently of kv.py."""
    c = case(tiny, "short")
    for positions in (range(c.a, c.b), range(c.a, c.d), [c.d - 1], [0, c.b, c.d - 2]):
        out = kv.splice(c.stale, c.oracle, positions)
        assert_cache_equals(out, reference_splice(c.stale, c.oracle, c.d, list(positions)))


# ---------------------------------------------------------------- batched decode
def test_batched_decode_equals_decoding_each_alone(tiny, case):
    c = case(tiny, "short")
    caches = [c.stale, c.oracle, kv.splice(c.stale, c.oracle, range(c.a, c.b)),
              kv.splice(c.stale, c.oracle, range(c.b, c.d), which="V")]
    snaps = [snapshot(x) for x in caches]
    alone = torch.stack([kv.decode(c.model, [x], c.last)[0] for x in caches])
    for batch_size in (16, 3, 1):
        batched = kv.decode(c.model, caches, c.last, batch_size=batch_size)
        assert batched.shape == alone.shape and batched.dtype == torch.float32
        assert max_abs(batched, alone) <= LOGIT_TOL, f"batch_size={batch_size}"
    assert max_abs(alone[0], alone[1]) > DIFFERENT     # rows are different: a row mix-up would be caught
    for x, s in zip(caches, snaps):                    # decode leaves its caches as they were
        assert_unchanged(x, s)


def test_decode_repeated_on_the_same_cache_is_stable(tiny, case):
    c = case(tiny, "diverse")
    first = kv.decode(c.model, [c.stale], c.last)
    second = kv.decode(c.model, [c.stale, c.stale], c.last)
    assert max_abs(second[0], first[0]) <= LOGIT_TOL and max_abs(second[1], first[0]) <= LOGIT_TOL


# ---------------------------------------------------------------- errors
def test_splice_of_caches_of_different_lengths_raises(tiny, case):
    c = case(tiny, "diverse")
    short = kv.prefill(c.model, c.old[:10])
    longer = kv.prefill(c.model, c.old[:11])
    with pytest.raises(ValueError, match="different lengths"):
        kv.splice(short, longer, [0])
    with pytest.raises(ValueError, match="different lengths"):
        kv.splice(longer, short, [0])
    with pytest.raises(ValueError):
        kv.stack([short, longer])


@pytest.mark.parametrize("bad", [[10], [-1], [0, 3, 10], [100]])
def test_splice_position_out_of_range_raises(tiny, bad, case):
    c = case(tiny, "diverse")
    cache = kv.prefill(c.model, c.old[:10])
    with pytest.raises(IndexError):
        kv.splice(cache, cache, bad)


@pytest.mark.parametrize("which", ["k", "QK", "", "KVK", None])
def test_splice_bad_which_raises(tiny, which, case):
    c = case(tiny, "diverse")
    cache = kv.prefill(c.model, c.old[:10])
    with pytest.raises(ValueError):
        kv.splice(cache, cache, [0], which=which)
