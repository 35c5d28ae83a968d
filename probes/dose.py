"""P7 field-placement dose-response (paper_spec §3.7): does the field's own K/V carry more of the decision the closer
it sits to the decision?

Run on `scenario=diverse_dose` (scenarios/dose.py: the same instances at five placements). Per pair the engine
decodes the field-only splice [a, b), the downstream-only splice [b, dpos), the full splice (= the oracle, a sanity
check) and suffix splices (the last max(1, round(f (dpos - a))) positions). Per level: field-only and downstream-only
recovery with cluster-bootstrap CIs, the distance from the field to the decision in tokens, and the paper's "suffix
fraction for 80 %" (the smallest f whose suffix splice reaches 0.8, else 1). Across pairs: Spearman's rho of
field-only recovery against the field's distance, with a cluster-bootstrap CI.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
from scipy import stats as sps

from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import spearman, summarize
from probes.base import ProbeSpec
from probes.common import (Split, boot_args, end_states, pair_row, prefill_pair,
                           readout_key, recoveries)

CONTRACT = ProbeSpec(
    name="dose", paper_refs=("P7", "§3.7"),
    options={"batch_size": 400},
    scenarios={"diverse_dose": {}},          # the instances carry their placement level
    not_reanalysable="its rows keep recoveries under the run's readout, not the spliced rows' candidate logits, "
                     "nor the unspliced stale / oracle states")
FRACS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
SETS = ("field", "downstream", "full")


def measure(lm, pair, token_ids, batch_size: int = 400, check_decode: bool = False) -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    (a, b), dpos = pair.span, pair.dpos
    n = dpos - a
    splices = [Splice(tuple(range(a, b))), Splice(tuple(range(b, dpos))), Splice(tuple(range(a, dpos)))]
    splices += [Splice(tuple(range(dpos - max(1, round(f * n)), dpos))) for f in FRACS]
    rows = SpliceEngine(lm.model, stale, oracle, last, chunk_size=batch_size).run(splices, tokens=token_ids)
    return {"states": end_states(lm.model, stale, oracle, last, token_ids), "token_ids": token_ids,
            "rows": rows.tolist(), "seconds": round(time.time() - t0, 3)}


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        info = pairs_info[inst.id]
        row = {**pair_row(inst, info, raw, ro), "level": inst.variant.get("dose_level"),
               "distance": info["dpos"] - info["span"][1]}
        if row["level"] is None:
            raise ValueError(f"{inst.id} has no dose level: run probe=dose with scenario=diverse_dose")
        if row["delta_m"]:
            rec = recoveries(raw, ro, row).tolist()
            row.update({f"{s}_recovery": rec[i] for i, s in enumerate(SETS)})
            row["suffix"] = dict(zip(map(str, FRACS), rec[len(SETS):]))
            row["suffix_frac_for_80pct"] = next((f for f in FRACS if row["suffix"][str(f)] >= 0.8), 1.0)
        split.add(inst, row)

    included, boot = split.included, boot_args(stats)
    levels = sorted({r["level"] for r in split.rows})
    agg = {"by_level": {}}
    for lv in levels:
        rows = [r for r in included if r["level"] == lv]
        gated = [r for r in split.included + split.excluded if r["level"] == lv]
        cl = [r["scenario"] for r in rows]
        agg["by_level"][lv] = {
            "n_gated": len(gated), "n_included": len(rows),
            "distance": summarize([r["distance"] for r in rows], cl, **boot),
            "field_only_recovery": summarize([r["field_recovery"] for r in rows], cl, **boot),
            "downstream_only_recovery": summarize([r["downstream_recovery"] for r in rows], cl, **boot),
            "suffix_frac_for_80pct": summarize([r["suffix_frac_for_80pct"] for r in rows], cl, **boot),
            "suffix": {str(f): summarize([r["suffix"][str(f)] for r in rows], cl, **boot) for f in FRACS}}
    agg["spearman_field_only_vs_distance"] = _spearman_ci(included, stats)
    checks = [r["full_recovery"] for r in split.rows if "full_recovery" in r]
    sanity = {"full_splice_recovery_range": [min(checks), max(checks)] if checks else None,
              "note": "the full splice [a, dpos) is the oracle: recovery 1 by construction"}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("recoveries"), levels=levels)}


def _spearman_ci(rows: list, stats: dict) -> dict:
    """rho(distance, field-only recovery) over included pairs (scipy's spearmanr, average ranks for ties, through
    `kvnotes.stats.spearman`), with a percentile CI from `scipy.stats.bootstrap` resampling the scenarios (clusters)
    with replacement, each drawn scenario bringing all its pairs; per resample rho = Pearson's r of scipy's average
    ranks (numpy corrcoef), the same statistic: B = stats.n_boot resamples, seeded with stats.seed
    (before: a hand-written copy of this bootstrap that silently capped B at 2000). Resamples where rho is undefined
    (distance or recovery constant) are left out of the interval and counted in n_degenerate_resamples. No interval
    with fewer than two scenarios (nothing to resample), as in `kvnotes.stats.summarize`."""
    if len(rows) < 3:
        return {"rho": None, "ci": None, "n": len(rows)}
    x = np.array([r["distance"] for r in rows], dtype=float)
    y = np.array([r["field_recovery"] for r in rows], dtype=float)
    rho = spearman(x, y)
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["scenario"], []).append(i)
    members = [np.array(groups[k]) for k in sorted(groups)]
    out = {"rho": rho, "ci": None, "ci_method": None, "n": len(rows), "n_clusters": len(members)}
    if len(members) < 2:
        out["ci_method"] = "none (1 scenario: no scenario to resample)"
        return out

    def rho_of(clusters):          # what kvnotes.stats.spearman computes, without its per-call validation cost
        idx = np.concatenate([members[int(c)] for c in clusters])
        xs, ys = x[idx], y[idx]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            return np.nan
        return np.corrcoef(sps.rankdata(xs), sps.rankdata(ys))[0, 1]

    alpha, n_boot = float(stats["alpha"]), int(stats["n_boot"])
    with warnings.catch_warnings():      # undefined resamples are handled below, not by scipy's interval
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        res = sps.bootstrap((np.arange(len(members)),), rho_of, n_resamples=n_boot, vectorized=False,
                            confidence_level=1 - alpha, method="percentile", rng=np.random.default_rng(stats["seed"]))
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    ok = np.isfinite(dist)
    if ok.any():
        out["ci"] = np.quantile(dist[ok], [alpha / 2, 1 - alpha / 2]).tolist()
    out.update({"ci_method": f"cluster (scenario) bootstrap, percentile (scipy.stats.bootstrap over the "
                             f"{len(members)} scenarios), B={n_boot}",
                "B": n_boot, "n_degenerate_resamples": int((~ok).sum())})
    return out
