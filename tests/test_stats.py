"""Tests for kvnotes.stats: Wilson interval, clustered bootstrap, summaries."""

import json
import math
import time

import numpy as np
import pytest

from kvnotes.stats import bootstrap_mean_ci, summarize, summarize_proportion, wilson


def _wilson_quadratic(k, n, z=1.96):
    """Wilson bounds as the roots of (p_hat - p)^2 = z^2 p (1 - p) / n.

    Rearranged: (n + z^2) p^2 - (2k + z^2) p + k^2 / n = 0, solved with the
    quadratic formula; independent of the centre/half-width arrangement.
    """
    a = n + z * z
    b = -(2 * k + z * z)
    c = k * k / n
    disc = math.sqrt(b * b - 4 * a * c)
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


def _clustered_data(seed, n_clusters=8, per=6, cluster_sd=2.0, noise_sd=0.3, mu=1.0):
    rng = np.random.default_rng(seed)
    effects = rng.normal(0.0, cluster_sd, size=n_clusters)
    x = (mu + effects[:, None] + rng.normal(0.0, noise_sd, size=(n_clusters, per))).ravel()
    labels = [f"s{i:02d}" for i in np.repeat(np.arange(n_clusters), per)]
    return x.tolist(), labels


# ---------------------------------------------------------------- Wilson


def test_wilson_known_values():
    lo, hi = wilson(0, 12)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.2425, abs=1e-4)
    assert [round(lo, 2), round(hi, 2)] == [0.00, 0.24]

    lo, hi = wilson(12, 12)
    assert [round(lo, 2), round(hi, 2)] == [0.76, 1.00]
    assert hi == pytest.approx(1.0, abs=1e-12)

    lo, hi = wilson(6, 12)
    assert lo == pytest.approx(0.2538, abs=1e-4)
    assert hi == pytest.approx(0.7462, abs=1e-4)


@pytest.mark.parametrize("k,n", [(0, 12), (1, 12), (6, 12), (11, 12), (12, 12), (3, 7), (40, 100)])
@pytest.mark.parametrize("z", [1.0, 1.96, 2.576])
def test_wilson_matches_quadratic_root_form(k, n, z):
    got = wilson(k, n, z)
    want = _wilson_quadratic(k, n, z)
    assert got[0] == pytest.approx(max(0.0, want[0]), abs=1e-12)
    assert got[1] == pytest.approx(min(1.0, want[1]), abs=1e-12)
    assert 0.0 <= got[0] <= k / n <= got[1] <= 1.0


def test_wilson_not_rounded():
    lo, hi = wilson(6, 12)
    assert lo != round(lo, 4) and hi != round(hi, 4)


def test_wilson_n_zero_raises():
    with pytest.raises(ValueError, match="n must be positive"):
        wilson(0, 0)


def test_wilson_rejects_k_above_n():
    with pytest.raises(ValueError):
        wilson(5, 4)


# ---------------------------------------------------------------- bootstrap basics


def test_bootstrap_positive_width_and_contains_mean():
    x, labels = _clustered_data(1)
    lo, hi, method = bootstrap_mean_ci(x, labels)
    assert hi - lo > 0.1
    assert lo <= float(np.mean(x)) <= hi
    assert method == "two-stage cluster bootstrap (scenario, then instance), percentile, B=10000"


def test_bootstrap_zero_width_on_constant_data():
    labels = [i // 6 for i in range(48)]
    lo, hi, _ = bootstrap_mean_ci([0.1] * 48, labels)
    assert lo == hi == 0.1
    lo, hi, _ = bootstrap_mean_ci([2.5] * 5, ["a"] * 5)
    assert lo == hi == 2.5


def test_bootstrap_single_cluster_uses_instance_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30).tolist()
    lo, hi, method = bootstrap_mean_ci(x, ["only"] * 30, n_boot=2000)
    assert method == "percentile bootstrap over instances (1 cluster), B=2000"
    assert lo < float(np.mean(x)) < hi
    # close to the normal-theory interval for an iid mean
    se = float(np.std(x, ddof=1)) / math.sqrt(30)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_second_stage_resamples_within_clusters():
    # Both clusters hold the same values, so resampling whole clusters alone
    # could never change the mean; only the instance stage gives width.
    lo, hi, _ = bootstrap_mean_ci([0.0, 1.0, 0.0, 1.0], ["a", "a", "b", "b"], n_boot=2000)
    assert hi - lo > 0.2


def test_bootstrap_statistic_is_pooled_instance_mean():
    # Cluster a = [0], cluster b = [1, 1, 1]. Drawing {a, b} gives a pooled
    # mean of 0.75 (a mean of cluster means would give 0.5); it has
    # probability 1/2 and sits in the middle, so a 10% central interval
    # collapses onto it.
    lo, hi, _ = bootstrap_mean_ci([0.0, 1.0, 1.0, 1.0], ["a", "b", "b", "b"], alpha=0.9)
    assert lo == pytest.approx(0.75) and hi == pytest.approx(0.75)
    lo, hi, _ = bootstrap_mean_ci([0.0, 1.0, 1.0, 1.0], ["a", "b", "b", "b"])
    assert (lo, hi) == (0.0, 1.0)


def test_bootstrap_alpha_controls_width():
    x, labels = _clustered_data(2)
    lo90, hi90, _ = bootstrap_mean_ci(x, labels, alpha=0.10)
    lo95, hi95, _ = bootstrap_mean_ci(x, labels, alpha=0.05)
    assert lo95 < lo90 and hi90 < hi95


def test_bootstrap_n1_and_n0():
    assert bootstrap_mean_ci([3.25], ["s"]) == (3.25, 3.25, "none (n=1)")
    with pytest.raises(ValueError):
        bootstrap_mean_ci([], [])


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf")])
def test_bootstrap_non_finite_raises_naming_index(bad):
    with pytest.raises(ValueError, match=r"values\[2\]"):
        bootstrap_mean_ci([1.0, 2.0, bad, 4.0], ["a", "a", "b", "b"])


def test_bootstrap_length_mismatch_raises():
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0, 2.0, 3.0], ["a", "b"])


# ---------------------------------------------------------------- determinism, speed


def test_same_seed_identical_different_seed_differs():
    x, labels = _clustered_data(4)
    a = bootstrap_mean_ci(x, labels, seed=11)
    b = bootstrap_mean_ci(x, labels, seed=11)
    c = bootstrap_mean_ci(x, labels, seed=12)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_bootstrap_is_fast():
    x, labels = _clustered_data(5, n_clusters=8, per=6)
    bootstrap_mean_ci(x, labels)  # warm-up
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        bootstrap_mean_ci(x, labels, n_boot=10000)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.5


# ---------------------------------------------------------------- clustering matters


def test_cluster_ci_wider_than_instance_only_ci():
    x, labels = _clustered_data(6, n_clusters=8, per=6, cluster_sd=2.0, noise_sd=0.3)
    lo_c, hi_c, m_c = bootstrap_mean_ci(x, labels)
    lo_i, hi_i, m_i = bootstrap_mean_ci(x, list(range(len(x))))
    assert m_c.startswith("two-stage") and m_i.startswith("two-stage")
    # with a strong cluster effect the honest interval is much wider
    assert (hi_c - lo_c) > 1.5 * (hi_i - lo_i)


def test_coverage_of_cluster_bootstrap():
    """~95% coverage for the two-stage bootstrap; clearly less when clusters are ignored."""
    true_mean = 0.5
    n_rep, n_clusters, per = 300, 20, 4
    gen = np.random.default_rng(2024)
    hit_cluster = hit_instance = 0
    labels = np.repeat(np.arange(n_clusters), per)
    distinct = np.arange(n_clusters * per)
    for r in range(n_rep):
        effects = gen.normal(0.0, 1.0, size=n_clusters)
        x = (true_mean + effects[:, None] + gen.normal(0.0, 1.0, size=(n_clusters, per))).ravel()
        lo, hi, _ = bootstrap_mean_ci(x, labels, n_boot=1000, seed=r)
        hit_cluster += lo <= true_mean <= hi
        lo, hi, _ = bootstrap_mean_ci(x, distinct, n_boot=1000, seed=r)
        hit_instance += lo <= true_mean <= hi
    cov_cluster = hit_cluster / n_rep
    cov_instance = hit_instance / n_rep
    assert 0.88 <= cov_cluster <= 0.99, cov_cluster
    # sanity: the check can tell an interval that ignores clustering apart
    assert cov_instance < 0.88, cov_instance


# ---------------------------------------------------------------- summarize


def test_summarize_fields_and_per_scenario():
    values = [1.0, 3.0, 10.0, 20.0, 30.0, 5.0]
    clusters = ["b", "b", "c", "c", "c", "a"]
    s = summarize(values, clusters, n_boot=2000)
    assert set(s) == {"mean", "ci", "ci_method", "n", "n_clusters", "per_scenario"}
    assert s["mean"] == pytest.approx(69.0 / 6)
    assert s["n"] == 6 and s["n_clusters"] == 3
    assert list(s["per_scenario"]) == ["a", "b", "c"]
    assert s["per_scenario"]["a"] == {"mean": 5.0, "n": 1}
    assert s["per_scenario"]["b"] == {"mean": 2.0, "n": 2}
    assert s["per_scenario"]["c"] == {"mean": pytest.approx(20.0), "n": 3}
    lo, hi = s["ci"]
    assert lo <= s["mean"] <= hi
    assert (lo, hi, s["ci_method"]) == bootstrap_mean_ci(values, clusters, n_boot=2000)
    json.dumps(s)


def test_summarize_plain_python_types_from_numpy_input():
    values = np.array([0.5, 0.7, 0.2, 0.4], dtype=np.float32)
    clusters = np.array([2, 1, 2, 1], dtype=np.int64)
    s = summarize(values, clusters, n_boot=500)
    assert type(s["mean"]) is float and type(s["n"]) is int and type(s["n_clusters"]) is int
    assert all(type(v) is float for v in s["ci"])
    assert list(s["per_scenario"]) == [1, 2]
    assert all(type(k) is int for k in s["per_scenario"])
    for entry in s["per_scenario"].values():
        assert type(entry["mean"]) is float and type(entry["n"]) is int
    json.dumps(s)


def test_summarize_n0_and_n1():
    s = summarize([], [])
    assert s == {
        "mean": None,
        "ci": None,
        "ci_method": "none (n=0)",
        "n": 0,
        "n_clusters": 0,
        "per_scenario": {},
    }
    json.dumps(s)
    s1 = summarize([0.25], ["x"])
    assert s1["mean"] == 0.25 and s1["ci"] == [0.25, 0.25] and s1["ci_method"] == "none (n=1)"
    assert s1["n"] == 1 and s1["n_clusters"] == 1
    assert s1["per_scenario"] == {"x": {"mean": 0.25, "n": 1}}


def test_summarize_nan_raises():
    with pytest.raises(ValueError, match=r"values\[1\]"):
        summarize([1.0, float("nan")], ["a", "b"])


# ---------------------------------------------------------------- summarize_proportion


def test_summarize_proportion_values():
    succ = [True, False, True, True, False, False, True, True]
    clus = ["s2", "s2", "s1", "s1", "s1", "s3", "s3", "s3"]
    s = summarize_proportion(succ, clus)
    assert set(s) == {"mean", "ci", "ci_method", "n", "n_clusters", "per_scenario", "k"}
    assert s["k"] == 5 and s["n"] == 8 and s["n_clusters"] == 3
    assert s["mean"] == pytest.approx(5 / 8)
    assert s["ci"] == pytest.approx(list(wilson(5, 8)))
    assert s["ci_method"] == "wilson"
    assert list(s["per_scenario"]) == ["s1", "s2", "s3"]
    assert s["per_scenario"]["s1"] == {"mean": pytest.approx(2 / 3), "n": 3, "k": 2}
    assert s["per_scenario"]["s2"] == {"mean": 0.5, "n": 2, "k": 1}
    assert s["per_scenario"]["s3"] == {"mean": pytest.approx(2 / 3), "n": 3, "k": 2}
    json.dumps(s)


def test_summarize_proportion_numpy_bools_and_extremes():
    s = summarize_proportion(np.zeros(12, dtype=bool), ["a"] * 12)
    assert s["k"] == 0 and type(s["k"]) is int and s["mean"] == 0.0
    assert [round(b, 2) for b in s["ci"]] == [0.00, 0.24]
    json.dumps(s)


def test_summarize_proportion_n0():
    s = summarize_proportion([], [])
    assert s["mean"] is None and s["ci"] is None and s["ci_method"] == "none (n=0)"
    assert s["n"] == 0 and s["n_clusters"] == 0 and s["per_scenario"] == {} and s["k"] == 0
    json.dumps(s)


def test_summarize_proportion_rejects_non_boolean():
    with pytest.raises(ValueError, match=r"successes\[1\]"):
        summarize_proportion([True, None], ["a", "a"])
