"""The D4 false-note injection probe (paper_spec §3.13) on tiny models: the no-op and identity invariants (sanity
checks by construction, §8 W7), the dose at k = n_down, the leave-one-domain-out ranking (W8), the donor path (role
map, RoPE repositioning at delta 0), and run.py end to end. Each equality is paired with a check that the quantities
compared genuinely move, so that a wrong implementation could not pass by comparing two unchanged states."""
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

import run as run_module
from kvnotes import kv
from kvnotes.engine import Splice, SpliceEngine
from kvnotes.readout import candidate_tokens
from probes import injection, topk, locality
from probes.common import choose_readouts, pair_row, prefill_pair
from scenarios import make_instances
from test_run import _cfg
from conftest import N_DIVERSE

pytestmark = pytest.mark.usefixtures("single_thread")

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
LOGIT_TOL = 1e-5      # two decodes of the same cache state through different paths (fp32; observed <= 2e-7)
IDENTITY_TOL = 1e-4   # the identity with P1's field-only state, in logits (the tolerance the design asks for)
MOVES = 1e-4          # an injection that is supposed to do something moves the margin or logits by more than this:
                      # 10 x LOGIT_TOL (the tiny random models' arms differ by only ~1e-3 in margin)


def max_abs(x, y) -> float:
    return float((torch.as_tensor(x).float() - torch.as_tensor(y).float()).abs().max())


def cand_ids(lm, inst) -> list:
    """The candidate token ids run.py hands to measure() (every variant's first token of every action)."""
    return sorted({t for lst in candidate_tokens(lm.tokenizer, list(inst.candidates)).values() for _, t, _ in lst})


def readout(lm, pair, raw):
    return choose_readouts(lm.tokenizer, [pair.instance], {pair.instance.id: raw})[
        (tuple(pair.instance.candidates), pair.instance.safe, pair.instance.unsafe)]


def margin(ro, token_ids, row) -> float:
    return ro.margin({int(t): float(v) for t, v in zip(token_ids, row)})


# ---------------------------------------------------------------- invariants on one pair, every tiny architecture
def test_injecting_a_pairs_own_notes_into_itself_is_a_no_op(tiny, get_pair):
    """The donor path with the base's own arm as donor (prefilled again into a full-storage cache, mapped onto
    itself by role key, keys repositioned by 0) leaves the decode as it was; the other arm's notes move it."""
    pair = get_pair(tiny, "diverse")
    model = tiny.model
    stale, oracle, last = prefill_pair(model, pair)
    b, dpos = pair.span[1], pair.dpos
    info = pair.token_info(tiny.tokenizer)
    down = list(range(b, dpos))
    mapping, unmapped = injection.role_map(info["labels"], down, info["labels"], down)
    assert mapping == [(p, p) for p in down] and unmapped == []
    donors = injection.prefill_donor(model, pair.old_ids[:dpos].tolist(), pair.new_ids[:dpos].tolist(), pair.span[0])
    own = kv.splice_mapped(model, stale, donors["old"], mapping)
    engine = SpliceEngine(model, stale, {"own": own, "pair": oracle}, last)
    rows = engine.run([Splice(tuple(down), source="own"), Splice(tuple(down), source="pair")])
    base = kv.decode(model, [stale], last)[0]
    assert max_abs(rows[0], base) <= LOGIT_TOL            # every logit, so the margin too
    assert max_abs(rows[1], base) > MOVES                 # the opposite notes do change the state


def test_full_injection_is_one_minus_the_mirrored_field_only_recovery(tiny, get_pair):
    """Sanity check by construction (§8 W7): injecting the other arm's [b, dpos) into a base arm makes P1's
    field-only state of the pair oriented stale = donor arm, oracle = base arm: probes.locality on the pair for
    base = new, on the mirrored pair (arms swapped) for base = old."""
    pair = get_pair(tiny, "diverse")
    inst = pair.instance
    ids = cand_ids(tiny, inst)
    raw = injection.measure(tiny, pair, ids)
    ro = readout(tiny, pair, raw)
    row = pair_row(inst, pair.token_info(tiny.tokenizer), raw, ro)
    mirrored = dataclasses.replace(pair, old_ids=pair.new_ids, new_ids=pair.old_ids)
    for direction, p1_pair in (("new<-old", pair), ("old<-new", mirrored)):
        loc = locality.measure(tiny, p1_pair, ids)["states"]
        m = {s: ro.margin({int(t): v for t, v in loc[s]["logits"].items()}) for s in ("stale", "oracle", "field")}
        field_only = (m["field"] - m["stale"]) / (m["oracle"] - m["stale"])
        m_base, m_other = injection._arm_margins(row, *injection.DIRECTIONS[direction])
        assert (m_base, m_other) == pytest.approx((m["oracle"], m["stale"]), abs=LOGIT_TOL)
        m_full = margin(ro, raw["token_ids"], raw[direction]["full"])
        recovery = (m_full - m_base) / (m_other - m_base)
        assert abs(recovery - (1 - field_only)) * abs(m_other - m_base) <= IDENTITY_TOL, direction
        assert abs(recovery - (1 - field_only)) * abs(m_other - m_base) <= LOGIT_TOL, direction    # and tighter
        assert abs(m_full - m_base) > MOVES                # the injection moved the margin (not a trivial 0 = 0)
        # the probe's own partner state (materialised) is the same number
        partner = raw["states"][injection._field_only_state(direction)]["logits"]
        assert ro.margin({int(t): v for t, v in partner.items()}) == pytest.approx(m["field"], abs=LOGIT_TOL)


def test_repositioned_donor_keys_at_delta_zero_reproduce_the_plain_splice(tiny, get_pair):
    """The whole donor path of pass 2 with the pair itself as donor: plan_donor maps its downstream onto itself
    (delta 0), prefill_donor + splice_mapped + the engine give the same logits as the plain same-pair injection of
    pass 1 and as kv.splice + kv.decode."""
    pair = get_pair(tiny, "diverse")
    inst = pair.instance
    ids = cand_ids(tiny, inst)
    info = {inst.id: pair.token_info(tiny.tokenizer)}
    raw = injection.measure(tiny, pair, ids)
    ro = readout(tiny, pair, raw)
    rows = {inst.id: pair_row(inst, info[inst.id], raw, ro)}
    dn = injection.plan_donor(inst, "instance", [inst], info, {inst.id: raw}, rows, seed=0)
    assert dn["donor"] == inst.id and dn["unmapped"] == []
    assert all(q == p for q, p in dn["map"]) and len(dn["map"]) == pair.dpos - pair.span[1]
    assert dn["arms"] == {"new<-old": "old", "old<-new": "new"}      # the arm concluding opposite to the base
    plan = {"measure": True, "directions": {d: {} for d in injection.DIRECTIONS}, "donors": {"instance": dn}}
    second = injection.measure_second(tiny, pair, ids, plan)
    stale, oracle, last = prefill_pair(tiny.model, pair)
    down = range(pair.span[1], pair.dpos)
    plain = {"new<-old": kv.splice(oracle, stale, down), "old<-new": kv.splice(stale, oracle, down)}
    for d in injection.DIRECTIONS:
        got = second["directions"][d]["donors"]["instance"]
        assert max_abs(got, raw[d]["full"]) <= LOGIT_TOL, d
        want = kv.decode(tiny.model, [plain[d]], last)[0, ids]
        assert max_abs(got, want) <= LOGIT_TOL, d
    assert max_abs(raw["new<-old"]["full"], raw["old<-new"]["full"]) > MOVES    # the two directions differ


# ---------------------------------------------------------------- planning, without a model
def test_cross_fitted_ranking_never_uses_the_pairs_own_domain():
    """A case where the held-out domain's own scores would change the ranking: its pairs put ("gate", 0) first,
    the other domains ("task", 1). The cross-fitted order follows the others."""
    labels = ["x", "task", "task", "gate", "gate", "template"]
    down = [1, 2, 3, 4, 5]                     # role keys (task,1) (task,0) (gate,1) (gate,0) (template,0)
    material = {"own": [(("gate", 0), 10.0), (("task", 1), -5.0)],
                "a": [(("task", 1), 1.0), (("gate", 0), -1.0)], "b": [(("task", 1), 0.5), (("gate", 1), 0.2)]}
    order, used = topk.cross_fitted_order(down, labels, material, held_out="own")
    assert used == ["a", "b"] and order[0] == 1
    with_own, _ = topk.cross_fitted_order(down, labels, material, held_out=None)
    assert with_own[0] == 4 and with_own != order          # including the pair's own domain would differ
    assert topk.cross_fitted_order(down, labels, {"own": material["own"]}, held_out="own") == (None, [])


def test_role_map_matches_by_label_distance_to_run_end_and_occurrence():
    rec = ["t", "f", "gate", "gate", "gate", "conv", "gate", "task", "task"]
    don = ["t", "t", "f", "gate", "conv", "gate", "gate", "conv", "conv", "gate", "task", "task"]
    mapped, unmapped = injection.role_map(rec, list(range(2, 9)), don, list(range(3, 12)))
    # runs align from their ends: task (7, 8) -> (10, 11); a key that occurs several times pairs its j-th occurrence
    # from the decision side with the donor's j-th: ("gate", 0) at 6 and 4 -> 9 and 6 (the donor's extra early
    # ("gate", 0) at 3 goes unused); ("gate", 1) 3 -> 5; ("conv", 0) 5 -> 8; ("gate", 2) has no counterpart
    assert dict(mapped) == {8: 11, 7: 10, 6: 9, 5: 8, 4: 6, 3: 5}
    assert unmapped == [2]


def test_dose_sizes_cover_ks_and_fractions():
    s = injection.dose_sizes(38)
    assert s["k"]["64"] == 38 and s["k"]["8"] == 8 and s["frac"]["1.0"] == 38 and s["frac"]["0.02"] == 1


# ---------------------------------------------------------------- run.py end to end
@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("injection"), "probe=injection", "model=tiny-llama",
                               "stats.n_boot=200", *RELAXED))


@pytest.fixture(scope="module")
def record_two_instances(tmp_path_factory):
    """F->R (the deep_inject layout), three domains, two instances each: every pair has a same-domain donor."""
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("injection2"), "probe=injection", "model=tiny-llama",
                               "scenario=diverse_all", "scenario.params.layout=field_first_user",
                               "scenario.params.domains=[order_cancel,account_delete,password_reset]",
                               "n_instances=2", "probe.n_null=50", "stats.n_boot=200", *RELAXED))


def test_run_lands_a_record_with_its_aggregates(record):
    path = Path(record["config"]["results_dir"]) / "injection" / "tiny-llama" / "diverse.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    s = record["summary"]
    assert record["experiment"] == "injection" and s["n_included"] == N_DIVERSE and s["n_controls"] == 1
    agg = record["aggregate"]
    for view in ("new<-old", "old<-new", "both"):
        full = agg["full"][view]
        assert {"mean", "ci", "n", "n_clusters"} <= set(full["recovery"])
        assert full["recovery"]["n_clusters"] == N_DIVERSE
        assert {"mean", "ci", "k"} <= set(full["flip_rate"]) and "follows_injected_rate" in full
        assert set(agg["dose"][view]["topk_cf"]["k"]) == {str(k) for k in injection.KS}
    assert agg["full"]["both"]["recovery"]["n"] == 2 * N_DIVERSE
    # sanity checks (true by construction), labelled as such
    san = record["sanity"]
    assert "sanity check" in san["note"]
    assert san["identity_max_abs_diff_logits"] <= IDENTITY_TOL
    assert san["dose_at_n_down_vs_full_max_abs_diff_logits"] <= LOGIT_TOL
    # one donor per included pair of another domain; none of the same domain with n_instances=1, counted with why
    assert s["n_with_donor"] == {"instance": 0, "domain": N_DIVERSE}
    assert agg["no_donor"]["instance"]["n_pairs"] == N_DIVERSE
    assert "same domain" in next(iter(agg["no_donor"]["instance"]["by_reason"]))
    for row in record["instances"]:
        for d in injection.DIRECTIONS:
            dn = row[d]["donors"]["domain"]
            assert dn["donor_scenario"] != row["scenario"] and dn["n_mapped"] + dn["n_unmapped"] == row["n_down"]
            assert dn["unmapped"] == sorted(set(range(row["tokens"]["span"][1], row["tokens"]["dpos"]))
                                            - {q for q, _ in dn["map"]})
            assert sum(dn["unmapped_labels"].values()) == dn["n_unmapped"]
            assert row[d]["donors"]["instance"]["donor"] is None and row[d]["donors"]["instance"]["reason"]
    assert agg["unmapped"]["domain"]["positions"] == sum(r["new<-old"]["donors"]["domain"]["n_unmapped"]
                                                          for r in record["instances"])
    # controls apart, with their own summary
    assert all("topk_cf" not in r["new<-old"] for r in record["controls"])
    assert agg["controls"]["new<-old"]["decision_change_rate"]["n"] == 1


def test_dose_at_n_down_equals_the_full_injection(record):
    smaller_differs = False
    for row in record["instances"]:
        n = row["n_down"]
        assert row["plan"]["sizes"]["frac"]["1.0"] == n
        for d in injection.DIRECTIONS:
            out = row[d]
            for kind in ("topk_cf", "topk_in"):
                assert out[kind][str(n)]["m"] == pytest.approx(out["full"]["m"], abs=LOGIT_TOL)
                assert out[kind][str(n)]["recovery"] == pytest.approx(out["full"]["recovery"], abs=1e-3)
            assert row["plan"]["topk_cf"][d][str(n)] == list(range(row["tokens"]["span"][1], row["tokens"]["dpos"]))
            smaller_differs |= abs(out["topk_cf"]["1"]["m"] - out["full"]["m"]) > MOVES
    assert smaller_differs


def test_the_record_ranking_is_leave_one_domain_out(record):
    """Rebuild each pair's cross-fitted sets from the other pairs' recorded single recoveries (leave its domain
    out): they are the record's; with its own domain left in, some set would differ."""
    rows = record["instances"]
    material = {d: {} for d in injection.DIRECTIONS}
    for r in rows:
        down = list(range(r["tokens"]["span"][1], r["tokens"]["dpos"]))
        for d in injection.DIRECTIONS:
            keys = injection.role_keys(r["tokens"]["labels"], down)
            material[d].setdefault(r["scenario"], []).extend(zip(keys, r[d]["single"]))
    would_differ = False
    for r in rows:
        down = list(range(r["tokens"]["span"][1], r["tokens"]["dpos"]))
        for d in injection.DIRECTIONS:
            assert r["scenario"] not in r["plan"]["cf_scenarios"][d]
            assert r["plan"]["cf_scenarios"][d] == sorted({x["scenario"] for x in rows} - {r["scenario"]})
            order, _ = topk.cross_fitted_order(down, r["tokens"]["labels"], material[d], r["scenario"])
            with_own, _ = topk.cross_fitted_order(down, r["tokens"]["labels"], material[d], None)
            for size, s in r["plan"]["topk_cf"][d].items():
                assert s == sorted(order[:int(size)])
                would_differ |= s != sorted(with_own[:int(size)])
    assert would_differ


def test_matched_null_has_its_draws_and_band(record):
    agg = record["aggregate"]["dose"]["both"]["null_matched"]
    for axis in ("k", "frac"):
        for point, band in agg[axis].items():
            assert band["n"] == 2 * N_DIVERSE and band["B"] >= 2000
            assert band["lo"] <= band["median"] <= band["hi"] and band["p_floor"] <= band["p_topk_cf_ge_null"] <= 1
    for row in record["instances"]:
        for d in injection.DIRECTIONS:
            sizes = {s for part in row["plan"]["sizes"].values() for s in part.values()}
            assert set(row[d]["null"]) == {str(s) for s in sizes}
            for size, band in row[d]["null"].items():     # n_null draws below n_down; the whole downstream at it
                assert band["n"] == (200 if int(size) < row["n_down"] else 1) and band["lo"] <= band["hi"]
                assert 1 / (band["n"] + 1) <= band["p_topk_cf_ge"] <= 1


def test_null_draws_keep_the_cross_fitted_sets_label_mix():
    """plan_second on two synthetic domains: every null draw of a size has the fine-label mix of the cross-fitted
    set of that size, and the draws are seeded per pair and direction."""
    plans, pairs_info = _synthetic_plans()
    for iid, plan in plans.items():
        labels = pairs_info[iid]["labels"]
        for d, dp in plan["directions"].items():
            for size, draws in dp["null"].items():
                mix = sorted(labels[p] for p in dp["topk_cf"][size])
                assert len(draws) == (7 if int(size) < plan["n_down"] else 1)
                assert all(sorted(labels[p] for p in x) == mix and len(set(x)) == int(size) for x in draws)
    assert _synthetic_plans()[0] == plans


def _synthetic_plans():
    """plan_second on four fake gated pairs of two domains (no model): the old arm decides "allow" (m = -1), the new
    one "deny" (m = +1); single-position rows vary with the position."""
    from types import SimpleNamespace
    from kvnotes.readout import Readout
    labels = ["t"] * 3 + ["field"] + ["gate"] * 4 + ["task"] * 3 + ["conv"] * 9 + ["d"]   # 21 tokens, dpos 20
    ro = Readout("deny", "allow", 1, 2, "deny", "allow", {1: "deny", 2: "allow"}, "test")
    instances, info, raws = [], {}, {}
    for k, scen in enumerate(("s1", "s1", "s2", "s2")):
        inst = SimpleNamespace(id=f"{scen}/{k}", scenario=scen, kind="gated", safe="deny", unsafe="allow",
                               expected_old="allow", expected_new="deny", candidates=("allow", "deny"),
                               direction_known=True, record_id=lambda k=k, scen=scen: {"id": f"{scen}/{k}",
                                                                                        "scenario": scen})
        instances.append(inst)
        down = list(range(4, 20))
        info[inst.id] = {"span": [3, 4], "dpos": 20, "labels": labels}
        single = [[0.0, (p % 7) / 10] for p in down]
        raws[inst.id] = {"token_ids": [1, 2], "positions": down, "ids": {a: list(range(21)) for a in ("old", "new")},
                         "states": {"stale": {"logits": {"1": 0.0, "2": 1.0}, "lse": 0.0},
                                    "oracle": {"logits": {"1": 1.0, "2": 0.0}, "lse": 0.0}},
                         **{d: {"single": single, "full": [0.0, 0.5]} for d in injection.DIRECTIONS}}
    readouts = {(("allow", "deny"), "deny", "allow"): ro}
    rule = {"require_flip": True, "require_correct": True, "min_abs_delta_m": 0.5}
    return injection.plan_second(instances, info, raws, readouts, rule, {"n_null": 7}), info


def test_instance_and_domain_donors_on_the_field_first_layout(record_two_instances):
    rec = record_two_instances
    assert rec["scenario"]["params"]["layout"] == "field_first_user"
    assert rec["summary"]["n_with_donor"] == {"instance": 6, "domain": 6}
    insts = {i.id: i for i in make_instances(rec["scenario"]["family"], n_instances=2, seed=rec["config"]["seed"],
                                             **rec["scenario"]["params"])}
    restrictive = lambda inst, arm: getattr(inst, f"expected_{arm}") == inst.safe   # noqa: E731
    for row in rec["instances"]:
        inst = insts[row["id"]]
        for d, (base, _) in injection.DIRECTIONS.items():
            inst_d, dom_d = row[d]["donors"]["instance"], row[d]["donors"]["domain"]
            assert inst_d["donor_scenario"] == row["scenario"] and inst_d["donor"] != row["id"]
            assert dom_d["donor_scenario"] != row["scenario"]
            # each donor's arm concludes opposite to the base arm (by the values), whatever its answer words
            for dn in (inst_d, dom_d):
                donor = insts[dn["donor"]]
                assert restrictive(donor, dn["arm"]) != restrictive(inst, base)
                assert dn["donor_expected"] == getattr(donor, f"expected_{dn['arm']}")
            assert {"m", "decision", "recovery", "flipped", "follows_injected"} <= set(inst_d)
    assert rec["aggregate"]["donors"]["instance"]["both"]["recovery"]["n"] == 12
    # the choice is the seeded one among the included pairs (probe.donor_seed), as recorded
    rows = rec["instances"]
    for row in rows:
        for kind in ("instance", "domain"):
            pool = sorted(r["id"] for r in rows if r["id"] != row["id"]
                          and (r["scenario"] == row["scenario"]) == (kind == "instance"))
            want = random.Random(f"injection-donor:0:{kind}:{row['id']}").choice(pool)
            assert row["new<-old"]["donors"][kind]["donor"] == row["old<-new"]["donors"][kind]["donor"] == want
