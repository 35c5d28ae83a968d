"""P3 layer sweep (paper_spec §3.3): splice all of [a, dpos) in one layer at a time, and cumulatively.

Per pair, for every layer l: `single` (layer l only), `upto` (layers <= l) and `from` (layers >= l), all batched in
one engine run (3 x n_layers splices; the rows of layer-l splices share layers < l with the base, see the engine).
`upto` at the last layer and `from` at layer 0 are the full-downstream splice: recovery 1 by construction (sanity).
Bands are thirds of relative depth (early l < n/3, mid < 2n/3, late), the paper's binning, averaged per pair.
"""
from __future__ import annotations

import time

from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import summarize
from probes.base import ProbeSpec
from probes.common import (Split, band, boot_args, end_states, pair_row,
                           prefill_pair, readout_key, recoveries)

CONTRACT = ProbeSpec(
    name="layers", paper_refs=("P3", "§3.3"),
    options={"batch_size": 400},             # splices per batched engine forward
    reanalysable=True)
KINDS = ("single", "upto", "from")


def layer_splices(a: int, dpos: int, n_layers: int) -> list[Splice]:
    pos = tuple(range(a, dpos))
    return ([Splice(pos, layers=(li,)) for li in range(n_layers)]
            + [Splice(pos, layers=tuple(range(li + 1))) for li in range(n_layers)]
            + [Splice(pos, layers=tuple(range(li, n_layers))) for li in range(n_layers)])


def measure(lm, pair, token_ids, batch_size: int = 400, check_decode: bool = False) -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    n_layers = len(stale.layers)
    engine = SpliceEngine(lm.model, stale, oracle, last, chunk_size=batch_size)
    rows = engine.run(layer_splices(pair.span[0], pair.dpos, n_layers), tokens=token_ids)
    return {"states": end_states(lm.model, stale, oracle, last, token_ids), "token_ids": token_ids,
            "n_layers": n_layers, "rows": rows.tolist(), "seconds": round(time.time() - t0, 3)}


def raw_from_row(row: dict, record: dict) -> dict:
    """measure()'s output for one pair from its record row: the unspliced stale / oracle states, the candidate-token
    ids, the layer count and the candidate logits of the 3 x n_layers splices (KINDS order, layer-major within each).

    Raises KeyError for a record written before the rows kept `raw.states` (re-run the probe)."""
    raw = row["raw"]
    return {"states": raw["states"], "token_ids": raw["token_ids"], "n_layers": raw["n_layers"], "rows": raw["rows"]}


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    split = Split(exclusion)
    n_layers = None
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        n_layers = raw["n_layers"]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row["raw"] = {"states": raw["states"], "token_ids": raw["token_ids"], "n_layers": n_layers, "rows": raw["rows"]}
        if row["delta_m"]:
            rec = recoveries(raw, ro, row).view(len(KINDS), n_layers)
            row.update({kind: rec[i].tolist() for i, kind in enumerate(KINDS)})
            members = {b: [li for li in range(n_layers) if band(li, n_layers) == b] for b in ("early", "mid", "late")}
            row["band_recovery"] = {b: float(rec[0][ls].mean()) for b, ls in members.items() if ls}
            row["sum_of_single_layer_recoveries"] = float(rec[0].sum())
            row["full_recovery_check"] = [float(rec[1][-1]), float(rec[2][0])]
        split.add(inst, row)

    included, boot, clusters = split.included, boot_args(stats), split.clusters
    agg = {}
    for b in ("early", "mid", "late"):
        if included and b in included[0]["band_recovery"]:       # a model with < 3 layers has empty bands
            agg[f"band_recovery/{b}"] = summarize([r["band_recovery"][b] for r in included], clusters, **boot)
    for kind in KINDS:
        agg[f"{kind}_by_layer"] = [summarize([r[kind][li] for r in included], clusters, **boot)
                                   for li in range(n_layers or 0)] if included else []
    agg["sum_of_single_layer_recoveries"] = summarize([r["sum_of_single_layer_recoveries"] for r in included],
                                                      clusters, **boot)
    checks = [x for r in split.rows for x in r.get("full_recovery_check", [])]
    sanity = {"full_splice_recovery_range": [min(checks), max(checks)] if checks else None,
              "note": "layers <= last and layers >= 0 are the full-downstream splice: recovery 1 by construction"}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("sweeps"), n_layers=n_layers)}
