"""P1 locality (paper_spec §3.1, Fig. 3a): where does the decision read the field's conclusion from?

For each aligned pair, prefill the old prompt (stale) and the new one (oracle), build spliced caches and decode the
last token on all of them in one batch:

  field          K and V of the field value's span [a, b) from the new prefill (= in-place edit of the field)
  field_k/_v     only K / only V of that span
  field_line     the span plus the rest of its line through the newline [a, line_end)
  downstream     every position after the field [b, dpos), the field left stale
  full           every position from the field on [a, dpos): equals the oracle by construction (a sanity check)

recovery = (m_state - m_stale) / (m_oracle - m_stale), m = logit(safe) - logit(unsafe).
"""
from __future__ import annotations

import time

from kvnotes import kv
from kvnotes.readout import Readout, candidate_logits
from kvnotes.stats import summarize, summarize_proportion
from probes.base import ProbeSpec
from probes.common import (RELAXED_TAU, Split, boot_args, flip_direction, prefill_pair,
                           readout_key)
from probes.common import state_logits as _logits

CONTRACT = ProbeSpec(
    name="locality", paper_refs=("Fig3a", "P1"),
    options={"batch_size": 16,               # spliced caches decoded per forward
             "check_decode_instances": 1},   # on this many instances also check decode == full forward (I1)
    reanalysable=True)


def raw_from_row(row: dict, record: dict) -> dict:
    """measure()'s output for one pair from its record row (which keeps every state's candidate logits + lse)."""
    raw = {"states": row["raw"], "full_equals_oracle_max_abs": row["full_equals_oracle_max_abs"]}
    if "decode_vs_forward_max_abs" in row:
        raw["decode_vs_forward_max_abs"] = row["decode_vs_forward_max_abs"]
    return raw


# state name -> (positions from (a, b, line_end, dpos), which of K/V)
SPLICES = {
    "field": (lambda a, b, e, d: range(a, b), "KV"),
    "field_k": (lambda a, b, e, d: range(a, b), "K"),
    "field_v": (lambda a, b, e, d: range(a, b), "V"),
    "field_line": (lambda a, b, e, d: range(a, e), "KV"),
    "downstream": (lambda a, b, e, d: range(b, d), "KV"),
    "full": (lambda a, b, e, d: range(a, d), "KV"),
}
STATES = ("stale", "oracle", *SPLICES)
# aggregate metric name -> state (names as in the paper's records where they exist)
RECOVERIES = {"field_only_recovery": "field", "field_k_only_recovery": "field_k", "field_v_only_recovery": "field_v",
              "field_line_recovery": "field_line", "downstream_only_recovery": "downstream",
              "full_downstream_recovery": "full"}


def measure(lm, pair, token_ids, batch_size: int = 16, check_decode: bool = False) -> dict:
    """Model work for one pair: candidate-token logits (and the vocabulary logsumexp) of every state."""
    t0 = time.time()
    model = lm.model
    stale, oracle, last = prefill_pair(model, pair)
    a, b = pair.span
    dpos = pair.dpos
    caches = [stale, oracle] + [kv.splice(stale, oracle, pos(a, b, pair.line_end, dpos), which=which)
                                for pos, which in SPLICES.values()]
    logits = kv.decode(model, caches, last, batch_size=batch_size)
    rows = candidate_logits(logits, token_ids)
    out = {"states": {s: {"logits": {str(t): v for t, v in cl.items()}, "lse": lse}
                      for s, (cl, lse) in zip(STATES, rows)},
           "full_equals_oracle_max_abs": float((logits[STATES.index("full")] - logits[1]).abs().max())}
    if check_decode:  # invariant I1 on the real model: the decode step equals the full forward's last logits
        ref = kv.full_forward_last_logits(model, pair.old_ids)
        out["decode_vs_forward_max_abs"] = float((logits[0] - ref).abs().max())
    out["seconds"] = round(time.time() - t0, 3)
    return out


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-instance values, exclusions with reasons, controls, and aggregates with CIs (no model needed)."""
    split = Split(exclusion)
    for inst in instances:
        raw = raws[inst.id]
        ro: Readout = readouts[readout_key(inst)]
        m = {s: ro.margin(_logits(raw, s)) for s in STATES}
        dec = {s: ro.decision(_logits(raw, s)) for s in STATES}
        mass = {s: round(ro.mass(_logits(raw, s), raw["states"][s]["lse"]), 4) for s in STATES}
        delta = m["oracle"] - m["stale"]
        row = {**inst.record_id(), "tokens": pairs_info[inst.id],
               "expected_old": inst.expected_old, "expected_new": inst.expected_new,
               "m_stale": m["stale"], "m_oracle": m["oracle"], "delta_m": delta,
               "dec_stale": dec["stale"], "dec_oracle": dec["oracle"], "direction": flip_direction(inst),
               "m": m, "decision": dec, "mass": mass,
               "full_equals_oracle_max_abs": raw["full_equals_oracle_max_abs"],
               "raw": raw["states"]}   # candidate-token logits + logsumexp per state: re-analysable without the model
        if "decode_vs_forward_max_abs" in raw:
            row["decode_vs_forward_max_abs"] = raw["decode_vs_forward_max_abs"]
        if inst.kind != "control":
            for metric, s in RECOVERIES.items():
                row[metric] = (m[s] - m["stale"]) / delta if delta != 0 else None
        split.add(inst, row)

    included, excluded, controls = split.included, split.excluded, split.controls
    agg = {}
    clusters = split.clusters
    boot = boot_args(stats)
    for metric in RECOVERIES:
        agg[metric] = summarize([r[metric] for r in included], clusters, **boot)
    for name, s in (("field_only_new_decision_rate", "field"), ("field_line_new_decision_rate", "field_line"),
                    ("downstream_only_new_decision_rate", "downstream")):
        agg[name] = summarize_proportion([r["decision"][s] == r["dec_oracle"] for r in included], clusters)
    # the same recoveries and new-decision rates by flip direction, and over every gated pair with |delta m| >= 0.5
    tau = stats.get("relaxed_min_abs_delta_m", RELAXED_TAU)
    agg["slices"] = {}
    for name, rows in split.slices(tau).items():
        if name == "included":
            continue
        cl = [r["scenario"] for r in rows]
        sl = {metric: summarize([r[metric] for r in rows], cl, **boot) for metric in RECOVERIES}
        for rate, s in (("field_only_new_decision_rate", "field"), ("downstream_only_new_decision_rate", "downstream")):
            # the answer the new value implies (= the oracle's decision on included pairs)
            sl[rate] = summarize_proportion([r["decision"][s] == r["expected_new"] for r in rows], cl)
        agg["slices"][name] = sl
    gated = included + excluded
    gated_clusters = [r["scenario"] for r in gated]
    agg["flip_rate"] = summarize_proportion([r["dec_stale"] != r["dec_oracle"] for r in gated], gated_clusters)
    agg["correct_flip_rate"] = summarize_proportion(
        [r["dec_stale"] == r["expected_old"] and r["dec_oracle"] == r["expected_new"] for r in gated], gated_clusters)
    agg["inclusion_rate"] = summarize_proportion(["reasons" not in r for r in gated], gated_clusters)
    agg["gated_abs_delta_m"] = summarize([abs(r["delta_m"]) for r in gated], [r["scenario"] for r in gated], **boot)
    agg["control_abs_delta_m"] = summarize([abs(r["delta_m"]) for r in controls], [r["scenario"] for r in controls],
                                           **boot)
    agg["control_decision_change_rate"] = summarize_proportion(
        [r["dec_stale"] != r["dec_oracle"] for r in controls], [r["scenario"] for r in controls])
    # per control kind (a same-conclusion value swap, a field the rule does not read: §1.3), clustered by the domain
    # the control was generated in, so that G counts domains, not the two kinds
    agg["control_by_kind"] = {}
    for kind in sorted({r["scenario"] for r in controls}):
        rows = [r for r in controls if r["scenario"] == kind]
        domains = [(r["variant"] if isinstance(r.get("variant"), dict) else {}).get("domain", kind) for r in rows]
        agg["control_by_kind"][kind] = {
            "abs_delta_m": summarize([abs(r["delta_m"]) for r in rows], domains, **boot),
            "decision_change_rate": summarize_proportion([r["dec_stale"] != r["dec_oracle"] for r in rows], domains)}
    if gated and not included:
        finding = (f"no gated pair passes the inclusion rule: the decision does not follow the field on this "
                   f"scenario family ({agg['flip_rate']['k']}/{len(gated)} pairs change decision at all); "
                   f"recoveries are undefined here")
    else:
        finding = None
    sanity = {"full_equals_oracle_max_abs": max((r["full_equals_oracle_max_abs"] for r in split.rows), default=None),
              "decode_vs_forward_max_abs": max((r["decode_vs_forward_max_abs"] for r in split.rows
                                                if "decode_vs_forward_max_abs" in r), default=None),
              "note": "full-downstream splice reproduces the oracle by construction; a check, not a finding"}
    return {**split.parts(), "aggregate": agg, "sanity": sanity, "summary": split.summary(finding)}
