"""The top-k / suffix / prefix probe (P4/P5) end to end on a tiny model, its planning invariants, and the fine
region labels it ranks and matches by."""
import random

import pytest
import torch

import run as run_module
from kvnotes import kv
from kvnotes.models import load_model
from probes import topk
from scenarios import make_instances
from scenarios.regions import LABELS, token_labels
from scenarios.render import align
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("topk"), "probe=topk", "model=tiny-llama",
                               "probe.n_null=20", "probe.n_uniform_null=10", *RELAXED))


def _margin_change(rec, row, positions) -> float:
    """m(spliced) - m(stale) by materialised kv.splice + kv.decode under the record's readout."""
    lm = load_model("tiny-llama")
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    ro = next(g for g in rec["readout"]["per_group"] if set(g["candidates"].values()) == set(inst.candidates))
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    d = pair.dpos
    stale, oracle = kv.prefill(lm.model, pair.old_ids[:d]), kv.prefill(lm.model, pair.new_ids[:d])
    logits = kv.decode(lm.model, [stale, kv.splice(stale, oracle, positions)], int(pair.old_ids[d]))
    m = logits[:, ro["safe_id"]] - logits[:, ro["unsafe_id"]]
    return float(m[1] - m[0])


def test_topk_sets_equal_materialised_splices_and_k_all_is_the_downstream(record):
    row = record["instances"][0]
    b, dpos = row["tokens"]["span"][1], row["tokens"]["dpos"]
    plan = row["plan"]
    assert plan["n_down"] == dpos - b
    # top-k at k >= n_down is the whole downstream: its value equals an independent downstream splice
    big = str(max(k for k in topk.KS))
    assert plan["topk_in"][big] == list(range(b, dpos))
    assert row["topk_in"][big] * row["delta_m"] == pytest.approx(_margin_change(record, row, range(b, dpos)), abs=2e-6)
    # a mid-size set, and the in-sample ranking really is by single-position recovery
    s = plan["topk_in"]["4"]
    assert row["topk_in"]["4"] * row["delta_m"] == pytest.approx(_margin_change(record, row, s), abs=2e-6)
    single = {int(p): v for p, v in row["single"].items()}
    rest = [p for p in range(b, dpos) if p not in s]
    assert min(single[p] for p in s) >= max(single[p] for p in rest)
    # sanity (true by construction): suffix and prefix at f = 1 are the full splice
    for r in record["instances"]:
        assert r["suffix"]["1.0"] * r["delta_m"] == pytest.approx(r["delta_m"], abs=1e-4)
        assert r["prefix"]["1.0"] == r["suffix"]["1.0"]


def test_cross_fitting_never_ranks_with_the_held_out_scenario(record):
    for row in record["instances"]:
        assert row["scenario"] not in row["plan"]["cf_scenarios"]
        assert len(row["plan"]["cf_scenarios"]) == 9
        assert set(row["plan"]["topk_cf"]["8"]) <= set(range(row["tokens"]["span"][1], row["tokens"]["dpos"]))


def test_null_band_and_curves_cover_every_pair(record):
    agg = record["aggregate"]
    n = record["summary"]["n_included"]
    for k in map(str, topk.KS):
        assert agg["topk_in"][k]["n"] == n and agg["topk_cf"][k]["n"] == n
        band = agg["null_matched"][k]
        assert band["n"] == n and band["lo"] <= band["median"] <= band["hi"]
        # B null means from independent per-pair draws (not the 20 draw-j means), p floor beside every p-value
        for kind in ("null_matched", "null_uniform"):
            nb = agg[kind][k]
            assert nb["B"] >= 2000 and nb["p_floor"] == 1 / (nb["B"] + 1)
            assert nb["p_floor"] <= nb["p_topk_in_ge_null"] <= 1 and nb["p_floor"] <= nb["p_topk_cf_ge_null"] <= 1
            assert nb["topk_in_mean"] == pytest.approx(agg["topk_in"][k]["mean"])
            assert nb["mean"] == pytest.approx(sum(nb["per_pair_mean"]) / n)
    assert agg["null_matched"]["8"]["n_draws"] == 20 and agg["null_uniform"]["8"]["n_draws"] == 10
    # k as a share of the downstream: each pair's set has max(1, round(f n_down)) positions, its own ranking's
    # top ones, and a matched null of that size with the p-values of both rankings
    for f in map(str, topk.TOPK_FRACS):
        assert agg["topk_in_frac"][f]["n"] == agg["topk_cf_frac"][f]["n"] == agg["null_matched_frac"][f]["n"] == n
        assert {"p_topk_in_ge_null", "p_topk_cf_ge_null"} <= set(agg["null_matched_frac"][f])
        for r in record["instances"]:
            plan, k = r["plan"], r["plan"]["frac_sizes"][f]
            assert k == min(plan["n_down"], max(1, round(float(f) * plan["n_down"])))
            assert len(plan["topk_in_frac"][f]) == len(plan["topk_cf_frac"][f]) == k
            single = {int(p): v for p, v in r["single"].items()}
            rest = [p for p in range(r["tokens"]["span"][1], r["tokens"]["dpos"]) if p not in plan["topk_in_frac"][f]]
            assert not rest or min(single[p] for p in plan["topk_in_frac"][f]) >= max(single[p] for p in rest)
            assert len(r["null_matched_frac"][f]) == (20 if k < plan["n_down"] else 1)
    # the controls get no null draws
    assert all("null_matched" not in r for r in record["controls"])


def test_matched_draws_keep_the_label_mix_and_uniform_draws_do_not_need_to():
    labels = ["a"] * 5 + ["b"] * 10 + ["c"] * 3
    down = list(range(18))
    top = [0, 1, 15, 16]                      # two of a, two of c
    rng = random.Random(0)
    for d in topk.random_draws(rng, down, labels, top, 50, matched=True):
        assert sorted(labels[p] for p in d) == ["a", "a", "c", "c"] and len(set(d)) == 4
    mixes = {tuple(sorted(labels[p] for p in d)) for d in topk.random_draws(rng, down, labels, top, 50, matched=False)}
    assert len(mixes) > 1


def test_role_keys_count_from_the_end_of_each_run():
    labels = ["x", "task", "task", "task", "template", "template", "decision"]
    assert topk.role_keys(labels, [1, 2, 3, 4, 5]) == [("task", 2), ("task", 1), ("task", 0), ("template", 1),
                                                       ("template", 0)]


# -- fine regions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_fine_labels_name_what_the_text_is(name):
    lm = load_model(name)
    inst = make_instances("diverse", n_instances=1, seed=0)[0]           # order_cancel/000
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    labels = token_labels(pair, lm.tokenizer, pair.prepend_bos)
    assert len(labels) == pair.length and set(labels) <= set(LABELS)
    a, b = pair.span
    assert labels[a:b] == ["field"] * (b - a) and labels[pair.dpos] == "decision"
    toks = lm.tokenizer.convert_ids_to_tokens(pair.old_ids.tolist())
    text_of = lambda lab: "".join(t for t, x in zip(toks, labels) if x == lab)   # noqa: E731
    assert "order_status" in text_of("gate") and "cancelled" in text_of("gate")
    assert "Answer" in text_of("task") and "deny" in text_of("task")
    assert "polite" in text_of("filler_rules") or "Quote" in text_of("filler_rules")
    assert "cancelled" in text_of("conversation")          # the user's request
    assert "im_start" in text_of("template") or "start_of_turn" in text_of("template")


def test_fine_labels_of_a_tool_call_prompt():
    lm = load_model("tiny-llama")
    pair = align(make_instances("family_a", n_instances=1, seed=0)[0], lm.tokenizer, False, None)
    labels = token_labels(pair, lm.tokenizer, False)
    toks = lm.tokenizer.convert_ids_to_tokens(pair.old_ids.tolist())
    text_of = lambda lab: " ".join(t for t, x in zip(toks, labels) if x == lab)   # noqa: E731
    assert "SESSION" in text_of("record") and "agent" in text_of("record")
    assert "ACCESS" in text_of("gate") and "R1" in text_of("filler_rules") and "refuse" in text_of("tools")
    assert "CONVERSATION" in text_of("conversation") and "TASK" in text_of("task")
    a, b = pair.span
    assert labels[a:b] == ["field"] * (b - a) and text_of("field_line").startswith("account _ role :")


def test_fine_labels_refuse_a_prompt_that_does_not_contain_its_messages():
    lm = load_model("tiny-llama")
    inst = make_instances("diverse", n_instances=1, seed=0)[0]
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    pair.text_old = pair.text_old.replace("ORDER RECORD", "ORDER  RECORD")
    with pytest.raises(ValueError, match="verbatim"):
        token_labels(pair, lm.tokenizer, pair.prepend_bos)
