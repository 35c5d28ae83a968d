"""The batched splice engine and the frozen full forward against the materialised path (kv.splice + kv.decode).

The engine must give, for every splice of a mixed batch (single and multi-position, layer subsets, K-only, V-only,
KV-head subsets, empty, no-op, outside a sliding window; shuffled; across chunk boundaries), the logits of decoding
that splice's materialised cache one at a time. Bitwise equality is not the contract: the engine forms the same sums
in another order (a shared GEMM over the base keys, edited entries added back), and BLAS blocks a 1-row and an
n-row product differently, so agreement is to fp32 rounding (observed <= 4e-7 on logits of magnitude ~1).
Every comparison is paired with a check that the splices move the logits by far more than the tolerance.
"""
from __future__ import annotations

import random

import pytest
import torch

from kvnotes import kv
from kvnotes.engine import Splice, SpliceEngine

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 2e-6          # engine vs materialised decode, fp32 logits


def max_abs(x, y) -> float:
    return float((x.float() - y.float()).abs().max())


def materialised(stale, oracle, sp: Splice):
    """The spliced cache, built tensor by tensor (KV-head subsets included), independently of the engine."""
    out = kv.splice(stale, stale, [])
    for li in (range(len(out.layers)) if sp.layers is None else sp.layers):
        lo, ls = out.layers[li], oracle.layers[li]
        off = kv._layer_offset(lo)
        heads = range(lo.keys.shape[1]) if sp.kv_heads is None else sp.kv_heads
        for p in sp.positions:
            if p - off < 0:
                continue
            for h in heads:
                if "K" in sp.which:
                    lo.keys[0, h, p - off] = ls.keys[0, h, p - off]
                if "V" in sp.which:
                    lo.values[0, h, p - off] = ls.values[0, h, p - off]
    return out


@pytest.fixture
def setup(tiny, case):
    def get(name):
        c = case(tiny, name)
        return c, c.stale, c.oracle
    return get


def mixed_splices(c, n_layers, n_kv, seed=0):
    rng = random.Random(seed)
    a, b, d = c.a, c.b, c.d
    sp = [Splice((p,)) for p in range(max(0, a - 2), min(d, b + 6))]            # incl. 2 no-op positions before a
    sp += [Splice((p,)) for p in rng.sample(range(b, d), min(6, d - b))]
    sp += [Splice(tuple(range(b, d))), Splice(tuple(range(a, b))), Splice(tuple(range(a, d))),
           Splice(tuple(range(a, b)), which="K"), Splice(tuple(range(a, b)), which="V"),
           Splice((a, d - 1), layers=(n_layers - 1,)), Splice(tuple(range(a, d)), layers=(0,)),
           Splice(tuple(range(a, d)), kv_heads=(n_kv - 1,)),
           Splice(tuple(rng.sample(range(a, d), min(5, d - a))), layers=(0, n_layers - 1), which="V", kv_heads=(0,)),
           Splice(()), Splice((d - 1,), layers=(n_layers - 1,), which="K")]
    rng.shuffle(sp)
    return sp


@pytest.mark.parametrize("name", ["diverse", "family_a", "short"])
def test_engine_equals_materialised_decode_on_mixed_batches(tiny, setup, name):
    c, stale, oracle = setup(name)
    n_layers, n_kv = len(stale.layers), stale.layers[0].keys.shape[1]
    splices = mixed_splices(c, n_layers, n_kv)
    got = SpliceEngine(c.model, stale, oracle, c.last, chunk_size=5).run(splices)
    ref = torch.stack([kv.decode(c.model, [materialised(stale, oracle, sp)], c.last)[0] for sp in splices])
    assert got.shape == ref.shape == (len(splices), c.model.config.vocab_size)
    assert max_abs(got, ref) <= TOL
    base = kv.decode(c.model, [stale], c.last)[0]
    full = splices.index(Splice(tuple(range(c.a, c.d))))
    assert max_abs(ref[full], base) > 20 * TOL, "the batch's splices must move the logits for equality to mean much"
    # every row is its own splice: no two distinct splices with distinct materialised logits came out swapped
    for i in range(len(splices)):
        assert int((ref - got[i]).abs().amax(1).argmin()) == i or max_abs(ref[i], got[i]) <= TOL


def test_engine_token_subset_is_the_full_vocabulary_columns(tiny, setup):
    c, stale, oracle = setup("diverse")
    splices = [Splice((p,)) for p in range(c.a, c.d)]
    eng = SpliceEngine(c.model, stale, oracle, c.last, chunk_size=16)
    full, sub = eng.run(splices), eng.run(splices, tokens=[7, 3, 11])
    assert max_abs(sub, full[:, [7, 3, 11]]) <= TOL


def test_I2_engine_full_splice_is_the_oracle_and_I3_self_splice_is_the_base(tiny, setup):
    """Sanity checks (true by construction of the semantics, not findings)."""
    c, stale, oracle = setup("diverse")
    base, source = kv.decode(c.model, [stale, oracle], c.last)
    eng = SpliceEngine(c.model, stale, oracle, c.last)
    assert max_abs(eng.run([Splice(tuple(range(c.d)))])[0], source) <= TOL
    assert max_abs(base, source) > 20 * TOL
    self_eng = SpliceEngine(c.model, stale, {"source": stale}, c.last)
    self_eng.rows_by_layer_run.zero_()
    out = self_eng.run([Splice((p,)) for p in range(c.d)] + [Splice(tuple(range(c.d)))])
    assert max_abs(out, base.expand_as(out)) <= TOL
    # every edit writes the value already there: all are dropped and only the base row runs
    assert self_eng.rows_by_layer_run.tolist() == [1] * len(stale.layers)


def test_engine_shares_the_layers_before_a_splices_first_real_edit(tiny, setup):
    """Downstream positions' layer-0 K/V do not depend on the field (layer 0 sees only its own token), so their
    single-position splices join the batch at layer 1; the field's own positions join at layer 0."""
    c, stale, oracle = setup("diverse")
    if tiny.spec["arch"] == "gemma3":
        pytest.skip("layer 0 is a sliding layer here; the field may lie outside it")
    down = list(range(c.b, c.d))
    field = list(range(c.a, c.b))
    eng = SpliceEngine(c.model, stale, oracle, c.last)
    eng.rows_by_layer_run.zero_()
    eng.run([Splice((p,)) for p in field + down])
    rows = eng.rows_by_layer_run.tolist()
    assert rows[0] == 1 + len(field)
    assert rows[1] == 1 + len(field) + len(down)


def test_engine_with_several_named_sources(tiny, setup):
    c, stale, oracle = setup("diverse")
    eng = SpliceEngine(c.model, stale, {"oracle": oracle, "stale": stale}, c.last)
    P = tuple(range(c.a, c.d))
    out = eng.run([Splice(P, source="oracle"), Splice(P, source="stale")])
    base, source = kv.decode(c.model, [stale, oracle], c.last)
    assert max_abs(out[0], source) <= TOL and max_abs(out[1], base) <= TOL


def test_engine_rejects_bad_input(tiny, setup, case):
    c, stale, oracle = setup("diverse")
    short = case(tiny, "short").stale
    with pytest.raises(ValueError, match="not aligned"):
        SpliceEngine(c.model, stale, short, c.last)
    eng = SpliceEngine(c.model, stale, oracle, c.last)
    with pytest.raises(IndexError, match="positions"):
        eng.run([Splice((c.d,))])
    with pytest.raises(IndexError, match="layers"):
        eng.run([Splice((c.a,), layers=(99,))])
    with pytest.raises(IndexError, match="kv_heads"):
        eng.run([Splice((c.a,), kv_heads=(99,))])
    with pytest.raises(KeyError, match="unknown splice source"):
        eng.run([Splice((c.a,), source="nope")])
    with pytest.raises(ValueError, match="which"):
        Splice((c.a,), which="Q")
    assert eng.run([]).shape == (0, c.model.config.vocab_size)


@pytest.mark.parametrize("name", ["diverse", "short"])
def test_frozen_full_forward_equals_the_decode_step(tiny, setup, name):
    """The TransformerLens-style path (full prompt, every cached K/V frozen) is the same intervention."""
    c, stale, oracle = setup(name)
    for P in ([c.a], list(range(c.b, c.d)), list(range(c.a, c.d))):
        spliced = kv.splice(stale, oracle, P)
        ff = kv.frozen_forward(c.model, c.old, spliced)
        assert max_abs(ff, kv.decode(c.model, [spliced], c.last)[0]) <= TOL
    # and it is not a plain forward of the base prompt: freezing the spliced K/V changes the result
    assert max_abs(kv.frozen_forward(c.model, c.old, kv.splice(stale, oracle, range(c.a, c.d))),
                   kv.full_forward_last_logits(c.model, c.old)) > 20 * TOL
    with pytest.raises(ValueError, match="needs the"):
        kv.frozen_forward(c.model, c.old[:-1], stale)


def test_frozen_forward_leaves_the_models_attention_as_it_was(tiny, setup):
    c, stale, _ = setup("diverse")
    before = c.model.config._attn_implementation
    kv.frozen_forward(c.model, c.old, stale)
    assert c.model.config._attn_implementation == before
