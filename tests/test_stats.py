"""Tests for kvnotes.stats: Wilson, the cluster intervals, summaries, nulls and library wrappers."""

import json
import math
import time

import numpy as np
import pytest

from kvnotes.stats import (
    bootstrap_mean_ci,
    mcnemar_exact,
    null_of_mean,
    pearson,
    spearman,
    summarize,
    summarize_proportion,
    wilson,
)


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


# ---------------------------------------------------------------- cluster-robust core: independent checks


def _cr2_and_ik_by_matrices(y, groups, rho):
    """CR2 variance and Imbens-Kolesar df of the OLS intercept from full N x N matrices.

    Independent of kvnotes.stats: builds H, (I - H_gg)^(-1/2) with scipy.linalg.sqrtm,
    the columns G_g = (I - H)_{., g} A_g X_g (X'X)^{-1} and the eigenvalues of G' Omega G
    under Omega = (1 - rho) I + rho U U'.
    """
    from scipy.linalg import sqrtm

    y = np.asarray(y, dtype=float)
    groups = np.asarray(groups)
    n = y.size
    x = np.ones((n, 1))
    xtx_inv = np.linalg.inv(x.T @ x)
    h = x @ xtx_inv @ x.T
    resid = y - h @ y
    labs = sorted(set(groups.tolist()))
    u = np.stack([(groups == g).astype(float) for g in labs], axis=1)
    var = 0.0
    cols = []
    for j, g in enumerate(labs):
        idx = np.flatnonzero(groups == g)
        a_g = np.real(sqrtm(np.linalg.inv(np.eye(idx.size) - h[np.ix_(idx, idx)])))
        var += float((xtx_inv @ x[idx].T @ a_g @ resid[idx])[0] ** 2)
        cols.append(((np.eye(n) - h)[:, idx] @ a_g @ x[idx] @ xtx_inv).ravel())
    gmat = np.stack(cols, axis=1)
    omega = (1 - rho) * np.eye(n) + rho * u @ u.T
    lam = np.linalg.eigvalsh(gmat.T @ omega @ gmat)
    return var, lam.sum() ** 2 / (lam**2).sum()


def _anova_icc_loop(y, groups):
    """One-way ANOVA intra-class correlation with unequal group sizes, written with loops."""
    labs = sorted(set(groups))
    data = {g: [v for v, h in zip(y, groups) if h == g] for g in labs}
    n_tot = len(y)
    k = len(labs)
    grand = sum(y) / n_tot
    ssb = sum(len(d) * (sum(d) / len(d) - grand) ** 2 for d in data.values())
    ssw = sum(sum((v - sum(d) / len(d)) ** 2 for v in d) for d in data.values())
    msb, msw = ssb / (k - 1), ssw / (n_tot - k)
    n0 = (n_tot - sum(len(d) ** 2 for d in data.values()) / n_tot) / (k - 1)
    sb2 = max((msb - msw) / n0, 0.0)
    return min(max(sb2 / (sb2 + msw), 0.0), 1.0)


def test_equal_sizes_matches_statsmodels_cluster_t():
    """Equal scenario sizes: CR2 = CR1 and IK df = G - 1, so ci is statsmodels' cluster t interval."""
    import statsmodels.api as sm

    x, labels = _clustered_data(7, n_clusters=6, per=4)
    codes = np.unique(labels, return_inverse=True)[1]
    res = sm.OLS(np.asarray(x), np.ones((len(x), 1))).fit(
        cov_type="cluster", cov_kwds={"groups": codes, "use_correction": True, "df_correction": True}, use_t=True)
    s = summarize(x, labels, n_boot=200)
    assert s["se"] == pytest.approx(float(res.bse[0]), rel=1e-10)
    assert s["df"] == pytest.approx(5.0, rel=1e-10)
    assert s["ci"] == pytest.approx(res.conf_int(0.05)[0].tolist(), rel=1e-10)
    assert s["mean"] == pytest.approx(float(res.params[0]), rel=1e-12)


def test_unequal_sizes_cr1_part_matches_statsmodels():
    import statsmodels.api as sm

    from kvnotes.stats import _cluster_core

    rng = np.random.default_rng(8)
    groups = np.array([0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 4])
    y = rng.normal(size=groups.size) + groups * 0.3
    res = sm.OLS(y, np.ones((y.size, 1))).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": True, "df_correction": True}, use_t=True)
    core = _cluster_core(np.bincount(groups)[None].astype(float), np.bincount(groups, weights=y)[None],
                         np.array([1.0]))
    assert math.sqrt(core["var_cr1"][0]) == pytest.approx(float(res.bse[0]), rel=1e-10)
    # and CR2 is larger than CR1 here (bias-reduced: leverage of the big scenario)
    assert core["var_cr2"][0] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unequal_sizes_cr2_and_ik_df_match_matrix_formula(seed):
    from kvnotes.stats import _cluster_core

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=5)
    groups = np.repeat(np.arange(5), sizes)
    y = (rng.normal(0, 0.3, size=5)[groups] + rng.normal(0, 0.1, size=groups.size)).tolist()
    s = summarize(y, groups.tolist(), n_boot=200)
    rho = _anova_icc_loop(y, groups.tolist())
    var, df = _cr2_and_ik_by_matrices(y, groups, rho)
    assert s["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert s["df"] == pytest.approx(df, rel=1e-9)
    core = _cluster_core(np.bincount(groups)[None].astype(float), np.bincount(groups, weights=y)[None],
                         np.array([sum((v - np.mean([w for w, h in zip(y, groups) if h == g])) ** 2
                                       for v, g in zip(y, groups))]))
    assert core["icc"][0] == pytest.approx(rho, abs=1e-12)
    # Bell-McCaffrey df is the rho = 0 case of the same formula
    assert core["df_bm"][0] == pytest.approx(_cr2_and_ik_by_matrices(y, groups, 0.0)[1], rel=1e-9)
    q = __import__("scipy.stats", fromlist=["t"]).t.ppf(0.975, df)
    assert s["ci"] == pytest.approx([s["mean"] - q * math.sqrt(var), s["mean"] + q * math.sqrt(var)], rel=1e-9)


def test_cr2_hand_example():
    # a = [0, 1], b = [2], c = [4, 5]: N = 5, mean 2.4, residual sums -3.8, -0.4, 4.2;
    # V = (3.8^2/(1 - 2/5) + 0.4^2/(1 - 1/5) + 4.2^2/(1 - 2/5)) / 25 = 53.6667 / 25
    s = summarize([0.0, 1.0, 2.0, 4.0, 5.0], ["a", "a", "b", "c", "c"], n_boot=200)
    assert s["mean"] == pytest.approx(2.4)
    assert s["se"] ** 2 == pytest.approx((3.8**2 / 0.6 + 0.4**2 / 0.8 + 4.2**2 / 0.6) / 25, rel=1e-12)
    assert s["scenario_weighted_mean"] == pytest.approx((0.5 + 2.0 + 4.5) / 3)


# ---------------------------------------------------------------- summarize

SUMMARY_KEYS = {"mean", "ci", "ci_method", "n", "n_clusters", "per_scenario", "se", "df",
                "scenario_weighted_mean", "scenario_weighted_ci", "scenario_weighted_ci_method",
                "ci_bootstrap", "ci_bootstrap_method", "warning"}


def test_summarize_fields_and_per_scenario():
    values = [1.0, 3.0, 10.0, 20.0, 30.0, 5.0]
    clusters = ["b", "b", "c", "c", "c", "a"]
    s = summarize(values, clusters, n_boot=2000)
    assert set(s) == SUMMARY_KEYS
    assert s["mean"] == pytest.approx(69.0 / 6)
    assert s["scenario_weighted_mean"] == pytest.approx((5.0 + 2.0 + 20.0) / 3)
    assert s["n"] == 6 and s["n_clusters"] == 3
    assert list(s["per_scenario"]) == ["a", "b", "c"]
    assert s["per_scenario"]["a"] == {"mean": 5.0, "n": 1}
    assert s["per_scenario"]["b"] == {"mean": 2.0, "n": 2}
    assert s["per_scenario"]["c"] == {"mean": pytest.approx(20.0), "n": 3}
    lo, hi = s["ci"]
    assert lo < s["mean"] < hi
    assert hi - s["mean"] == pytest.approx(s["mean"] - lo)
    assert "CR2" in s["ci_method"] and "Imbens-Kolesar" in s["ci_method"] and "G=3" in s["ci_method"]
    assert f"df={s['df']:.3g}" in s["ci_method"]
    lo_b, hi_b, m_b = bootstrap_mean_ci(values, clusters, n_boot=2000)
    assert s["ci_bootstrap"] == [lo_b, hi_b] and s["ci_bootstrap_method"].startswith(m_b)
    json.dumps(s)


def test_summarize_scenario_weighted_ci_is_t_on_scenario_means():
    from scipy import stats as sps

    x, labels = _clustered_data(9, n_clusters=7, per=3)
    x = x[:-2]  # unequal sizes: last scenario keeps 1 pair
    labels = labels[:-2]
    s = summarize(x, labels, n_boot=200)
    means = [e["mean"] for e in s["per_scenario"].values()]
    want = sps.t.interval(0.95, len(means) - 1, loc=np.mean(means), scale=sps.sem(means))
    assert s["scenario_weighted_ci"] == pytest.approx(list(want), rel=1e-10)
    assert "df=6" in s["scenario_weighted_ci_method"]


def test_summarize_plain_python_types_from_numpy_input():
    values = np.array([0.5, 0.7, 0.2, 0.4], dtype=np.float32)
    clusters = np.array([2, 1, 2, 1], dtype=np.int64)
    s = summarize(values, clusters, n_boot=500)
    assert type(s["mean"]) is float and type(s["n"]) is int and type(s["n_clusters"]) is int
    for key in ("ci", "scenario_weighted_ci", "ci_bootstrap"):
        assert all(type(v) is float for v in s[key])
    assert type(s["se"]) is float and type(s["df"]) is float and type(s["scenario_weighted_mean"]) is float
    assert list(s["per_scenario"]) == [1, 2]
    assert all(type(k) is int for k in s["per_scenario"])
    for entry in s["per_scenario"].values():
        assert type(entry["mean"]) is float and type(entry["n"]) is int
    json.dumps(s)


def test_summarize_n0():
    s = summarize([], [])
    assert set(s) == SUMMARY_KEYS
    assert s["mean"] is None and s["ci"] is None and s["ci_method"] == "none (n=0)"
    assert s["n"] == 0 and s["n_clusters"] == 0 and s["per_scenario"] == {}
    assert all(s[k] is None for k in ("se", "df", "scenario_weighted_mean", "scenario_weighted_ci", "ci_bootstrap"))
    json.dumps(s)


def test_summarize_n1_gives_no_interval_with_reason():
    s1 = summarize([0.25], ["x"])
    assert s1["mean"] == 0.25 and s1["ci"] is None
    assert s1["ci_method"].startswith("none (n=1, 1 scenario")
    assert s1["scenario_weighted_ci"] is None and s1["ci_bootstrap"] is None
    assert s1["n"] == 1 and s1["n_clusters"] == 1
    assert s1["per_scenario"] == {"x": {"mean": 0.25, "n": 1}}
    assert "1 scenario" in s1["warning"]
    json.dumps(s1)


def test_summarize_one_cluster_no_iid_fallback():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30).tolist()
    s = summarize(x, ["only"] * 30, n_boot=500)
    assert s["ci"] is None and s["scenario_weighted_ci"] is None and s["ci_bootstrap"] is None
    assert "1 scenario" in s["ci_method"] and "no fallback" in s["ci_method"]
    assert s["mean"] == pytest.approx(float(np.mean(x)))
    assert s["warning"] is not None and "only 1 scenario" in s["warning"]


@pytest.mark.parametrize("g", [2, 3, 4])
def test_summarize_warns_below_five_scenarios(g):
    x, labels = _clustered_data(10, n_clusters=g, per=3)
    s = summarize(x, labels, n_boot=200)
    assert s["warning"].startswith("fewer than 5 scenarios") and f"G={g}" in s["warning"]
    assert "coverage not guaranteed" in s["warning"]
    assert s["ci"] is not None and s["ci"][1] > s["ci"][0]


def test_summarize_no_warning_from_five_scenarios():
    x, labels = _clustered_data(10, n_clusters=5, per=2)
    assert summarize(x, labels, n_boot=200)["warning"] is None


def test_summarize_constant_data_zero_width():
    labels = [i // 6 for i in range(48)]
    s = summarize([0.1] * 48, labels, n_boot=200)
    assert s["ci"] == [0.1, 0.1] and s["scenario_weighted_ci"] == [0.1, 0.1]
    assert s["se"] == 0.0


def test_summarize_singletons_is_t_interval():
    # every scenario holds one pair: the pooled and the scenario-weighted means coincide and
    # CR2 with IK df reduces to the ordinary one-sample t interval
    from scipy import stats as sps

    x = [0.3, 0.9, 0.4, 0.7, 0.1, 0.5]
    s = summarize(x, list("abcdef"), n_boot=200)
    want = sps.t.interval(0.95, 5, loc=np.mean(x), scale=sps.sem(x))
    assert s["ci"] == pytest.approx(list(want), rel=1e-10)
    assert s["scenario_weighted_ci"] == pytest.approx(list(want), rel=1e-10)


def test_summarize_alpha_controls_width():
    x, labels = _clustered_data(2)
    a = summarize(x, labels, n_boot=200, alpha=0.10)
    b = summarize(x, labels, n_boot=200, alpha=0.05)
    assert b["ci"][0] < a["ci"][0] and a["ci"][1] < b["ci"][1]
    assert "90%" in a["ci_method"] and "95%" in b["ci_method"]


def test_summarize_pooled_and_scenario_weighted_differ_with_unequal_sizes():
    s = summarize([0.0, 1.0, 1.0, 1.0, 1.0], ["a", "b", "b", "b", "b"], n_boot=200)
    assert s["mean"] == pytest.approx(0.8) and s["scenario_weighted_mean"] == pytest.approx(0.5)


def test_summarize_nan_raises():
    with pytest.raises(ValueError, match=r"values\[1\]"):
        summarize([1.0, float("nan")], ["a", "b"])


def test_summarize_bad_n_boot_and_alpha_raise():
    with pytest.raises(ValueError):
        summarize([1.0, 2.0], ["a", "b"], n_boot=0)
    with pytest.raises(ValueError):
        summarize([1.0, 2.0], ["a", "b"], alpha=1.5)


# ---------------------------------------------------------------- summarize_proportion

PROPORTION_KEYS = {"mean", "ci", "ci_method", "n", "n_clusters", "per_scenario", "k", "se", "df",
                   "design_effect", "n_effective", "scenario_weighted_mean", "scenario_weighted_ci",
                   "scenario_weighted_ci_method", "wilson", "wilson_method", "warning"}


def test_summarize_proportion_values():
    succ = [True, False, True, True, False, False, True, True]
    clus = ["s2", "s2", "s1", "s1", "s1", "s3", "s3", "s3"]
    s = summarize_proportion(succ, clus)
    assert set(s) == PROPORTION_KEYS
    assert s["k"] == 5 and s["n"] == 8 and s["n_clusters"] == 3
    assert s["mean"] == pytest.approx(5 / 8)
    assert s["scenario_weighted_mean"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    # statsmodels' Wilson (the cross-check) equals the hand-written wilson()
    assert s["wilson"] == pytest.approx(list(wilson(5, 8)), abs=1e-12)
    assert list(s["per_scenario"]) == ["s1", "s2", "s3"]
    assert s["per_scenario"]["s1"] == {"mean": pytest.approx(2 / 3), "n": 3, "k": 2}
    assert s["per_scenario"]["s2"] == {"mean": 0.5, "n": 2, "k": 1}
    assert s["per_scenario"]["s3"] == {"mean": pytest.approx(2 / 3), "n": 3, "k": 2}
    assert s["ci"][0] < s["mean"] < s["ci"][1]
    assert s["ci_method"].startswith("design-effect Wilson") and "G=3" in s["ci_method"]
    assert s["warning"].startswith("fewer than 5 scenarios")
    json.dumps(s)


@pytest.mark.parametrize("k,n", [(0, 12), (3, 7), (12, 12), (40, 100)])
def test_summarize_proportion_wilson_cross_check(k, n):
    succ = [True] * k + [False] * (n - k)
    s = summarize_proportion(succ, [i % 4 for i in range(n)])
    assert s["wilson"] == pytest.approx(list(wilson(k, n)), abs=1e-12)


def test_summarize_proportion_ci_is_wilson_on_effective_n_with_t():
    """The design-effect Wilson interval re-derived from se, df and the quadratic Wilson form."""
    from scipy import stats as sps

    rng = np.random.default_rng(12)
    labels = np.repeat(np.arange(8), rng.integers(1, 6, size=8))
    p_g = rng.beta(1.0, 1.5, size=8)
    succ = (rng.random(labels.size) < p_g[labels]).tolist()
    s = summarize_proportion(succ, labels.tolist())
    n, p = s["n"], s["mean"]
    assert 0 < p < 1
    deff = s["se"] ** 2 / (p * (1 - p) / n)
    assert s["design_effect"] == pytest.approx(deff, rel=1e-10)
    n_eff = n / max(deff, 1.0)
    assert s["n_effective"] == pytest.approx(n_eff, rel=1e-10)
    q = float(sps.t.ppf(sps.norm.cdf(1.96), s["df"]))  # the level z = 1.96 fixes
    want = _wilson_quadratic(p * n_eff, n_eff, q)
    assert s["ci"] == pytest.approx([max(0.0, want[0]), min(1.0, want[1])], rel=1e-9)


def test_summarize_proportion_extremes_keep_width():
    """p_hat = 0 or 1: worst-case n_eff = n^2 / sum n_g^2 (ICC = 1), never a zero-width interval."""
    from scipy import stats as sps

    labels = list("aabbbccddeee")  # sizes 2, 3, 2, 2, 3
    sizes = [2, 3, 2, 2, 3]
    n_worst = 12**2 / sum(m * m for m in sizes)
    for flag in (False, True):
        s = summarize_proportion([flag] * 12, labels)
        assert s["n_effective"] == pytest.approx(n_worst)
        assert s["design_effect"] is None and "undefined" in s["ci_method"]
        q = float(sps.t.ppf(sps.norm.cdf(1.96), s["df"]))
        lo, hi = _wilson_quadratic(n_worst * float(flag), n_worst, q)
        if flag:
            assert s["ci"][1] == 1.0 and s["ci"][0] == pytest.approx(lo, rel=1e-9) and s["ci"][0] < 0.6
        else:
            assert s["ci"][0] == 0.0 and s["ci"][1] == pytest.approx(hi, rel=1e-9) and s["ci"][1] > 0.4
        # the same data treated as independent give a much narrower interval
        assert s["ci"][1] - s["ci"][0] > s["wilson"][1] - s["wilson"][0] + 0.2


def test_summarize_proportion_numpy_bools_one_cluster():
    s = summarize_proportion(np.zeros(12, dtype=bool), ["a"] * 12)
    assert s["k"] == 0 and type(s["k"]) is int and s["mean"] == 0.0
    assert s["ci"] is None and "1 scenario" in s["ci_method"] and "only 1 scenario" in s["warning"]
    assert [round(b, 2) for b in s["wilson"]] == [0.00, 0.24]
    json.dumps(s)


def test_summarize_proportion_n0():
    s = summarize_proportion([], [])
    assert s["mean"] is None and s["ci"] is None and s["ci_method"] == "none (n=0)"
    assert s["n"] == 0 and s["n_clusters"] == 0 and s["per_scenario"] == {} and s["k"] == 0
    assert s["wilson"] is None and s["scenario_weighted_mean"] is None
    json.dumps(s)


def test_summarize_proportion_rejects_non_boolean():
    with pytest.raises(ValueError, match=r"successes\[1\]"):
        summarize_proportion([True, None], ["a", "a"])


def test_summarize_proportion_rejects_bad_z():
    with pytest.raises(ValueError):
        summarize_proportion([True, False], ["a", "b"], z=0)


def test_summarize_proportion_z_sets_level():
    succ = [True, False, True, False, False, True, True, False, True, True]
    labels = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    wide = summarize_proportion(succ, labels, z=2.576)
    narrow = summarize_proportion(succ, labels, z=1.645)
    assert wide["ci"][0] < narrow["ci"][0] and narrow["ci"][1] < wide["ci"][1]
    assert wide["wilson"] == pytest.approx(list(wilson(6, 10, 2.576)), abs=1e-9)


# ---------------------------------------------------------------- null_of_mean


def test_null_of_mean_keys_and_exact_expectation():
    draws = [[0.1, 0.2, 0.3], [0.5], [0.0, 1.0, 0.5, 0.5]]
    out = null_of_mean(draws, {"obs": [0.3, 0.5, 1.0]}, 0.05)
    old_keys = {"n", "n_draws", "mean", "lo", "median", "hi", "per_pair_mean", "obs_mean", "p_obs_ge_null"}
    assert old_keys <= set(out)
    assert {"B", "p_floor", "n_draws_per_pair", "method"} <= set(out)
    assert out["n"] == 3 and out["n_draws"] == 4 and out["n_draws_per_pair"] == {"min": 1, "max": 4}
    assert out["B"] == 10000 and out["p_floor"] == pytest.approx(1 / 10001)
    assert out["per_pair_mean"] == pytest.approx([0.2, 0.5, 0.5])
    assert out["mean"] == pytest.approx(0.4)
    assert out["obs_mean"] == pytest.approx(0.6)
    assert out["lo"] <= out["median"] <= out["hi"]
    json.dumps(out)


def test_null_of_mean_p_floor_and_ceiling():
    rng = np.random.default_rng(0)
    draws = [rng.normal(size=50).tolist() for _ in range(10)]
    out = null_of_mean(draws, {"big": [10.0] * 10, "small": [-10.0] * 10}, 0.05, n_means=2000, seed=1)
    assert out["p_big_ge_null"] == out["p_floor"] == pytest.approx(1 / 2001)
    assert out["p_small_ge_null"] == 1.0


def test_null_of_mean_matches_exact_null_distribution():
    # two pairs with draws {0, 1}: null mean is 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    out = null_of_mean([[0.0, 1.0], [0.0, 1.0]], {"one": [1.0, 1.0], "half": [0.5, 0.5]}, 0.05,
                       n_means=20000, seed=3)
    assert out["p_one_ge_null"] == pytest.approx(0.25, abs=0.015)
    assert out["p_half_ge_null"] == pytest.approx(0.75, abs=0.015)
    assert (out["lo"], out["median"], out["hi"]) == (0.0, 0.5, 1.0)


def test_null_of_mean_forced_draws_and_ties():
    # every pair forced: the null is a point; an observed mean equal to it is a tie (p = 1)
    out = null_of_mean([[0.1], [0.2], [0.3]], {"same": [0.3, 0.1, 0.2]}, 0.05)
    assert out["lo"] == out["median"] == out["hi"] == pytest.approx(0.2)
    assert out["p_same_ge_null"] == 1.0


def test_null_of_mean_requires_2000_draws_for_p_values():
    draws = [[0.0, 1.0]] * 3
    with pytest.raises(ValueError, match="2000"):
        null_of_mean(draws, {"x": [1.0, 1.0, 1.0]}, 0.05, n_means=1999)
    out = null_of_mean(draws, {}, 0.05, n_means=500)  # no p-value reported: fewer draws allowed
    assert out["B"] == 500 and not any(k.startswith("p_") and k != "p_floor" for k in out)


def test_null_of_mean_seeded_and_validates():
    draws = [[0.0, 0.3, 1.0], [0.2, 0.4]]
    assert null_of_mean(draws, {}, 0.05, seed=4) == null_of_mean(draws, {}, 0.05, seed=4)
    with pytest.raises(ValueError):
        null_of_mean([], {}, 0.05)
    with pytest.raises(ValueError):
        null_of_mean([[0.1], []], {}, 0.05)
    with pytest.raises(ValueError):
        null_of_mean([[0.1], [float("nan")]], {}, 0.05)
    with pytest.raises(ValueError, match="pairs"):
        null_of_mean(draws, {"x": [1.0]}, 0.05)


# ---------------------------------------------------------------- library wrappers


def test_mcnemar_exact_known_values():
    # two-sided exact: 2 * P(Binomial(12, 1/2) <= 3) = 2 * (1 + 12 + 66 + 220) / 4096
    assert mcnemar_exact(3, 9) == pytest.approx(2 * sum(math.comb(12, i) for i in range(4)) / 2**12, abs=1e-15)
    assert mcnemar_exact(3, 9) == pytest.approx(0.14599609375, abs=1e-15)
    assert mcnemar_exact(9, 3) == mcnemar_exact(3, 9)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)
    with pytest.raises(ValueError):
        mcnemar_exact(1.5, 3)


def test_pearson_and_spearman():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    # Spearman = Pearson on average ranks (ties share the mean rank)
    a, b = [1, 2, 2, 3, 5], [10, 30, 20, 20, 50]
    ra, rb = [1, 2.5, 2.5, 4, 5], [1, 4, 2.5, 2.5, 5]
    assert spearman(a, b) == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]), abs=1e-12)
    assert type(pearson(x, y)) is float and type(spearman(a, b)) is float
    assert pearson([1, 2, 3], [4, 4, 4]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1.0], [2.0]) is None
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        spearman([1, float("nan")], [1, 2])


# ---------------------------------------------------------------- cluster_robust_ols (CR2 regression)


def _unequal_clusters(seed, sizes=(5, 1, 2, 3, 4, 2, 6)):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    y = rng.normal(0, 0.3, size=len(sizes))[groups] + rng.normal(0, 0.1, size=groups.size)
    return y, groups


@pytest.mark.parametrize("seed", [0, 3])
def test_cluster_robust_ols_constant_design_is_summarize(seed):
    """A constant-only design is the pooled mean: same estimate, CR2 SE, IK df and interval as summarize."""
    from kvnotes.stats import cluster_robust_ols

    y, groups = _unequal_clusters(seed)
    fit = cluster_robust_ols(np.ones((y.size, 1)), y, groups.tolist())
    s = summarize(y.tolist(), groups.tolist(), n_boot=200)
    assert fit["params"][0] == pytest.approx(s["mean"], rel=1e-12)
    assert fit["se"][0] == pytest.approx(s["se"], rel=1e-9)
    assert fit["df"][0] == pytest.approx(s["df"], rel=1e-9)
    assert fit["ci"][0] == pytest.approx(s["ci"], rel=1e-9)


def test_cluster_robust_ols_cr1_matches_statsmodels():
    import statsmodels.api as sm

    from kvnotes.stats import cluster_robust_ols

    y, groups = _unequal_clusters(5)
    rng = np.random.default_rng(1)
    X = np.column_stack([np.ones(y.size), rng.normal(size=y.size), (groups % 2).astype(float)])
    fit = cluster_robust_ols(X, y, groups.tolist())
    ref = sm.OLS(y, X).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
    assert fit["params"] == pytest.approx(ref.params.tolist(), rel=1e-10)
    assert fit["se_cr1"] == pytest.approx(ref.bse.tolist(), rel=1e-9)
    assert fit["se"] != pytest.approx(fit["se_cr1"], rel=1e-3)   # CR2 is not CR1 with unequal clusters


def test_cluster_robust_ols_two_arms_is_two_pooled_means():
    """Arm constant within each scenario: the arm difference's CR2 variance is the sum of the two arms' pooled-mean
    CR2 variances (the design splits into two constant-only problems); the fitted arm means are summarize's."""
    from kvnotes.stats import cluster_robust_ols

    y, groups = _unequal_clusters(2, sizes=(3, 1, 4, 2, 5, 2, 1, 3))
    arm = (groups >= 4).astype(float)
    X = np.column_stack([np.ones(y.size), arm])
    fit = cluster_robust_ols(X, y, groups.tolist(), contrasts=[[1.0, 0.0], [1.0, 1.0]])
    s0 = summarize(y[arm == 0].tolist(), groups[arm == 0].tolist(), n_boot=200)
    s1 = summarize(y[arm == 1].tolist(), groups[arm == 1].tolist(), n_boot=200)
    assert fit["params"][1] == pytest.approx(s1["mean"] - s0["mean"], rel=1e-10)
    assert fit["se"][1] ** 2 == pytest.approx(s0["se"] ** 2 + s1["se"] ** 2, rel=1e-9)
    assert fit["contrasts"][0]["se"] == pytest.approx(s0["se"], rel=1e-9)
    assert fit["contrasts"][1]["se"] == pytest.approx(s1["se"], rel=1e-9)
    # BM df of an arm's mean is that arm's own constant-only BM df: 4 scenarios, not the fit's 8
    assert fit["contrasts"][1]["df_bm"] < 4.0


def test_cluster_robust_ols_keeps_coverage_where_cr1_does_not():
    """A cell mean resting on 3 of 23 scenarios (the map's sparse D = 48 cells): CR2 with the contrast's IK df keeps
    95 % coverage; CR1 with G - 1 df under-covers. 1000 simulated data sets, fixed seed."""
    from scipy import stats as sps

    from kvnotes.stats import cluster_robust_ols

    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(23), 3)
    sparse = (groups >= 20).astype(float)
    X = np.column_stack([np.ones(groups.size), sparse])
    hit_cr2 = hit_cr1 = 0
    reps = 1000
    for _ in range(reps):
        y = 0.3 + 0.1 * sparse + rng.normal(0, 0.3, 23)[groups] + rng.normal(0, 0.1, groups.size)
        c = cluster_robust_ols(X, y, groups.tolist(), contrasts=[[1.0, 1.0]])["contrasts"][0]
        hit_cr2 += c["ci"][0] <= 0.4 <= c["ci"][1]
        half1 = sps.t.ppf(0.975, 22) * c["se_cr1"]
        hit_cr1 += abs(c["estimate"] - 0.4) <= half1
    assert hit_cr2 / reps >= 0.93
    assert hit_cr1 / reps <= 0.90


def test_cluster_robust_ols_rejects_bad_input():
    from kvnotes.stats import cluster_robust_ols

    X = np.column_stack([np.ones(6), np.ones(6)])
    with pytest.raises(ValueError, match="rank-deficient"):
        cluster_robust_ols(X, np.arange(6.0), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="at least 2 clusters"):
        cluster_robust_ols(np.ones((4, 1)), np.arange(4.0), ["a"] * 4)
    with pytest.raises(ValueError, match="finite"):
        cluster_robust_ols(np.ones((3, 1)), np.array([0.0, np.nan, 1.0]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="columns"):
        cluster_robust_ols(np.ones((4, 1)), np.arange(4.0), [0, 0, 1, 1], contrasts=[[1.0, 0.0]])


def test_cluster_robust_ols_scenario_fixing_its_own_fit_is_finite():
    """A scenario whose pairs alone determine a coefficient (I - H_gg singular) uses the generalised inverse."""
    from kvnotes.stats import cluster_robust_ols

    y, groups = _unequal_clusters(4, sizes=(3, 3, 3, 1))
    X = np.column_stack([np.ones(y.size), (groups == 3).astype(float)])
    fit = cluster_robust_ols(X, y, groups.tolist())
    assert all(np.isfinite(fit["se"])) and fit["params"][1] == pytest.approx(y[-1] - y[:-1].mean())
