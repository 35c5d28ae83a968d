"""Attention knockout: the engine's mask edit against an independent decode with the knocked-out positions removed
from the cache, the attention log's bookkeeping, and the knockout probe (P6) end to end on a tiny model."""
import copy

import pytest
import torch

import run as run_module
from kvnotes import kv
from kvnotes.engine import Splice, SpliceEngine
from probes import knockout
from test_run import _cfg
from conftest import N_DIVERSE

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


def _decode_without(model, cache, positions, last, length):
    """Logits of the decode step over a cache from which `positions` were removed in every layer (keys keep their
    rotary phase, the query keeps position `length`): what masking them out of the softmax must equal."""
    keep = torch.tensor([p for p in range(length) if p not in set(positions)])
    c = copy.deepcopy(cache)
    for layer in c.layers:
        layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
    out = model(input_ids=torch.tensor([[last]]), past_key_values=c, position_ids=torch.tensor([[length]]),
                attention_mask=torch.ones(1, len(keep) + 1, dtype=torch.long), use_cache=False)
    return out.logits[0, -1].float()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_mask_equals_removing_the_positions(name, tiny_by_name, get_pair, single_thread):
    lm = tiny_by_name(name)
    pair = get_pair(lm, "diverse")
    d, (a, b) = pair.dpos, pair.span
    stale = kv.prefill(lm.model, pair.old_ids[:d])
    last = int(pair.old_ids[d])
    engine = SpliceEngine(lm.model, stale, {}, last)
    sets = [tuple(range(b, d)), (b, b + 3, d - 1), (0,)]
    got = engine.run([Splice(s, which="mask") for s in sets] + [Splice((b,), layers=(), which="mask")])
    for s, row in zip(sets, got):
        want = _decode_without(lm.model, stale, s, last, d)
        assert (row - want).abs().max() < 2e-5
        assert (row - got[-1]).abs().max() > 1e-4          # the knockout moved the logits
    base = kv.decode(lm.model, [stale], last)[0]
    assert (got[-1] - base).abs().max() < 2e-5             # a mask in no layer is a no-op


def test_attention_log_bookkeeping(tiny_by_name, get_pair, single_thread):
    lm = tiny_by_name("tiny-llama")
    pair = get_pair(lm, "diverse")
    d, (a, b) = pair.dpos, pair.span
    stale = kv.prefill(lm.model, pair.old_ids[:d])
    oracle = kv.prefill(lm.model, pair.new_ids[:d])
    engine = SpliceEngine(lm.model, stale, oracle, int(pair.old_ids[d]))
    groups = {"prefix": list(range(a)), "field": list(range(a, b)), "down": list(range(b, d))}
    logits, attn = engine.run([Splice(()), Splice(tuple(range(b, d)), which="mask"),
                               Splice(tuple(range(a, b)), layers=(1,))], attention_groups=groups)
    assert torch.allclose(logits, engine.run([Splice(()), Splice(tuple(range(b, d)), which="mask"),
                                              Splice(tuple(range(a, b)), layers=(1,))]))
    mass = attn["mass"]                                    # [3, layers, heads, 4]
    assert torch.allclose(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-5)   # groups + self cover the cache
    assert mass[1, :, :, 2].abs().max() == 0               # nothing left on the knocked-out downstream
    assert attn["kl"][0].abs().max() < 1e-6 and attn["kl"][1].min() > 0
    # a splice that edits only layer 1: its row joins there, so layer 0 reports the base row's attention
    assert torch.equal(mass[2, 0], mass[0, 0]) and attn["kl"][2, 0].abs().max() < 1e-6


def test_ablation_sources_mean_and_resample_from_outside(tiny_by_name, get_pair):
    lm = tiny_by_name("tiny-llama")
    pair = get_pair(lm, "diverse")
    d, (a, b) = pair.dpos, pair.span
    stale = kv.prefill(lm.model, pair.old_ids[:d])
    down, donors = list(range(b, d)), list(range(3, a))
    src = knockout.ablation_sources(stale, down, donors, "seed")
    for li, layer in enumerate(stale.layers):
        mk, rk = src["mean"].layers[li].keys, src["resample"].layers[li].keys
        assert torch.allclose(mk[:, :, down], layer.keys[:, :, down].mean(2, keepdim=True).expand_as(mk[:, :, down]))
        assert torch.equal(mk[:, :, :b], layer.keys[:, :, :b]) and torch.equal(rk[:, :, :b], layer.keys[:, :, :b])
        for p in down:       # every resampled position carries a donor's key, never a downstream one
            assert any(torch.equal(rk[:, :, p], layer.keys[:, :, q]) for q in donors)
    with pytest.raises(ValueError, match="donor"):
        knockout.ablation_sources(stale, down, [], "seed")


def test_resampling_the_whole_downstream_is_not_a_no_op(tiny_by_name, get_pair, single_thread):
    """A permutation of the downstream K/V within itself would leave attention unchanged (the bug this guards)."""
    lm = tiny_by_name("tiny-llama")
    pair = get_pair(lm, "diverse")
    d, (a, b) = pair.dpos, pair.span
    stale = kv.prefill(lm.model, pair.old_ids[:d])
    engine = SpliceEngine(lm.model, stale, knockout.ablation_sources(stale, list(range(b, d)), list(range(3, a)), "s"),
                          int(pair.old_ids[d]))
    got = engine.run([Splice(()), Splice(tuple(range(b, d)), source="resample")])
    assert (got[1] - got[0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("ko"), "probe=knockout", "model=tiny-llama", "n_instances=1",
                               "probe.n_random=5", *RELAXED))


def test_knockout_probe_states_and_sanity(record, tmp_path):
    assert record["summary"]["n_included"] == N_DIVERSE
    agg = record["aggregate"]
    assert agg["oracle"]["base"]["recovery"]["mean"] == pytest.approx(1.0, abs=1e-4)     # sanity (by construction)
    assert agg["stale"]["base"]["recovery"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert record["sanity"]["graded_0_max_abs_margin_diff"] == 0
    # the field-only base state is P1's field-only splice: the same recovery as the locality probe's
    loc = run_module.run(_cfg(tmp_path, "probe=locality", "model=tiny-llama", "n_instances=1", *RELAXED))
    by_id = {r["id"]: r["field_only_recovery"] for r in loc["instances"]}
    for r in record["instances"]:         # compared in logits: recoveries divide by a tiny random-init delta m
        diff = r["knockout"]["field_only"]["base"]["recovery"] - by_id[r["id"]]
        assert abs(diff * r["delta_m"]) < 2e-5
    for state in knockout.STATES:
        for method in knockout.METHODS:
            assert set(agg[state]["graded"]) == {str(f) for f in knockout.FRACS}
            assert agg[state]["band"]["all"][method]["p_new"]["n"] == N_DIVERSE
        cell = agg[state]["band"]["all"]["mask"]
        assert cell["mass"]["downstream"] == 0 and cell["kl"]["mean"] > 0
        null = agg[state]["random_matched_mass"]["0.5"]
        assert null["recovery"]["n_draws"] == 5 and null["p_new"]["n_draws"] == 5
        # B >= 2000 null means from independent per-pair draws, however few draws a pair has; p floor beside p
        assert null["recovery"]["B"] >= 2000 and null["recovery"]["p_floor"] == 1 / (null["recovery"]["B"] + 1)
        assert null["recovery"]["p_floor"] <= null["recovery"]["p_graded_mask_ge_null"] <= 1
        graded = agg[state]["graded"]["0.5"]["mask"]["recovery"]["mean"]
        assert null["recovery"]["graded_mask_mean"] == pytest.approx(graded)
        assert null["recovery"]["lo"] <= null["recovery"]["median"] <= null["recovery"]["hi"]
        assert not any(k.startswith("p_") and k.endswith("_ge_null") for k in null["p_new"])
        # all-layer knockout of everything downstream is the same set whether reached by fraction or by band
        assert agg[state]["graded"]["1.0"]["mask"]["recovery"]["mean"] == pytest.approx(
            agg[state]["band"]["all"]["mask"]["recovery"]["mean"])


def test_bad_band_name():
    with pytest.raises(KeyError):
        knockout.band_layers("middle", 12)
