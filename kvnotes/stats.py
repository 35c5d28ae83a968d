"""Statistics for per-instance results clustered by scenario.

Instances generated from the same scenario share a template, so their outcomes
are correlated; treating them as independent understates uncertainty. The
bootstrap here therefore resamples scenarios first and instances second, and
every summary reports how its interval was obtained.

numpy only (no scipy). All returned numbers are plain Python floats/ints so
that summaries can be written straight to JSON.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["wilson", "bootstrap_mean_ci", "summarize", "summarize_proportion"]

# Upper bound on the number of drawn instances held in memory per chunk of
# bootstrap replicates; keeps memory bounded for large inputs while the work
# inside each chunk stays fully vectorised.
_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n.

    Used instead of the Wald interval because it stays inside [0, 1] and keeps
    sensible width at k = 0 or k = n, which is common with small n. Bounds are
    clipped to [0, 1] but not rounded.
    """
    k = _as_count(k, "k")
    n = _as_count(n, "n")
    if n == 0:
        raise ValueError("wilson: n must be positive (no trials, so no interval)")
    if k > n:
        raise ValueError(f"wilson: k={k} exceeds n={n}")
    z = float(z)
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"wilson: z must be a finite non-negative number, got {z!r}")

    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # The exact interval always contains p_hat (lower bound is exactly 0 at
    # k = 0, upper exactly 1 at k = n); min/max only undo floating-point
    # cancellation error of ~1e-17 there, they do not round.
    lo = min(max(0.0, centre - half), p)
    hi = max(min(1.0, centre + half), p)
    return (lo, hi)


# --------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------


def bootstrap_mean_ci(
    values: Iterable[Any],
    clusters: Iterable[Hashable],
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: Any = 0,
) -> tuple[float, float, str]:
    """Seeded percentile bootstrap CI for the pooled mean of ``values``.

    With two or more clusters a two-stage bootstrap is used (clusters with
    replacement, then instances with replacement inside each drawn cluster),
    because instances within a scenario are not independent. With a single
    cluster only the instance stage is possible. Returns (lo, hi, method).
    """
    vals = _check_values(values)
    labels = _check_clusters(clusters, len(vals))
    n_boot = _check_n_boot(n_boot)
    alpha = _check_alpha(alpha)
    n = len(vals)
    if n == 0:
        raise ValueError("bootstrap_mean_ci: no values (n=0); cannot form an interval")
    if n == 1:
        return (vals[0], vals[0], "none (n=1)")

    arr = np.asarray(vals, dtype=np.float64)
    # Work on deviations from one data value: exact zero spread for constant
    # data (so the interval collapses exactly) and better precision otherwise.
    shift = float(arr[0])
    dev = arr - shift
    rng = np.random.default_rng(seed)

    codes, uniq = _encode(labels)
    n_clusters = len(uniq)
    if n_clusters >= 2:
        stats = _two_stage_stats(dev, codes, n_clusters, n_boot, rng)
        method = (
            "two-stage cluster bootstrap (scenario, then instance), "
            f"percentile, B={n_boot}"
        )
    else:
        stats = _instance_stats(dev, n_boot, rng)
        method = f"percentile bootstrap over instances (1 cluster), B={n_boot}"

    lo_q, hi_q = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (shift + float(lo_q), shift + float(hi_q), method)


def _instance_stats(dev: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of B ordinary (iid) bootstrap resamples, vectorised over B."""
    n = dev.shape[0]
    out = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        out[start : start + b] = dev[idx].sum(axis=1) / n
    return out


def _two_stage_stats(
    dev: np.ndarray,
    codes: np.ndarray,
    n_clusters: int,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pooled means of B two-stage (cluster, then instance) resamples.

    Each replicate draws ``n_clusters`` clusters with replacement; each drawn
    cluster of size m contributes m instances drawn with replacement from it.
    The statistic is the mean over all drawn instances, so replicate sizes
    vary when cluster sizes differ, exactly as the pooled mean weights them.
    Ragged draws are flattened and summed per replicate with bincount.
    """
    order = np.argsort(codes, kind="stable")
    dev_sorted = dev[order]
    sizes = np.bincount(codes, minlength=n_clusters)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    n = dev.shape[0]

    out = np.empty(n_boot, dtype=np.float64)
    # A replicate holds n instances on average.
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        drawn = rng.integers(0, n_clusters, size=(b, n_clusters))
        drawn_sizes = sizes[drawn]
        counts = drawn_sizes.sum(axis=1)
        flat_drawn = drawn.ravel()
        flat_sizes = drawn_sizes.ravel()
        # One entry per drawn instance: uniform position inside its cluster.
        per_inst_size = np.repeat(flat_sizes, flat_sizes)
        within = rng.integers(0, per_inst_size)
        pos = np.repeat(starts[flat_drawn], flat_sizes) + within
        rep_id = np.repeat(np.arange(b), counts)
        sums = np.bincount(rep_id, weights=dev_sorted[pos], minlength=b)
        out[start : start + b] = sums / counts
    return out


# --------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------


def summarize(
    values: Iterable[Any],
    clusters: Iterable[Hashable],
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: Any = 0,
) -> dict:
    """JSON-ready summary of a clustered continuous metric.

    Returns mean, bootstrap CI and its method, counts and per-scenario means.
    With no values it returns a record of Nones instead of raising, so that a
    result is still written when every instance was excluded.
    """
    vals = _check_values(values)
    labels = _check_clusters(clusters, len(vals))
    n_boot = _check_n_boot(n_boot)
    alpha = _check_alpha(alpha)
    n = len(vals)
    if n == 0:
        return _empty_record()

    groups = _group(vals, labels)
    per_scenario = {
        lab: {"mean": _mean(g), "n": len(g)} for lab, g in groups.items()
    }
    lo, hi, method = bootstrap_mean_ci(vals, labels, n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "mean": _mean(vals),
        "ci": [float(lo), float(hi)],
        "ci_method": method,
        "n": n,
        "n_clusters": len(groups),
        "per_scenario": per_scenario,
    }


def summarize_proportion(
    successes: Iterable[Any],
    clusters: Iterable[Hashable],
    z: float = 1.96,
) -> dict:
    """JSON-ready summary of a clustered success/failure outcome.

    The interval is Wilson on the pooled k/n (it does not model clustering;
    ci_method says so by naming the method). Same keys as ``summarize`` plus
    ``k``; an empty input yields a record of Nones rather than an exception.
    """
    flags = _check_bools(successes)
    labels = _check_clusters(clusters, len(flags))
    n = len(flags)
    if n == 0:
        rec = _empty_record()
        rec["k"] = 0
        return rec

    k = sum(flags)
    lo, hi = wilson(k, n, z)
    groups = _group(flags, labels)
    per_scenario = {
        lab: {"mean": sum(g) / len(g), "n": len(g), "k": int(sum(g))}
        for lab, g in groups.items()
    }
    return {
        "mean": k / n,
        "ci": [float(lo), float(hi)],
        "ci_method": "wilson",
        "n": n,
        "n_clusters": len(groups),
        "per_scenario": per_scenario,
        "k": int(k),
    }


# --------------------------------------------------------------------------
# Validation and helpers
# --------------------------------------------------------------------------


def _empty_record() -> dict:
    return {
        "mean": None,
        "ci": None,
        "ci_method": "none (n=0)",
        "n": 0,
        "n_clusters": 0,
        "per_scenario": {},
    }


def _as_count(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {x!r}")
    x = int(x)
    if x < 0:
        raise ValueError(f"{name} must be non-negative, got {x}")
    return x


def _check_values(values: Iterable[Any]) -> list[float]:
    """Plain finite floats, or ValueError naming the first bad index."""
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {values.shape}")
    out: list[float] = []
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(f"values[{i}] is None; every value must be a finite number")
        if not isinstance(v, numbers.Real):
            raise ValueError(f"values[{i}] = {v!r} is not a real number")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"values[{i}] = {f!r} is not finite")
        out.append(f)
    return out


def _check_bools(successes: Iterable[Any]) -> list[int]:
    """0/1 ints from booleans (0 and 1 integers also accepted)."""
    if isinstance(successes, np.ndarray) and successes.ndim != 1:
        raise ValueError(f"successes must be one-dimensional, got shape {successes.shape}")
    out: list[int] = []
    for i, s in enumerate(successes):
        if isinstance(s, (bool, np.bool_)):
            out.append(int(bool(s)))
        elif isinstance(s, numbers.Integral) and int(s) in (0, 1):
            out.append(int(s))
        else:
            raise ValueError(f"successes[{i}] = {s!r} is not a boolean")
    return out


def _check_clusters(clusters: Iterable[Hashable], n: int) -> list[Hashable]:
    labels = []
    for lab in clusters:
        if isinstance(lab, np.generic):
            lab = lab.item()  # numpy scalars are not valid JSON keys
        labels.append(lab)
    if len(labels) != n:
        raise ValueError(f"clusters has {len(labels)} labels but there are {n} values")
    for i, lab in enumerate(labels):
        try:
            hash(lab)
        except TypeError:
            raise ValueError(f"clusters[{i}] = {lab!r} is not hashable") from None
    return labels


def _check_n_boot(n_boot: Any) -> int:
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, numbers.Integral):
        raise ValueError(f"n_boot must be an integer, got {n_boot!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return int(n_boot)


def _check_alpha(alpha: Any) -> float:
    a = float(alpha)
    if not (0.0 < a < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return a


def _sorted_labels(labels: Iterable[Hashable]) -> list[Hashable]:
    uniq = set(labels)
    try:
        return sorted(uniq)
    except TypeError:  # mixed label types: order deterministically anyway
        return sorted(uniq, key=lambda x: (type(x).__name__, repr(x)))


def _encode(labels: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    uniq = _sorted_labels(labels)
    index = {lab: i for i, lab in enumerate(uniq)}
    return np.fromiter((index[lab] for lab in labels), dtype=np.intp, count=len(labels)), uniq


def _group(vals: Sequence[Any], labels: Sequence[Hashable]) -> dict[Hashable, list[Any]]:
    groups: dict[Hashable, list[Any]] = {lab: [] for lab in _sorted_labels(labels)}
    for v, lab in zip(vals, labels):
        groups[lab].append(v)
    return groups


def _mean(xs: Sequence[float]) -> float:
    """Mean shifted by the first value (exact for constant data), fsum-accurate."""
    shift = xs[0]
    return float(shift + math.fsum(x - shift for x in xs) / len(xs))
