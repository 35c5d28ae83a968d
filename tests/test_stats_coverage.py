"""Simulated coverage of the kvnotes.stats intervals (paper_spec §8 W1, W2).

Design (kvnotes.stats.coverage_simulation): G scenarios with 1-5 pairs each
(uniform, drawn per scenario), strong scenario effects (sd 0.3) against pair
noise (sd 0.1) for continuous values; for proportions scenario success
probabilities Beta(mean p, ICC 0.3).

Tolerance: with R = 2000 data sets per G the Monte-Carlo SE of a coverage
near 0.95 is sqrt(0.95 * 0.05 / 2000) = 0.0049. The lower bound 0.92 sits
6 SE below nominal, so an interval with true coverage 0.95 essentially never
fails, while one with true coverage 0.90 or less (the old two-stage bootstrap
at G <= 10, coverage.md) passes with probability < 0.2 % (0.92 is 3 SE above
0.90). Seeds are fixed, so the outcome is deterministic; the argument above
is why the seeds need no tuning.
"""

import math

import numpy as np
import pytest

from kvnotes.stats import _pooled_t_batch, coverage_simulation, summarize, summarize_proportion

REPS = 2000
LOWER = 0.92
G_VALUES = [3, 5, 10, 30]


@pytest.fixture(scope="module")
def main_design():
    return {g: coverage_simulation(g, REPS, seed=100 + g, bootstrap_reps=0) for g in G_VALUES}


@pytest.mark.parametrize("g", G_VALUES)
@pytest.mark.parametrize("name", ["ci", "scenario_weighted_ci"])
def test_continuous_intervals_cover(main_design, g, name):
    iv = main_design[g]["intervals"][name]
    assert iv["n_reps"] == REPS
    assert iv["coverage"] >= LOWER, (g, name, iv)
    # not trivially wide: a correct interval is near 0.95, 0.985 is > 4 SE above it
    assert iv["coverage"] <= 0.985, (g, name, iv)


@pytest.mark.parametrize("g", G_VALUES)
@pytest.mark.parametrize("name", ["proportion_ci", "proportion_scenario_weighted_ci"])
def test_proportion_intervals_cover(main_design, g, name):
    iv = main_design[g]["intervals"][name]
    assert iv["coverage"] >= LOWER, (g, name, iv)
    # conservative at small G by design (t on few df on top of Wilson); with 10+ scenarios it
    # must tighten toward nominal rather than stay at ~1
    if g >= 10:
        assert iv["coverage"] <= 0.99, (g, name, iv)


def test_proportion_interval_at_three_scenarios_is_conservative(main_design):
    """Documented behaviour: with 3 scenarios the design-effect Wilson interval is wide (most of [0, 1])."""
    iv = main_design[3]["intervals"]["proportion_ci"]
    assert iv["coverage"] >= 0.98 and iv["median_width"] > 0.7


def test_iid_wilson_is_detectably_too_narrow(main_design):
    # the check can tell an interval that ignores clustering apart from one that does not
    for g in G_VALUES:
        assert main_design[g]["intervals"]["proportion_wilson_iid"]["coverage"] < 0.9


def test_old_bootstrap_undercovers_at_three_scenarios():
    res = coverage_simulation(3, 600, seed=7, bootstrap_reps=600, n_boot=500)
    iv = res["intervals"]
    assert iv["ci_bootstrap"]["n_reps"] == 600
    assert iv["ci_bootstrap"]["coverage"] < 0.85
    assert iv["ci"]["coverage"] >= LOWER


@pytest.mark.parametrize("p", [0.05, 0.95])
@pytest.mark.parametrize("g", [5, 10, 30])
def test_proportion_near_zero_or_one(g, p):
    """Near p = 0 or 1 many data sets have p_hat = 0 (or 1): the design-effect Wilson interval then uses
    the worst-case n_eff and keeps its coverage, while a clipped cluster-robust t interval collapses."""
    iv = coverage_simulation(g, REPS, seed=300 + g + int(100 * p), p=p, bootstrap_reps=0)["intervals"]
    assert iv["proportion_ci"]["coverage"] >= 0.95
    assert iv["proportion_scenario_weighted_ci"]["coverage"] >= 0.95
    assert iv["proportion_cr_t_clipped"]["coverage"] < 0.9


def test_all_zero_outcomes_give_one_sided_interval():
    s = summarize_proportion([False] * 15, [i % 6 for i in range(15)])
    assert s["ci"][0] == 0.0 and 0.2 < s["ci"][1] < 1.0
    assert s["scenario_weighted_ci"][0] == 0.0 and s["scenario_weighted_ci"][1] > 0.2


def test_simulation_uses_the_summarize_code_path():
    """The batch core the simulation calls gives summarize's interval for the same data."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        g = int(rng.integers(2, 12))
        sizes = rng.integers(1, 6, size=g)
        labels = np.repeat(np.arange(g), sizes)
        y = 0.5 + rng.normal(0, 0.3, size=g)[labels] + rng.normal(0, 0.1, size=labels.size)
        s = summarize(y.tolist(), labels.tolist(), n_boot=50)
        sums = np.bincount(labels, weights=y)
        ssw = float(((y - (sums / sizes)[labels]) ** 2).sum())
        b = _pooled_t_batch(sizes[None].astype(float), sums[None], np.array([ssw]), 0.05)
        assert s["ci"] == pytest.approx([b["mean"][0] - b["half"][0], b["mean"][0] + b["half"][0]], rel=1e-9, abs=1e-12)


def test_mc_se_reported():
    res = coverage_simulation(5, 400, seed=1, bootstrap_reps=0)
    for iv in res["intervals"].values():
        c = iv["coverage"]
        assert iv["mc_se"] == pytest.approx(math.sqrt(c * (1 - c) / 400))
    assert res["nominal"] == pytest.approx(0.95) and res["n_reps"] == 400


@pytest.mark.parametrize("kwargs", [{"n_clusters": 1}, {"n_clusters": 3, "n_reps": 0},
                                    {"n_clusters": 3, "effects": "cauchy"}, {"n_clusters": 3, "p": 1.0},
                                    {"n_clusters": 3, "icc": 0.0}])
def test_coverage_simulation_validates(kwargs):
    kwargs.setdefault("n_reps", 10)
    with pytest.raises(ValueError):
        coverage_simulation(**kwargs)
