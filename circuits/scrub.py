"""Causal scrubbing of the note hypothesis (paper_spec §4.5; Fig. 15d, tab:circuit "scrub"), with donors that differ
in more than an id (§8: the paper's same-conclusion donor was the next order id of the same template).

Hypothesis H: the decision is a function of the conclusion the notes carry. Base = the pair's old-value arm (its
cache, decided at the decision token); notes = its top-`n_notes` note positions (circuits.common.note_positions);
rest = the other downstream positions [b, dpos). All interventions are cache-state K/V splices (nothing
recomputed, as in the paper), batched in the splice engine:

* resampling under H (should change nothing): the notes, the rest, or both taken from a SAME-conclusion donor, a
  different prompt — another included pair of the same domain ("instance": other names, ids, values, filler) or of
  another domain ("domain": other wording too) — whose positions map onto the base's by role
  (probes.injection.role_map: fine label and distance from the end of its run, keys repositioned with the model's
  rotary parameters, kv.splice_mapped). drift(X) = |m(X) - m_base| / |m_new - m_old|; a base position without a
  counterpart in the donor keeps its own K/V (the coverage is recorded);
* interchange (should carry the decision): the notes, or the rest, from the pair's own new-value arm (aligned):
  recovery toward the new decision; and `n_null` random downstream sets of the notes' size and fine-label mix
  (probes.topk.random_draws) from the same arm: the matched null of the notes' interchange.
"""
from __future__ import annotations

import random
import time

import torch

from circuits.common import note_positions
from kvnotes import kv
from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import MIN_NULL_DRAWS, null_of_mean, summarize
from probes.base import ProbeSpec
from probes.common import Split, boot_args, end_states, included_rows, margins, pair_row, prefill_pair, readout_key
from probes.injection import plan_donor, prefill_donor
from probes.topk import random_draws

CONTRACT = ProbeSpec(
    name="scrub", paper_refs=("§4.5", "Fig15d", "tab:circuit"),
    options={"batch_size": 200, "n_notes": 8, "n_null": 200, "null_seed": 0, "donor_seed": 0,
             "donors": ["instance", "domain"]},
    measure_options=("batch_size", "n_notes"),
    second_pass=True,
    not_reanalysable="its rows keep drifts and recoveries, not pass 2's candidate logits")
DIRECTION = "old<-new"          # probes.injection's name for base = the old arm (the donor arms are chosen for it)
PARTS = ("notes", "rest", "all")


def measure(lm, pair, token_ids, batch_size: int = 200, n_notes: int = 8) -> dict:
    t0 = time.time()
    if lm.spec.get("remote"):
        raise ValueError(f"probe=scrub splices whole donor caches (repositioned keys) through the KV engine, which needs "
                         f"the weights here; model {lm.spec['name']!r} has remote={lm.spec['remote']!r}. Run heads, "
                         f"components or direction on it (probe.backend=nnsight)")
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    states = end_states(lm.model, stale, oracle, last, token_ids)
    notes, _, notes_readout = note_positions(lm, pair, stale, oracle, last, states, token_ids, n_notes)
    return {"states": states, "token_ids": token_ids, "notes": notes, "notes_readout": notes_readout,
            "ids": {"old": pair.old_ids.tolist(), "new": pair.new_ids.tolist()}, "seconds": round(time.time() - t0, 3)}


def plan_second(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, probe_cfg: dict) -> dict:
    """Per included pair: its notes and rest, the matched random note sets, and per donor kind the same-conclusion
    donor (probes.injection.plan_donor, conclusion="same") with its role map."""
    rows_inc = included_rows(instances, pairs_info, raws, readouts, exclusion)
    rows = {k: r for k, (r, _) in rows_inc.items()}
    included = [i for i in instances if rows_inc[i.id][1]]
    unknown = sorted(set(probe_cfg["donors"]) - {"instance", "domain"})
    if unknown:
        raise ValueError(f"probe.donors has {unknown}; the donor kinds are ['instance', 'domain']")
    plans = {}
    for inst in instances:
        if not rows_inc[inst.id][1]:
            plans[inst.id] = {"included_at_plan": False}
            continue
        info = pairs_info[inst.id]
        down = list(range(info["span"][1], info["dpos"]))
        notes = raws[inst.id]["notes"]
        rng = random.Random(f"scrub-null:{probe_cfg['null_seed']}:{inst.id}")
        plan = {"included_at_plan": True, "notes": notes, "rest": [p for p in down if p not in notes],
                "null": [list(x) for x in random_draws(rng, down, info["labels"], notes, int(probe_cfg["n_null"]),
                                                       True)],
                "donors": {}}
        for kind in probe_cfg["donors"]:
            pool = [i for i in included if i.id != inst.id and i.direction_known
                    and (i.scenario == inst.scenario) == (kind == "instance")]
            plan["donors"][kind] = plan_donor(inst, kind, pool, pairs_info, raws, rows, int(probe_cfg["donor_seed"]),
                                              conclusion="same")
        plans[inst.id] = plan
    return plans


def measure_second(lm, pair, token_ids, plan: dict, batch_size: int = 200, n_notes: int = 8) -> dict:
    """Candidate-token logits of the interchanges, the null sets and each donor's resamplings, and the cosine of
    every resampling's full-vocabulary logits to the base's."""
    t0 = time.time()
    if not plan.get("included_at_plan"):
        return {"measured": False, "seconds": 0.0}
    model = lm.model
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(model, pair)
    parts = {"notes": plan["notes"], "rest": plan["rest"], "all": sorted(plan["notes"] + plan["rest"])}
    donors = {k: dp for k, dp in plan["donors"].items() if dp["donor"] is not None}
    sources, splices, names = {"pair": oracle}, [Splice(())], ["base"]
    for part in ("notes", "rest"):
        splices.append(Splice(tuple(parts[part]), source="pair"))
        names.append(f"interchange:{part}")
    null = sorted({tuple(x) for x in plan["null"]})
    splices += [Splice(x, source="pair") for x in null]
    names += [f"null:{i}" for i in range(len(null))]
    coverage = {}
    for kind, dp in donors.items():
        cache = prefill_donor(model, dp["ids"]["old"], dp["ids"]["new"], dp["prefix"])[dp["arms"][DIRECTION]]
        sources[kind] = kv.splice_mapped(model, stale, cache, dp["map"])
        mapped = {q for q, _ in dp["map"]}
        for part in PARTS:
            splices.append(Splice(tuple(sorted(mapped & set(parts[part]))), source=kind))
            names.append(f"same:{kind}:{part}")
        coverage[kind] = {part: len(mapped & set(parts[part])) / max(len(parts[part]), 1) for part in PARTS}
    engine = SpliceEngine(model, stale, sources, last, chunk_size=batch_size)
    cand = engine.run(splices, tokens=token_ids)
    full = engine.run([splices[0]] + [s for s, n in zip(splices, names) if n.startswith("same:")])   # full vocabulary
    cos = torch.nn.functional.cosine_similarity(full[1:], full[:1].expand_as(full[1:]), dim=-1).tolist()
    same_names = [n for n in names if n.startswith("same:")]
    return {"token_ids": token_ids, "measured": True, "names": names, "rows": cand.tolist(), "null_sets": len(null),
            "cos_to_base": dict(zip(same_names, cos)), "coverage": coverage, "seconds": round(time.time() - t0, 3)}


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per donor kind over included pairs (clustered by scenario): drift of each resampling (notes / rest / all from
    a same-conclusion donor) and the cosine of its full logits to the base's; the interchange recoveries (notes,
    rest from the new arm) with the notes' against the matched random null (null_of_mean, B = max(2000, n_boot))."""
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row["notes"] = raw["notes"]
        sec = raw.get("second", {})
        if row["delta_m"] and sec.get("measured"):
            m = dict(zip(sec["names"], margins({"rows": sec["rows"], "token_ids": sec["token_ids"]}, ro).tolist()))
            base, dm = m["base"], row["delta_m"]
            row["interchange"] = {p: (m[f"interchange:{p}"] - row["m_stale"]) / dm for p in ("notes", "rest")}
            row["null_notes"] = [(m[f"null:{i}"] - row["m_stale"]) / dm for i in range(sec["null_sets"])]
            row["drift"] = {n[5:]: abs(v - base) / abs(dm) for n, v in m.items() if n.startswith("same:")}
            row["cos_to_base"] = {n[5:]: v for n, v in sec["cos_to_base"].items()}
            row["coverage"] = sec["coverage"]
            row["donors"] = {k: {"donor": d["donor"], "scenario": d.get("donor_scenario"),
                                 "reason": d.get("reason")} for k, d in raw["plan"]["donors"].items()}
        split.add(inst, row)
    inc, boot = split.included, boot_args(stats)
    agg = {"interchange": {}, "drift": {}, "cos_to_base": {}, "coverage": {}}
    rows = [r for r in inc if "interchange" in r]
    if rows:
        cl = [r["scenario"] for r in rows]
        for p in ("notes", "rest"):
            agg["interchange"][p] = summarize([r["interchange"][p] for r in rows], cl, **boot)
        agg["null_notes"] = null_of_mean([r["null_notes"] for r in rows], {"notes": [r["interchange"]["notes"]
                                                                                    for r in rows]},
                                         alpha=stats["alpha"], n_means=max(MIN_NULL_DRAWS, int(stats["n_boot"])),
                                         seed=int(stats["seed"]))
    keys = sorted({k for r in rows for k in r["drift"]})
    for k in keys:
        have = [r for r in rows if k in r["drift"]]
        cl = [r["scenario"] for r in have]
        agg["drift"][k] = summarize([r["drift"][k] for r in have], cl, **boot)
        agg["cos_to_base"][k] = summarize([r["cos_to_base"][k] for r in have], cl, **boot)
        kind, part = k.split(":")
        agg["coverage"][k] = summarize([r["coverage"][kind][part] for r in have], cl, **boot)
    agg["n_without_donor"] = {kind: sum(1 for r in rows if r["donors"].get(kind, {}).get("donor") is None)
                              for kind in ("instance", "domain")}
    sanity = {"note": "interchange of the whole downstream plus field would be the full splice (= 1 by "
                      "construction; not measured here); drift is measured against the base decode of the same "
                      "engine run"}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("scrubbing results"))}
