"""P3 layer sweep (paper_spec §3.3): splice all of [a, dpos) in one layer at a time, and cumulatively; with
`positions: downstream`, the causal timing test of §3.11 D2 / §8 W13 on the notes [b, dpos) alone.

Per pair, for every layer l: `single` (layer l only), `upto` (layers <= l) and `from` (layers >= l), all batched in
one engine run (3 x n_layers splices; the rows of layer-l splices share layers < l with the base, see the engine).
Bands are thirds of relative depth (early l < n/3, mid < 2n/3, late), the paper's binning, averaged per pair.

Which positions are spliced (option `positions`):
  all         [a, dpos): the changing span and everything after it (the default, the paper's P3). `upto` at the last
              layer and `from` at layer 0 are the full-downstream splice: recovery 1 by construction (sanity).
  downstream  [b, dpos): only the notes after the changing span, the span itself left stale. On trigger pairs
              (scenario=diverse_trigger) these are §3.10's "notes": `upto[l]` = the notes spliced in layers <= l,
              `from[l]` = in layers >= l, so the layer where recovery appears locates when the notes the decision
              reads are written (W13's causal timing). `upto` at the last layer and `from` at layer 0 are then the
              all-layer downstream splice, i.e. the locality probe's `downstream` state of the same pair: not 1 by
              construction, and reported as such (sanity.all_layers_recovery_range). The records of this option say
              so (summary.positions, each row's raw.positions); a record without them spliced [a, dpos).

Layer index: l is the index of the decoder block whose K/V are spliced (0..n_layers - 1). Block l's K/V are
computed from the residual stream *entering* block l, hidden_states index l of HF's output_hidden_states (0 =
embeddings), the indexing of the decodability probe's write depth and logit-lens commit depth (probes/
decodability.py); a splice in block l changes the decision's residual from hidden_states index l + 1 on.
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
    options={"batch_size": 400,              # splices per batched engine forward
             "positions": "all"},            # all: [a, dpos); downstream: the notes [b, dpos) only (W13 timing)
    measure_options=("batch_size", "positions"),
    reanalysable=True)
KINDS = ("single", "upto", "from")
POSITIONS = ("all", "downstream")


def spliced_positions(span: tuple[int, int], dpos: int, positions: str = "all") -> range:
    """The token positions every splice of the sweep covers: [a, dpos) for "all", [b, dpos) for "downstream"
    (span = (a, b), the changing span; dpos the decision token). Raises ValueError for another option (naming the
    two) or an empty range (nothing between the span and the decision token to splice)."""
    if positions not in POSITIONS:
        raise ValueError(f"layers: positions must be one of {POSITIONS} (probe.positions=...), got {positions!r}")
    a, b = span
    lo = a if positions == "all" else b
    if lo >= dpos:
        raise ValueError(f"layers: positions={positions} splices [{lo}, {dpos}), which is empty: no token between "
                         f"the changing span [{a}, {b}) and the decision token; use a scenario with text after it")
    return range(lo, dpos)


def layer_splices(a: int, dpos: int, n_layers: int) -> list[Splice]:
    """The 3 x n_layers splices of positions [a, dpos) (KINDS order, layer-major within each); `a` is the first
    spliced position: the span's start (positions=all) or its end b (positions=downstream)."""
    pos = tuple(range(a, dpos))
    return ([Splice(pos, layers=(li,)) for li in range(n_layers)]
            + [Splice(pos, layers=tuple(range(li + 1))) for li in range(n_layers)]
            + [Splice(pos, layers=tuple(range(li, n_layers))) for li in range(n_layers)])


def measure(lm, pair, token_ids, batch_size: int = 400, positions: str = "all", check_decode: bool = False) -> dict:
    """Candidate-token logits of the unspliced stale / oracle states and of the 3 x n_layers layer splices of
    `spliced_positions(pair.span, pair.dpos, positions)`. With positions="downstream" the output says so
    (`positions`); with "all" it is what it was before the option existed. Raises ValueError as spliced_positions."""
    t0 = time.time()
    spliced = spliced_positions(pair.span, pair.dpos, positions)
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    n_layers = len(stale.layers)
    engine = SpliceEngine(lm.model, stale, oracle, last, chunk_size=batch_size)
    rows = engine.run(layer_splices(spliced.start, pair.dpos, n_layers), tokens=token_ids)
    out = {"states": end_states(lm.model, stale, oracle, last, token_ids), "token_ids": token_ids,
           "n_layers": n_layers, "rows": rows.tolist()}
    if positions != "all":
        out["positions"] = positions
    out["seconds"] = round(time.time() - t0, 3)
    return out


def _kept(raw: dict) -> dict:
    """What a row keeps of measure()'s output (and raw_from_row gives back)."""
    out = {"states": raw["states"], "token_ids": raw["token_ids"], "n_layers": raw["n_layers"], "rows": raw["rows"]}
    if raw.get("positions", "all") != "all":
        out["positions"] = raw["positions"]
    return out


def raw_from_row(row: dict, record: dict) -> dict:
    """measure()'s output for one pair from its record row: the unspliced stale / oracle states, the candidate-token
    ids, the layer count, the candidate logits of the 3 x n_layers splices (KINDS order, layer-major within each)
    and, for positions=downstream, `positions`.

    Raises KeyError for a record written before the rows kept `raw.states` (re-run the probe)."""
    return _kept(row["raw"])


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair recoveries by layer (single / upto / from), bands, and their cluster-robust aggregates. Which
    positions were spliced is read from the raws (all pairs must agree; ValueError naming both options if not)."""
    modes = {raws[inst.id].get("positions", "all") for inst in instances}
    if len(modes) > 1:
        raise ValueError(f"layers: the pairs were measured with different positions options {sorted(modes)} (a stale "
                         f"progress file?); re-run with one")
    positions = modes.pop() if modes else "all"
    # upto[last] and from[0]: the full splice (all: recovery 1, a check) or the all-layer notes splice (a finding)
    check = "full_recovery_check" if positions == "all" else "all_layers_recovery_check"
    split = Split(exclusion)
    n_layers = None
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        n_layers = raw["n_layers"]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row["raw"] = _kept(raw)
        if row["delta_m"]:
            rec = recoveries(raw, ro, row).view(len(KINDS), n_layers)
            row.update({kind: rec[i].tolist() for i, kind in enumerate(KINDS)})
            members = {b: [li for li in range(n_layers) if band(li, n_layers) == b] for b in ("early", "mid", "late")}
            row["band_recovery"] = {b: float(rec[0][ls].mean()) for b, ls in members.items() if ls}
            row["sum_of_single_layer_recoveries"] = float(rec[0].sum())
            row[check] = [float(rec[1][-1]), float(rec[2][0])]
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
    checks = [x for r in split.rows for x in r.get(check, [])]
    if positions == "all":
        sanity = {"full_splice_recovery_range": [min(checks), max(checks)] if checks else None,
                  "note": "layers <= last and layers >= 0 are the full-downstream splice: recovery 1 by construction"}
        return {**split.parts(), "aggregate": agg, "sanity": sanity,
                "summary": split.summary(split.unaggregated("sweeps"), n_layers=n_layers)}
    # positions=downstream: the rows' all_layers_recovery_check holds upto[last] and from[0], both the all-layer
    # splice of [b, dpos) (the locality probe's downstream-only state), a measurement here and not a check
    sanity = {"all_layers_recovery_range": [min(checks), max(checks)] if checks else None,
              "note": ("positions=downstream: only [b, dpos) (the notes after the changing span) is spliced, so "
                       "layers <= last and layers >= 0 are the all-layer downstream-only splice (locality's "
                       "downstream state), whose recovery is a finding, not 1 by construction; each row's "
                       "all_layers_recovery_check holds [upto[last], from[0]], which must be equal")}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("sweeps"), n_layers=n_layers, positions=positions,
                                     spliced="[b, dpos): the notes after the changing span, the span left stale")}
