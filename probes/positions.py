"""P2 position sweep (paper_spec §3.2): the recovery of splicing each single position of [a, dpos), all layers.

Every position is spliced (no "quick" every-second-position mode), in batches by the splice engine. Per pair the
record keeps the candidate-token logits of every position's splice, so any readout can be re-derived, and the
recovery vector; aggregates are the mean single-position recovery per region (not additive: single-position effects
do not sum to the joint one, which the record shows by `sum_of_single_recoveries`), the region of each pair's
strongest position, and the strongest single recovery.

Regions are the pair's token regions from the rendered text, restricted to [a, dpos): coarse ones
(`token_info()["regions"]`: field, downstream, ...) and fine labels read off the prompt's lines
(`token_info()["labels"]`, scenarios/regions.py: gate, filler_rules, record, conversation, task, template, ...).
"""
from __future__ import annotations

import time

import torch

from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import summarize
from probes.base import ProbeSpec
from probes.common import (Split, boot_args, end_states, pair_row, prefill_pair,
                           readout_key, recoveries)

CONTRACT = ProbeSpec(
    name="positions", paper_refs=("P2", "§3.2"),
    options={"batch_size": 400},             # splices per batched engine forward
    reanalysable=True)


def measure(lm, pair, token_ids, batch_size: int = 400, check_decode: bool = False) -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    a, dpos = pair.span[0], pair.dpos
    engine = SpliceEngine(lm.model, stale, oracle, last, chunk_size=batch_size)
    rows = engine.run([Splice((p,)) for p in range(a, dpos)], tokens=token_ids)
    return {"states": end_states(lm.model, stale, oracle, last, token_ids), "token_ids": token_ids,
            "positions": list(range(a, dpos)), "rows": rows.tolist(), "seconds": round(time.time() - t0, 3)}


def raw_from_row(row: dict, record: dict) -> dict:
    """measure()'s output for one pair from its record row: the unspliced stale / oracle states (candidate logits +
    lse), the candidate-token ids and every single-position splice's candidate logits.

    Raises KeyError for a record written before the rows kept `raw.states` (re-run the probe)."""
    raw = row["raw"]
    return {"states": raw["states"], "token_ids": raw["token_ids"], "positions": row["positions"],
            "rows": raw["rows"]}


def region_of(regions: dict, p: int) -> str:
    for name, (lo, hi) in regions.items():
        if lo <= p < hi:
            return name
    raise ValueError(f"position {p} lies in no region of {regions}")


def label_means(rec: torch.Tensor, positions: list, labels: list) -> dict:
    """Mean single-position recovery per fine label (over the positions carrying it)."""
    groups = {}
    for i, p in enumerate(positions):
        groups.setdefault(labels[p], []).append(i)
    return {name: float(rec[idx].mean()) for name, idx in sorted(groups.items())}


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        rec = recoveries(raw, ro, row) if row["delta_m"] else None
        regions = pairs_info[inst.id]["regions"]
        row.update({"positions": raw["positions"],
                    "raw": {"states": raw["states"], "token_ids": raw["token_ids"], "rows": raw["rows"]}})
        if rec is not None:
            top = int(torch.argmax(rec))
            row.update({"recovery": rec.tolist(), "top_position": raw["positions"][top],
                        "top_recovery": float(rec[top]), "top_region": region_of(regions, raw["positions"][top]),
                        "sum_of_single_recoveries": float(rec.sum()),
                        "region_recovery": {name: float(rec[[i for i, p in enumerate(raw["positions"])
                                                             if lo <= p < hi]].mean())
                                            for name, (lo, hi) in regions.items()
                                            if any(lo <= p < hi for p in raw["positions"])},
                        "top_label": pairs_info[inst.id]["labels"][raw["positions"][top]],
                        "label_recovery": label_means(rec, raw["positions"], pairs_info[inst.id]["labels"])})
        split.add(inst, row)

    included, boot, clusters = split.included, boot_args(stats), split.clusters
    agg = {"top_recovery": summarize([r["top_recovery"] for r in included], clusters, **boot),
           "sum_of_single_recoveries": summarize([r["sum_of_single_recoveries"] for r in included], clusters, **boot)}
    names = sorted({n for r in included for n in r["region_recovery"]})
    for name in names:
        rows = [r for r in included if name in r["region_recovery"]]
        agg[f"region_recovery/{name}"] = summarize([r["region_recovery"][name] for r in rows],
                                                   [r["scenario"] for r in rows], **boot)
    for name in sorted({n for r in included for n in r["label_recovery"]}):
        rows = [r for r in included if name in r["label_recovery"]]
        agg[f"label_recovery/{name}"] = summarize([r["label_recovery"][name] for r in rows],
                                                  [r["scenario"] for r in rows], **boot)
    for key, field in (("top_position_region_counts", "top_region"), ("top_position_label_counts", "top_label")):
        counts = {}
        for r in included:
            counts[r[field]] = counts.get(r[field], 0) + 1
        agg[key] = counts
    return {**split.parts(), "aggregate": agg,
            "sanity": {"note": "single-position recoveries are not additive; see sum_of_single_recoveries"},
            "summary": split.summary(split.unaggregated("sweeps"))}
