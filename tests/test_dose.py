"""The field-placement dose-response family and probe (P7) on a tiny model."""
import pytest

import run as run_module
from scenarios import make_instances
from scenarios.dose import LEVELS
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


def test_levels_are_the_same_instances_with_only_the_placement_moved():
    insts = make_instances("diverse_dose", n_instances=2, seed=0)
    by_level = {}
    for i in insts:
        by_level.setdefault(i.variant["dose_level"], []).append(i)
    assert list(by_level) == list(LEVELS) and len({i.id for i in insts}) == len(insts)
    for lv, group in by_level.items():
        assert [i.id.split(":", 1)[1] for i in group] == [i.id.split(":", 1)[1] for i in by_level["3_after_rule"]]
        for i, ref in zip(group, by_level["3_after_rule"]):
            for key in ("name", "oid", "request_variant", "filler_rules", "rule_order"):
                assert i.variant[key] == ref.variant[key]
            assert i.variant["placement"] == LEVELS[lv]["placement"]
            assert i.variant["n_filler"] == LEVELS[lv]["n_filler"][0]
            assert (i.old_value, i.new_value, i.expected_new) == (ref.old_value, ref.new_value, ref.expected_new)
    with pytest.raises(ValueError, match="unknown dose levels"):
        make_instances("diverse_dose", n_instances=1, seed=0, levels=["closest"])


def test_dose_probe_by_level(tmp_path):
    rec = run_module.run(_cfg(tmp_path, "probe=dose", "scenario=diverse_dose", "model=tiny-llama", "n_instances=1",
                              *RELAXED))
    agg = rec["aggregate"]
    assert list(agg["by_level"]) == sorted(LEVELS)
    lo, hi = rec["sanity"]["full_splice_recovery_range"]
    worst = min(abs(r["delta_m"]) for r in rec["instances"])
    assert abs(lo - 1) * worst < 1e-4 and abs(hi - 1) * worst < 1e-4          # sanity: full splice = oracle
    # the far levels really put more tokens between the field and the decision than the near one
    d = {lv: v["distance"]["mean"] for lv, v in agg["by_level"].items()}
    assert d["0_before_rule_far"] > d["1_before_rule"] and d["2_after_rule_far"] > d["3_after_rule"] > \
        d["4_after_rule_near"]
    for r in rec["instances"]:
        assert r["suffix"]["1.0"] == pytest.approx(r["full_recovery"])
        assert r["suffix_frac_for_80pct"] in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
    rho = agg["spearman_field_only_vs_distance"]
    assert rho["n"] == 50 and rho["n_clusters"] == 10 and rho["B"] == 500    # stats.n_boot of the test config
    assert -1 <= rho["ci"][0] <= rho["ci"][1] <= 1 and "scipy.stats.bootstrap" in rho["ci_method"]


def test_spearman_ci_uses_every_requested_resample_and_scipys_rho():
    import numpy as np
    from scipy.stats import spearmanr

    from probes import dose

    rng = np.random.default_rng(3)
    rows = [{"scenario": f"s{g}", "distance": float(d), "field_recovery": float(1 - d / 100 + rng.normal(0, 0.3))}
            for g in range(6) for d in (5, 20, 20, 60)]
    out = dose._spearman_ci(rows, {"alpha": 0.05, "n_boot": 3000, "seed": 0})
    want = spearmanr([r["distance"] for r in rows], [r["field_recovery"] for r in rows]).statistic
    assert out["rho"] == pytest.approx(want, abs=1e-12)
    assert out["B"] == 3000 and out["n_degenerate_resamples"] == 0        # no silent cap at 2000
    assert out["ci"][0] < out["rho"] < out["ci"][1]
    assert out == dose._spearman_ci(rows, {"alpha": 0.05, "n_boot": 3000, "seed": 0})     # seeded
    one = dose._spearman_ci(rows[:4], {"alpha": 0.05, "n_boot": 3000, "seed": 0})
    assert one["ci"] is None and one["n_clusters"] == 1 and "1 scenario" in one["ci_method"]


def test_dose_probe_refuses_a_family_without_levels(tmp_path):
    with pytest.raises(ValueError, match="diverse_dose"):
        run_module.run(_cfg(tmp_path, "probe=dose", "model=tiny-llama", "n_instances=1", *RELAXED))
