"""D4 false-note injection (paper_spec §3.13, §7.3 (iv); ranking and nulls as D3 §3.12; §8 W7, W8): write the
opposite conclusion's notes (K/V of the downstream positions [b, dpos)) into a self-consistent cache and see whether
the decision follows them.

Per pair, two directions; in each the base is one arm's own cache and the notes come from a donor arm with the
opposite conclusion:

  "new<-old"   base = the new prompt's cache, notes concluding as the old prompt does
  "old<-new"   base = the old prompt's cache, notes concluding as the new prompt does

Injections (all downstream: the base keeps its own prefix and field):

  full      every position of [b, dpos) from the same pair's other arm (positions aligned). The cache this makes IS
            P1's field-only state of the pair oriented stale = donor arm, oracle = base arm, so its recovery is
            1 - that field-only recovery: an identity (§8 W7). Both are computed (the field-only state through
            kv.splice + kv.decode, the injection through the engine) and their difference is recorded under
            `sanity`: a check, not evidence.
  dose      the top k positions from the other arm, k in KS and max(1, round(f n_down)) for f in topk.FRACS:
              topk_cf  ranked on the OTHER domains' included pairs (their single-position injection recoveries in
                       the same direction, by role key, as topk's pass 2: leave-one-domain-out, W8);
              topk_in  ranked on the pair itself (the paper's in-sample dose), for comparison only;
            with a matched random-k null: n_null draws per pair and size, k downstream positions with the fine-label
            mix of the cross-fitted top-k set (topk.random_draws), summarised by kvnotes.stats.null_of_mean.
  donors    every downstream position with a counterpart in another prompt whose arm concludes the other way:
              instance  another included pair of the same domain (another instance of it),
              domain    an included pair of another domain;
            chosen with a seeded generator among the included gated pairs (probe.donor_seed; the choice, the arm and
            the donor's own decision are recorded). A recipient position maps to the donor position of the same
            role key (topk.role_keys: fine label, distance to the end of its run of equal labels; the j-th
            occurrence of a key counted from the decision to the j-th). Keys are repositioned from the donor's
            position to the recipient's with the model's own rotary parameters (kv.splice_mapped, per layer: Gemma-3's
            local and global bases), values copied; a recipient position without a counterpart keeps the base's K/V
            and is counted (per label) in the row and the aggregate. A pair without a donor says why.

Metrics, per pair, direction and injection: recovery = (m - m_base) / (m_other - m_base), with m_other the margin of
the pair's own other arm (the recipient prompt concluding as the notes do): 0 = the base, 1 = that arm. flipped = the
decision differs from the base arm's; follows_injected = the decision is the donor's (the other arm's; for another
prompt its decision in the recipient's words: restrictive <-> the recipient's safe word; None when the donor decides
a third candidate). Aggregates over included gated pairs only, cluster-robust by domain; controls apart.

Cost per pair: pass 1 one pair prefill and 2 n_down + 2 engine rows plus two materialised decodes; pass 2 (included
pairs) one pair prefill, one donor pair prefill per donor kind (shared prefix, both arms: each direction needs the
other conclusion), and per direction the unique dose and null sets (about 2 x 200 per size) plus one row per donor.
"""
from __future__ import annotations

import random
import time
from collections import Counter

import torch
from transformers import DynamicCache

from kvnotes import kv
from kvnotes.engine import Splice, SpliceEngine
from kvnotes.readout import candidate_logits
from kvnotes.stats import MIN_NULL_DRAWS, null_of_mean, summarize, summarize_proportion
from probes.base import ProbeSpec
from probes.common import (Split, boot_args, end_states, flip_direction, included_rows, pair_row,
                           prefill_pair, readout_key)
from probes.topk import FRACS, cross_fitted_order, random_draws, role_keys

CONTRACT = ProbeSpec(
    name="injection", paper_refs=("D4", "§3.13", "§3.12", "§7.3", "W7", "W8"),
    options={"batch_size": 400,            # splices per batched engine forward
             "n_null": 200,                # matched random-k draws per included pair, direction and size
             "null_seed": 0,
             "donor_seed": 0,              # the seeded choice of the other-instance and other-domain donors
             "donors": ["instance", "domain"]},
    second_pass=True,
    not_reanalysable="its rows keep recoveries and decisions, not the candidate logits of the dose, null and donor "
                     "injections")

KS = (1, 2, 4, 8, 16, 32, 64)
DIRECTIONS = {"new<-old": ("new", "old"), "old<-new": ("old", "new")}    # name -> (base arm, donor arm)
ARM_STATE = {"old": "stale", "new": "oracle"}
EXPECTED = {"old": "expected_old", "new": "expected_new"}
DONOR_KINDS = ("instance", "domain")


def _field_only_state(direction: str) -> str:
    return f"field_only:{direction}"


# -- pass 1: the pair's own arms --------------------------------------------------------------------------------------
def measure(lm, pair, token_ids, batch_size: int = 400) -> dict:
    """Pass 1 for one aligned pair (paper_spec §3.13): candidate-token logits (fp32, one list per row, in the order
    of the returned `token_ids`) of the unspliced arms ("states": stale = old, oracle = new, with the vocabulary
    logsumexp), of every single downstream position and of the full downstream [b, dpos) injected from the other
    arm (per direction: "single" [n_down rows], "full"; batched engine), and of the two P1 field-only states that
    are the full injections' identity partners ("states" "field_only:<direction>", kv.splice + kv.decode: an
    independent path). Keeps the arms' token ids ("ids"): a donor of another pair's pass 2 is prefilled from them.
    Raises ValueError for a misaligned pair (probes.common.prefill_pair)."""
    t0 = time.time()
    model = lm.model
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(model, pair)
    arms = {"old": stale, "new": oracle}
    a, b = pair.span
    down = list(range(b, pair.dpos))
    out = {"states": end_states(model, stale, oracle, last, token_ids), "token_ids": token_ids, "positions": down,
           "ids": {"old": pair.old_ids.tolist(), "new": pair.new_ids.tolist()}}
    partners = kv.decode(model, [kv.splice(arms[donor], arms[base], range(a, b))
                                 for base, donor in DIRECTIONS.values()], last)
    for name, (cl, lse) in zip(DIRECTIONS, candidate_logits(partners, token_ids)):
        out["states"][_field_only_state(name)] = {"logits": {str(t): v for t, v in cl.items()}, "lse": lse}
    for name, (base, donor) in DIRECTIONS.items():
        engine = SpliceEngine(model, arms[base], {"pair": arms[donor]}, last, chunk_size=batch_size)
        rows = engine.run([Splice((p,), source="pair") for p in down] + [Splice(tuple(down), source="pair")],
                          tokens=token_ids)
        out[name] = {"single": rows[:-1].tolist(), "full": rows[-1].tolist()}
    out["seconds"] = round(time.time() - t0, 3)
    return out


# -- planning pass 2: rankings, nulls, donors -------------------------------------------------------------------------
def _logits(token_ids, row) -> dict:
    return {int(t): float(v) for t, v in zip(token_ids, row)}


def _arm_margins(row: dict, base: str, donor: str) -> tuple[float, float]:
    return row[f"m_{ARM_STATE[base]}"], row[f"m_{ARM_STATE[donor]}"]


def single_recoveries(raw, ro, row: dict, direction: str) -> list[float] | None:
    """Per downstream position (pass 1's order), the recovery (unitless; 0 = the base arm, 1 = the other arm) of
    injecting that single position from the other arm in `direction`, under readout `ro`; None when the arms'
    margins are equal (no recovery is defined)."""
    m_base, m_other = _arm_margins(row, *DIRECTIONS[direction])
    if m_other == m_base:
        return None
    return [(ro.margin(_logits(raw["token_ids"], r)) - m_base) / (m_other - m_base) for r in raw[direction]["single"]]


def dose_sizes(n_down: int) -> dict:
    """{"k": {str(k): size}, "frac": {str(f): size}}: the number of positions each dose point injects (k in KS
    capped at n_down; a fraction f in topk.FRACS of the downstream is max(1, round(f n_down)), as topk's suffix
    sets). paper_spec §3.13 (dose), §3.12 (k values)."""
    return {"k": {str(k): min(k, n_down) for k in KS},
            "frac": {str(f): min(n_down, max(1, round(f * n_down))) for f in FRACS}}


def role_map(rec_labels: list, rec_down: list, don_labels: list, don_down: list) -> tuple[list, list]:
    """Map a recipient's downstream positions onto a donor prompt's (both absolute token positions; labels are the
    prompts' fine labels, scenarios.regions). Returns ([(recipient position, donor position)] sorted by recipient
    position, [recipient positions without a counterpart]): positions of the same role key (topk.role_keys: fine
    label, distance to the end of its run) and the same occurrence of that key counted from the end of the
    downstream (the decision side), so the last "task" run maps to the last one even when the donor has more or
    fewer runs of a label. Each donor position is used at most once. paper_spec §3.13 (donors), §8 W8 (transfer by
    role and offset from the end)."""
    def indexed(labels, down):
        seen, out = Counter(), {}
        for key, p in reversed(list(zip(role_keys(labels, down), down))):
            out[p] = (key, seen[key])
            seen[key] += 1
        return out
    donor_at = {k: p for p, k in indexed(don_labels, don_down).items()}
    mapped, unmapped = [], []
    for q, k in sorted(indexed(rec_labels, rec_down).items()):
        if k in donor_at:
            mapped.append((q, donor_at[k]))
        else:
            unmapped.append(q)
    return mapped, unmapped


def _polarity(inst, word: str) -> str | None:
    """"restrictive" (the pair's safe word), "permissive" (its unsafe word), None (a third candidate)."""
    return "restrictive" if word == inst.safe else "permissive" if word == inst.unsafe else None


def _word(inst, polarity: str | None) -> str | None:
    return {"restrictive": inst.safe, "permissive": inst.unsafe}.get(polarity)


def plan_donor(inst, kind: str, pool: list, pairs_info: dict, raws: dict, rows: dict, seed: int,
               conclusion: str = "opposite") -> dict:
    """The donor of one kind for `inst` (paper_spec §3.13, §8 W7: notes from a different prompt): the choice of
    random.Random(f"injection-donor:{seed}:{kind}:{inst.id}") among `pool` (included gated pairs of the same domain
    for "instance", of other domains for "domain"; sorted by id), the donor arm per direction (the one whose value
    implies the conclusion opposite to the base arm's: restrictive <-> permissive by each pair's safe word), the
    donor's own decision there (`rows`: pair_row of every pair) and its restrictive / permissive meaning in the
    recipient's words (`target`), and the role-key map of the recipient's downstream onto the donor's (`role_map`).
    With conclusion="same" the donor arm is the one concluding as the base arm does (causal scrubbing's resampling,
    paper_spec §4.5). JSON-able; {"donor": None, "reason": ...} when there is no donor."""
    if not inst.direction_known:
        return {"donor": None, "reason": "this pair does not say which answer is restrictive, so no donor's "
                                         "conclusion can be matched to it"}
    if not pool:
        where = "of the same domain besides this one" if kind == "instance" else "of another domain"
        return {"donor": None, "reason": f"no included gated pair {where}"}
    rng = random.Random(f"injection-donor:{seed}:{kind}:{inst.id}")
    donor = rng.choice(sorted(pool, key=lambda i: i.id))
    dinfo, info = pairs_info[donor.id], pairs_info[inst.id]
    arms, decisions = {}, {}
    for name, (base, _) in DIRECTIONS.items():
        own = _polarity(inst, getattr(inst, EXPECTED[base]))
        want = own if conclusion == "same" else "permissive" if own == "restrictive" else "restrictive"
        arm = next((x for x in ("old", "new") if _polarity(donor, getattr(donor, EXPECTED[x])) == want), None)
        if arm is None:
            return {"donor": None, "reason": f"donor {donor.id} has no arm concluding {want}"}
        arms[name] = arm
        decided = rows[donor.id][f"dec_{ARM_STATE[arm]}"]
        decisions[name] = {"donor_expected": getattr(donor, EXPECTED[arm]), "donor_decision": decided,
                           "target": _word(inst, _polarity(donor, decided))}
    mapped, unmapped = role_map(info["labels"], list(range(info["span"][1], info["dpos"])),
                                dinfo["labels"], list(range(dinfo["span"][1], dinfo["dpos"])))
    return {"donor": donor.id, "donor_scenario": donor.scenario, "arms": arms, "decisions": decisions,
            "ids": {x: raws[donor.id]["ids"][x][:dinfo["dpos"]] for x in ("old", "new")},
            "prefix": dinfo["span"][0], "map": [list(m) for m in mapped], "unmapped": unmapped,
            "unmapped_labels": dict(Counter(info["labels"][q] for q in unmapped))}


def plan_second(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, probe_cfg: dict) -> dict:
    """Per pair (JSON-able): for included gated pairs, per direction the cross-fitted (leave-one-domain-out, W8) and
    in-sample top-k sets of every dose size, the matched null draws (probe.n_null per size below n_down, seeded per
    pair and direction by probe.null_seed; the whole downstream once at n_down), and per donor kind the donor plan
    (`plan_donor`); other pairs are not measured again (`measure` False, with the reason). Raises ValueError for an
    unknown donor kind in probe.donors. paper_spec §3.13, §3.12."""
    n_null = int(probe_cfg.get("n_null", 200))
    null_seed, donor_seed = int(probe_cfg.get("null_seed", 0)), int(probe_cfg.get("donor_seed", 0))
    kinds = list(probe_cfg.get("donors", DONOR_KINDS))
    unknown = sorted(set(kinds) - set(DONOR_KINDS))
    if unknown:
        raise ValueError(f"probe.donors has {unknown}; the donor kinds are {list(DONOR_KINDS)}")
    rows, include, single = {}, {}, {}
    for inst in instances:
        row, include[inst.id] = included_rows([inst], pairs_info, raws, readouts, exclusion)[inst.id]
        rows[inst.id] = row
        single[inst.id] = {d: single_recoveries(raws[inst.id], readouts[readout_key(inst)], row, d)
                           for d in DIRECTIONS}
    # cross-fitting material: included pairs' single-position recoveries per direction, by domain and role key
    material = {d: {} for d in DIRECTIONS}
    for inst in instances:
        if include[inst.id] and all(v is not None for v in single[inst.id].values()):
            info = pairs_info[inst.id]
            down = list(range(info["span"][1], info["dpos"]))
            for d in DIRECTIONS:
                keys = role_keys(info["labels"], down)
                material[d].setdefault(inst.scenario, []).extend(zip(keys, single[inst.id][d]))
    included = [i for i in instances if include[i.id]]
    plans = {}
    for inst in instances:
        if not include[inst.id]:
            plans[inst.id] = {"measure": False, "reason": "not an included gated pair at plan time: only the full "
                                                          "same-pair injection (pass 1) is measured"}
            continue
        if any(v is None for v in single[inst.id].values()):
            plans[inst.id] = {"measure": False, "reason": "the arms' margins are equal: no recovery is defined"}
            continue
        info = pairs_info[inst.id]
        labels, down = info["labels"], list(range(info["span"][1], info["dpos"]))
        sizes = dose_sizes(len(down))
        unique = sorted({s for part in sizes.values() for s in part.values()})
        plan = {"measure": True, "n_down": len(down), "sizes": sizes, "directions": {}, "donors": {}}
        for d in DIRECTIONS:
            rec = dict(zip(down, single[inst.id][d]))
            order_in = sorted(down, key=lambda p: (-rec[p], -p))
            order_cf, used = cross_fitted_order(down, labels, material[d], inst.scenario)
            dp = {"topk_in": {str(s): sorted(order_in[:s]) for s in unique}, "cf_scenarios": used}
            if order_cf is None:
                dp["no_cf_reason"] = "no other domain has an included pair to rank by"
            else:
                dp["topk_cf"] = {str(s): sorted(order_cf[:s]) for s in unique}
                rng = random.Random(f"injection-null:{null_seed}:{inst.id}:{d}")
                # size n_down: the only draw is the whole downstream (the null meets the curve there)
                dp["null"] = {str(s): [list(x) for x in random_draws(rng, down, labels, order_cf[:s],
                                                               n_null if s < len(down) else 1, True)]
                              for s in unique}
            plan["directions"][d] = dp
        for kind in kinds:
            pool = [i for i in included if i.id != inst.id and i.direction_known
                    and (i.scenario == inst.scenario) == (kind == "instance")]
            plan["donors"][kind] = plan_donor(inst, kind, pool, pairs_info, raws, rows, donor_seed)
        plans[inst.id] = plan
    return plans


# -- pass 2 -----------------------------------------------------------------------------------------------------------
def prefill_donor(model, ids_old: list, ids_new: list, prefix: int) -> dict:
    """{"old": cache, "new": cache} of a donor pair's arms (`ids_*`: token ids up to, not including, its decision
    position), sharing the prefix [0, prefix) (computed once), in caches that store every position on every layer
    (a plain transformers DynamicCache: no sliding window drops a note; the computation is the same)."""
    old, new = torch.as_tensor(ids_old, dtype=torch.long), torch.as_tensor(ids_new, dtype=torch.long)
    past = kv.prefill(model, old[:prefix], past=DynamicCache()) if prefix > 0 else DynamicCache()
    return {"old": kv.prefill(model, old[prefix:], past=past), "new": kv.prefill(model, new[prefix:], past=past)}


def measure_second(lm, pair, token_ids, plan: dict, batch_size: int = 400) -> dict:
    """Pass 2 for one pair: per direction, candidate-token logits (fp32) of every planned dose and null set from the
    other arm (unique sets decoded once, "sets" / "rows") and of each donor's full mapped injection ("donors": the
    donor prefilled once per kind, kv.splice_mapped onto the base arm, keys repositioned). A pair not planned for
    measurement returns {"measured": False}."""
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    if not plan.get("measure"):
        return {"token_ids": token_ids, "measured": False, "seconds": round(time.time() - t0, 3)}
    model = lm.model
    stale, oracle, last = prefill_pair(model, pair)
    arms = {"old": stale, "new": oracle}
    donors = {kind: dp for kind, dp in plan["donors"].items() if dp["donor"] is not None}
    donor_caches = {kind: prefill_donor(model, dp["ids"]["old"], dp["ids"]["new"], dp["prefix"])
                    for kind, dp in donors.items()}
    out = {"token_ids": token_ids, "measured": True, "directions": {}}
    for d, (base, other) in DIRECTIONS.items():
        dp = plan["directions"][d]
        sets = [tuple(s) for kind in ("topk_cf", "topk_in") for s in dp.get(kind, {}).values()]
        sets += [tuple(x) for draws in dp.get("null", {}).values() for x in draws]
        unique = sorted(set(sets))
        sources = {"pair": arms[other]}
        for kind, dn in donors.items():
            sources[kind] = kv.splice_mapped(model, arms[base], donor_caches[kind][dn["arms"][d]], dn["map"])
        splices = [Splice(s, source="pair") for s in unique]
        splices += [Splice(tuple(q for q, _ in dn["map"]), source=kind) for kind, dn in donors.items()]
        engine = SpliceEngine(model, arms[base], sources, last, chunk_size=batch_size)
        rows = engine.run(splices, tokens=token_ids).tolist()
        out["directions"][d] = {"sets": [list(s) for s in unique], "rows": rows[:len(unique)],
                                "donors": dict(zip(donors, rows[len(unique):])), "n_requested": len(sets)}
    out["seconds"] = round(time.time() - t0, 3)
    return out


# -- analysis ---------------------------------------------------------------------------------------------------------
def _outcome(logits: dict, ro, m_base: float, m_other: float, dec_base: str, follow: str | None,
             gated: bool) -> dict:
    """Margin, decision, recovery toward the other arm (gated pairs with distinct arm margins), flipped, follows."""
    m, dec = ro.margin(logits), ro.decision(logits)
    rec = (m - m_base) / (m_other - m_base) if gated and m_other != m_base else None
    return {"m": m, "decision": dec, "recovery": rec, "flipped": dec != dec_base,
            "follows_injected": None if follow is None else dec == follow}


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair injections (full, dose, donors) with the identity check, split into included / excluded /
    controls, and aggregates over the included pairs: recoveries (cluster-robust CI by domain), flip and
    follow rates, the dose curves over k and over fractions with the matched random-k null band, donor counts and
    unmapped positions. Pooled rows ("both") count each pair twice, once per direction, in its domain's cluster."""
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row["direction"] = flip_direction(inst)
        gated = inst.kind != "control"
        plan, second = raw.get("plan", {}), raw.get("second", {})
        row["n_down"] = len(raw["positions"])
        if plan.get("measure"):
            row["plan"] = {"sizes": plan["sizes"],
                           "cf_scenarios": {d: plan["directions"][d]["cf_scenarios"] for d in DIRECTIONS},
                           "topk_cf": {d: plan["directions"][d].get("topk_cf") for d in DIRECTIONS}}
        else:
            row["plan"] = {"not_measured": plan.get("reason")}
        for d, (base, other) in DIRECTIONS.items():
            m_base, m_other = _arm_margins(row, base, other)
            dec_base, dec_other = row[f"dec_{ARM_STATE[base]}"], row[f"dec_{ARM_STATE[other]}"]
            tok = raw["token_ids"]
            out = {"base": base, "donor": other, "m_base": m_base, "m_other": m_other, "dec_base": dec_base,
                   "dec_other": dec_other}
            out["full"] = _outcome(_logits(tok, raw[d]["full"]), ro, m_base, m_other, dec_base, dec_other, gated)
            fo = ro.margin({int(t): v for t, v in raw["states"][_field_only_state(d)]["logits"].items()})
            fo_rec = (fo - m_other) / (m_base - m_other) if gated and m_base != m_other else None
            out["identity"] = {
                "partner": f"P1 field-only state of the pair with stale = {other}, oracle = {base}",
                "field_only_recovery": fo_rec, "one_minus_field_only": None if fo_rec is None else 1 - fo_rec,
                "abs_diff_logits": abs(out["full"]["m"] - fo),
                "abs_diff_recovery": None if fo_rec is None else abs(out["full"]["recovery"] - (1 - fo_rec))}
            if gated:
                out["single"] = single_recoveries(raw, ro, row, d)
            if second.get("measured"):
                dp, sd = plan["directions"][d], second["directions"][d]
                of = {tuple(s): _logits(second["token_ids"], r) for s, r in zip(sd["sets"], sd["rows"])}
                for kind in ("topk_cf", "topk_in"):
                    if kind in dp:
                        out[kind] = {s: _outcome(of[tuple(x)], ro, m_base, m_other, dec_base, dec_other, gated)
                                     for s, x in dp[kind].items()}
                if "null" in dp:
                    out["null"] = {s: [_outcome(of[tuple(x)], ro, m_base, m_other, dec_base, dec_other,
                                                gated)["recovery"] for x in draws] for s, draws in dp["null"].items()}
                    if any(v is None for draws in out["null"].values() for v in draws):
                        del out["null"]            # equal arm margins: no recovery, no null
                if "no_cf_reason" in dp:
                    out["no_cf_reason"] = dp["no_cf_reason"]
                out["donors"] = {}
                for kind, dn in plan["donors"].items():
                    if dn["donor"] is None:
                        out["donors"][kind] = {"donor": None, "reason": dn["reason"]}
                        continue
                    dec = dn["decisions"][d]
                    res = _outcome(_logits(second["token_ids"], sd["donors"][kind]), ro, m_base, m_other, dec_base,
                                   dec["target"], gated)
                    out["donors"][kind] = {
                        **res, "donor": dn["donor"], "donor_scenario": dn["donor_scenario"], "arm": dn["arms"][d],
                        **dec, "donor_decides_opposite": dec["target"] is not None and dec["target"] != dec_base,
                        "n_mapped": len(dn["map"]), "n_unmapped": len(dn["unmapped"]),
                        "unmapped_fraction": len(dn["unmapped"]) / row["n_down"] if row["n_down"] else 0.0,
                        "unmapped": dn["unmapped"], "unmapped_labels": dn["unmapped_labels"], "map": dn["map"]}
            row[d] = out
        split.add(inst, row)

    included, boot = split.included, boot_args(stats)
    first = next(iter(DIRECTIONS))                 # a pair's donors and plan are the same in both directions
    # [(direction outcome, row)] per view; "both" lists each pair once per direction, in its domain's cluster
    views = {**{d: [(r[d], r) for r in included] for d in DIRECTIONS},
             "both": [(r[d], r) for r in included for d in DIRECTIONS]}

    def rates(outcomes: list) -> dict:
        """Recovery summary, flip rate and follow rate of [(outcome, row)] (undefined values left out, counted)."""
        rec = [(o["recovery"], r["scenario"]) for o, r in outcomes if o["recovery"] is not None]
        fol = [(o["follows_injected"], r["scenario"]) for o, r in outcomes if o["follows_injected"] is not None]
        return {"recovery": summarize([v for v, _ in rec], [c for _, c in rec], **boot),
                "flip_rate": summarize_proportion([o["flipped"] for o, _ in outcomes],
                                                  [r["scenario"] for _, r in outcomes]),
                "follows_injected_rate": summarize_proportion([v for v, _ in fol], [c for _, c in fol]),
                "n_recovery_undefined": len(outcomes) - len(rec), "n_follow_undefined": len(outcomes) - len(fol)}

    agg = {"full": {v: rates([(o["full"], r) for o, r in rows]) for v, rows in views.items()},
           "n_down": summarize([r["n_down"] for r in included], split.clusters, **boot)}
    # the dose curves over k and over fractions of the downstream: each pair injects its plan's size at each point
    n_means = max(MIN_NULL_DRAWS, int(stats["n_boot"]))
    agg["dose"] = {}
    for vi, (v, rows) in enumerate(views.items()):
        curve = {kind: {"k": {}, "frac": {}} for kind in ("topk_cf", "topk_in", "null_matched")}
        for ai, (axis, points) in enumerate((("k", [str(k) for k in KS]), ("frac", [str(f) for f in FRACS]))):
            for pi, point in enumerate(points):
                size = lambda r: str(r["plan"]["sizes"][axis][point])     # noqa: E731
                for kind in ("topk_cf", "topk_in"):
                    got = [(o[kind][size(r)], r) for o, r in rows if kind in o]
                    if got:
                        curve[kind][axis][point] = rates(got)
                nulls = [(o["null"][size(r)], o["topk_cf"][size(r)]["recovery"]) for o, r in rows if "null" in o]
                if nulls:
                    curve["null_matched"][axis][point] = null_of_mean(
                        [n for n, _ in nulls], {"topk_cf": [x for _, x in nulls]}, alpha=stats["alpha"],
                        n_means=n_means, seed=[int(stats["seed"]), vi, ai, pi])
        agg["dose"][v] = curve
    agg["no_cf_ranking"] = dict(Counter(o["no_cf_reason"] for o, _ in views["both"] if "no_cf_reason" in o))
    # other donors: outcomes, pairs without one (by reason), recipient positions without a counterpart (by label)
    agg["donors"], agg["no_donor"], agg["unmapped"] = {}, {}, {}
    for kind in DONOR_KINDS:
        planned = [r for r in included if kind in r[first].get("donors", {})]
        if not planned:
            continue
        agg["donors"][kind] = {v: rates([(o["donors"][kind], r) for o, r in rows
                                         if o.get("donors", {}).get(kind, {}).get("donor") is not None])
                               for v, rows in views.items()}
        reasons = Counter(r[first]["donors"][kind]["reason"] for r in planned
                          if r[first]["donors"][kind]["donor"] is None)
        agg["no_donor"][kind] = {"n_pairs": sum(reasons.values()), "by_reason": dict(reasons)}
        have = [r for r in planned if r[first]["donors"][kind]["donor"] is not None]
        labels = Counter()
        for r in have:
            labels.update(r[first]["donors"][kind]["unmapped_labels"])
        agg["unmapped"][kind] = {
            "n_pairs": len(have), "positions": sum(r[first]["donors"][kind]["n_unmapped"] for r in have),
            "pairs_with_unmapped": sum(r[first]["donors"][kind]["n_unmapped"] > 0 for r in have),
            "by_label": dict(labels),
            "fraction": summarize([r[first]["donors"][kind]["unmapped_fraction"] for r in have],
                                  [r["scenario"] for r in have], **boot)}
    # controls apart: their arms conclude alike, so there is no other conclusion to recover toward; how much the
    # full injection moves the margin, and how often it changes the decision
    controls = split.controls
    agg["controls"] = {d: {"decision_change_rate": summarize_proportion([r[d]["full"]["flipped"] for r in controls],
                                                                        [r["scenario"] for r in controls]),
                           "abs_margin_change": summarize([abs(r[d]["full"]["m"] - r[d]["m_base"]) for r in controls],
                                                          [r["scenario"] for r in controls], **boot)}
                       for d in DIRECTIONS}

    for o, _ in views["both"]:      # the rows keep each pair's null summary, not its n_null draws per size
        if "null" in o:
            o["null"] = {s: _null_summary(draws, o["topk_cf"][s]["recovery"]) for s, draws in o["null"].items()}
    gated_rows = split.included + split.excluded
    diffs = [r[d]["identity"]["abs_diff_recovery"] for r in gated_rows for d in DIRECTIONS
             if r[d]["identity"]["abs_diff_recovery"] is not None]
    at_full = [abs(r[d]["topk_cf"][str(r["n_down"])]["m"] - r[d]["full"]["m"]) for r in included
               for d in DIRECTIONS if str(r["n_down"]) in r[d].get("topk_cf", {})]
    sanity = {"note": "full same-pair injection of [b, dpos) = P1 field-only state of the pair oriented stale = donor "
                      "arm, oracle = base arm; its recovery is 1 - that field-only recovery by construction (§8 W7): "
                      "a sanity check, not evidence. The dose at k = n_down is the full injection.",
              "identity_max_abs_diff_logits": max((r[d]["identity"]["abs_diff_logits"] for r in split.rows
                                                   for d in DIRECTIONS), default=None),
              "identity_max_abs_diff_recovery": max(diffs, default=None),
              "dose_at_n_down_vs_full_max_abs_diff_logits": max(at_full, default=None)}
    n_donor = {kind: sum(r[first].get("donors", {}).get(kind, {}).get("donor") is not None for r in included)
               for kind in DONOR_KINDS}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("injections"), ks=list(KS), fracs=list(FRACS),
                                     directions=list(DIRECTIONS), n_with_donor=n_donor)}



def _null_summary(draws: list, observed: float) -> dict:
    """One pair's matched null at one size: n draws, their mean and 2.5 / 97.5 % quantiles, and the pair's
    one-sided rank p = (#draws >= the cross-fitted set's recovery + 1) / (n + 1)."""
    x = torch.tensor(draws, dtype=torch.float64)
    lo, hi = torch.quantile(x, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"n": len(draws), "mean": float(x.mean()), "lo": lo, "hi": hi,
            "p_topk_cf_ge": (int((x >= observed).sum()) + 1) / (len(draws) + 1)}
