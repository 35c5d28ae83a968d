"""P4/P5 top-k locality and suffix/prefix curves (paper_spec §3.4, §3.5, §3.12; Fig. 3b), with the controls the paper
lacked (§8 W8, W9e).

Two passes per pair (run.py calls `measure`, then, once every pair's first pass and the readouts exist,
`plan_second` and `measure_second`):

1. every single position of [a, dpos) spliced (as P2): the ranking's raw material;
2. with the readout fixed, the joint splices:
   * `topk_in`: the k downstream positions ([b, dpos): the notes, not the field) of highest single recovery on the
     same pair (in-sample, the paper's ranking), k in KS; k >= n_down is the whole downstream (the downstream splice);
   * `topk_cf`: the k positions ranked on *other scenarios'* included pairs (cross-fitted, leave-one-scenario-out).
     Positions transfer by role: a position's key is (fine label, distance to the end of its label run), e.g.
     ("task", 0) = the last token of the answer instruction; unseen keys fall back to the label's mean;
   * `topk_field`: the paper's P4 set, ranked over [a, dpos) including the field;
   * a matched random-k null for each k (default 200 draws): k downstream positions with the same fine-label mix as
     the in-sample top-k set, drawn uniformly within each label; and an unmatched uniform null;
   * `suffix` / `prefix`: the last / first max(1, round(f (dpos - a))) positions of [a, dpos);
   * `topk_in_frac` / `topk_cf_frac` / `null_matched_frac`: the top-k sets and the matched null with k a fraction f
     of the pair's downstream, k = max(1, round(f n_down)) for f in TOPK_FRACS (paper_spec §3.12: specificity at
     a size that scales with the downstream, so pairs of different lengths are compared at equal shares).

Nulls are drawn only for included pairs (the readout and inclusion rule are known at plan time), with a seeded
generator per pair; duplicate draws are decoded once.
"""
from __future__ import annotations

import random
import time

from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import MIN_NULL_DRAWS, null_of_mean, summarize
from probes.base import ProbeSpec
from probes.common import (Split, boot_args, end_states, included_rows, pair_row,
                           prefill_pair, readout_key, recoveries)

CONTRACT = ProbeSpec(
    name="topk", paper_refs=("P4", "P5", "§3.4", "§3.5", "§3.12", "Fig3b"),
    options={"batch_size": 400, "n_null": 200, "n_uniform_null": 100, "null_seed": 0},
    second_pass=True,
    not_reanalysable="its rows keep recoveries, not the second pass's candidate logits (top-k, null and "
                     "suffix / prefix sets), nor the unspliced stale / oracle states")
KS = (1, 2, 4, 8, 16, 32, 64, 128)
FRACS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
TOPK_FRACS = (0.01, 0.02, 0.05, 0.1)   # top-k as a share of the downstream: the small shares specificity is about


def frac_sizes(n_down: int) -> dict:
    """{str(f): k} for f in TOPK_FRACS: k = max(1, round(f n_down)) downstream positions, capped at n_down."""
    return {str(f): min(n_down, max(1, round(f * n_down))) for f in TOPK_FRACS}


# -- pass 1: every single position --------------------------------------------------------------------------------
def measure(lm, pair, token_ids, batch_size: int = 400, check_decode: bool = False) -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    engine = SpliceEngine(lm.model, stale, oracle, last, chunk_size=batch_size)
    positions = list(range(pair.span[0], pair.dpos))
    rows = engine.run([Splice((p,)) for p in positions], tokens=token_ids)
    return {"states": end_states(lm.model, stale, oracle, last, token_ids), "token_ids": token_ids,
            "positions": positions, "rows": rows.tolist(), "seconds": round(time.time() - t0, 3)}


# -- planning pass 2 ------------------------------------------------------------------------------------------------
def role_keys(labels: list, positions: list) -> list[tuple]:
    """(label, distance to the end of the position's run of equal labels) for each position."""
    keys = []
    for p in positions:
        e = p
        while e + 1 < len(labels) and labels[e + 1] == labels[p]:
            e += 1
        keys.append((labels[p], e - p))
    return keys


def cf_order(down: list, labels: list, scores: dict, label_scores: dict) -> list:
    keys = role_keys(labels, down)
    score = [scores.get(k, label_scores.get(k[0], 0.0)) for k in keys]
    return [p for _, _, p in sorted(zip(score, [-p for p in down], down), reverse=True)]


def cross_fitted_order(down: list, labels: list, material: dict, held_out) -> tuple[list | None, list]:
    """`down` ranked by the mean score of each position's role key over the pairs of every domain but `held_out`
    (material: {domain: [(role key, score), ...]}); a key unseen there takes its label's mean, then 0; ties go to the
    later position (cf_order). Returns (order, the domains used), or (None, []) when no other domain has
    material. The leave-one-domain-out ranking of topk's pass 2 and of the injection probe's dose (paper_spec §8 W8)."""
    used = sorted(s for s in material if s != held_out and material[s])
    if not used:
        return None, []
    by_key, by_label = {}, {}
    for s in used:
        for key, v in material[s]:
            by_key.setdefault(key, []).append(v)
            by_label.setdefault(key[0], []).append(v)
    scores = {k: sum(v) / len(v) for k, v in by_key.items()}
    label_scores = {k: sum(v) / len(v) for k, v in by_label.items()}
    return cf_order(down, labels, scores, label_scores), used


def random_draws(rng: random.Random, down: list, labels: list, top: list, n: int, matched: bool) -> list[tuple]:
    by_label = {}
    for p in down:
        by_label.setdefault(labels[p], []).append(p)
    mix = {}
    for p in top:
        mix[labels[p]] = mix.get(labels[p], 0) + 1
    out = []
    for _ in range(n):
        if matched:
            s = [p for lab, c in sorted(mix.items()) for p in rng.sample(by_label[lab], c)]
        else:
            s = rng.sample(down, len(top))
        out.append(tuple(sorted(s)))
    return out


def plan_second(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, probe_cfg: dict) -> dict:
    """Per pair, the position sets of pass 2 (JSON-able)."""
    n_null = int(probe_cfg.get("n_null", 200))
    n_uniform = int(probe_cfg.get("n_uniform_null", 100))
    seed = int(probe_cfg.get("null_seed", 0))
    single, include = {}, {}
    for inst in instances:
        row, include[inst.id] = included_rows([inst], pairs_info, raws, readouts, exclusion)[inst.id]
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        single[inst.id] = recoveries(raw, ro, row).tolist() if row["delta_m"] else None
    # cross-fitting material: included pairs' downstream single recoveries, keyed by role
    by_scenario = {}
    for inst in instances:
        if not include[inst.id]:
            continue
        info, raw = pairs_info[inst.id], raws[inst.id]
        b = info["span"][1]
        down = list(range(b, info["dpos"]))
        rec = dict(zip(raw["positions"], single[inst.id]))
        for key, p in zip(role_keys(info["labels"], down), down):
            by_scenario.setdefault(inst.scenario, []).append((key, rec[p]))
    plans = {}
    for inst in instances:
        info = pairs_info[inst.id]
        a, b, dpos, labels = info["span"][0], info["span"][1], info["dpos"], info["labels"]
        down = list(range(b, dpos))
        n_down, span_len = len(down), dpos - a
        plan = {"included_at_plan": include[inst.id], "n_down": n_down, "ks": list(KS),
                "suffix": {str(f): list(range(dpos - max(1, round(f * span_len)), dpos)) for f in FRACS},
                "prefix": {str(f): list(range(a, a + max(1, round(f * span_len)))) for f in FRACS}}
        if single[inst.id] is not None:
            rec = dict(zip(raws[inst.id]["positions"], single[inst.id]))
            order_in = sorted(down, key=lambda p: (-rec[p], -p))
            order_field = sorted(range(a, dpos), key=lambda p: (-rec[p], -p))
            sizes = plan["frac_sizes"] = frac_sizes(n_down)
            plan["topk_in"] = {str(k): sorted(order_in[:k]) for k in plan["ks"]}
            plan["topk_in_frac"] = {f: sorted(order_in[:k]) for f, k in sizes.items()}
            plan["topk_field"] = {str(k): sorted(order_field[:k]) for k in KS}
            order_cf, used = cross_fitted_order(down, labels, by_scenario, inst.scenario)
            if order_cf is not None:
                plan["topk_cf"] = {str(k): sorted(order_cf[:k]) for k in plan["ks"]}
                plan["topk_cf_frac"] = {f: sorted(order_cf[:k]) for f, k in sizes.items()}
                plan["cf_scenarios"] = used
            if include[inst.id]:
                rng = random.Random(f"topk-null:{seed}:{inst.id}")
                # k >= n_down: the only draw is the whole downstream (the null meets the curve there)
                plan["null_matched"] = {str(k): [list(d) for d in random_draws(rng, down, labels, order_in[:k],
                                                                         n_null if k < n_down else 1, True)]
                                        for k in KS}
                plan["null_uniform"] = {str(k): [list(d) for d in random_draws(rng, down, labels, order_in[:k],
                                                                         n_uniform if k < n_down else 1, False)]
                                        for k in KS}
                plan["null_matched_frac"] = {f: [list(d) for d in random_draws(rng, down, labels, order_in[:k],
                                                                          n_null if k < n_down else 1, True)]
                                             for f, k in sizes.items()}
        plans[inst.id] = plan
    return plans


# -- pass 2 -----------------------------------------------------------------------------------------------------------
SET_KINDS = ("topk_in", "topk_cf", "topk_field", "suffix", "prefix", "topk_in_frac", "topk_cf_frac")
NULL_KINDS = ("null_matched", "null_uniform", "null_matched_frac")


def measure_second(lm, pair, token_ids, plan: dict, batch_size: int = 400) -> dict:
    """Candidate-token logits of every planned set (unique sets decoded once)."""
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(lm.model, pair)
    sets = []
    for kind in SET_KINDS:
        sets += [tuple(s) for s in plan.get(kind, {}).values()]
    for kind in NULL_KINDS:
        sets += [tuple(d) for draws in plan.get(kind, {}).values() for d in draws]
    unique = sorted(set(sets))
    engine = SpliceEngine(lm.model, stale, oracle, last, chunk_size=batch_size)
    rows = engine.run([Splice(s) for s in unique], tokens=token_ids)
    return {"token_ids": token_ids, "sets": [list(s) for s in unique], "rows": rows.tolist(),
            "n_splices": len(unique), "n_requested": len(sets), "seconds": round(time.time() - t0, 3)}


# -- analysis ---------------------------------------------------------------------------------------------------------
def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair recoveries of every planned set, cluster summaries of the curves, and the random-k nulls.

    Nulls (`null_matched`, `null_uniform`, per k): `kvnotes.stats.null_of_mean` on each included pair's stored
    draws (probe.n_null matched, probe.n_uniform_null uniform; one forced draw at k >= n_down): B = max(2000,
    stats.n_boot) null means, each the mean over pairs of one draw picked independently per pair: valid because
    under the null a pair's draws are exchangeable with its observed value and are drawn independently of the other
    pairs' (the null conditions on the pairs; pairs of one scenario share a template). Keys: n, n_draws (per pair),
    B, mean, lo, median, hi, per_pair_mean, p_floor = 1/(B+1), topk_in_mean / topk_cf_mean and the one-sided
    p_topk_in_ge_null / p_topk_cf_ge_null. (Before: draw j's mean over pairs, so only n_null null means.)

    What the null matches: the in-sample top-k set is ranked on the same pair's single-position recoveries, and its
    k and fine-label mix define the matched draws, which are random sets of that size and mix, not ranked by
    anything. So p_topk_in_ge_null asks whether ranking by single recovery picks better sets than chance at equal
    size and label mix; the selection itself is not replicated in the null (no draw is "the best k of a random
    ranking"), so it is not a test that the in-sample ranking generalises: topk_cf (ranked on the other scenarios'
    pairs) is that test. p_topk_cf_ge_null compares the cross-fitted set against the null matched to the IN-SAMPLE
    set's label mix, which can differ from the cross-fitted set's own mix.
    """
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        second, plan = raw["second"], raw["plan"]
        row["plan"] = {k: v for k, v in plan.items() if not k.startswith("null_")}
        if row["delta_m"]:
            of = {tuple(s): float(r) for s, r in zip(second["sets"], recoveries(second, ro, row))}
            row["single"] = dict(zip(map(str, raw["positions"]), recoveries(raw, ro, row).tolist()))
            for kind in SET_KINDS:
                if kind in plan:
                    row[kind] = {k: of[tuple(s)] for k, s in plan[kind].items()}
            for kind in NULL_KINDS:
                if kind in plan:
                    row[kind] = {k: [of[tuple(d)] for d in draws] for k, draws in plan[kind].items()}
            if "topk_cf" in plan:
                row["jaccard_in_cf"] = {str(k): _jaccard(plan["topk_in"][str(k)], plan["topk_cf"][str(k)])
                                        for k in plan["ks"]}
        split.add(inst, row)

    included, boot = split.included, boot_args(stats)
    agg = {}

    def curve(kind: str, keys: list) -> dict:
        out = {}
        for k in keys:
            rows = [r for r in included if k in r.get(kind, {})]
            if rows:
                out[k] = summarize([r[kind][k] for r in rows], [r["scenario"] for r in rows], **boot)
        return out

    k_keys = [str(k) for k in KS]
    agg["topk_in"] = curve("topk_in", k_keys)
    agg["topk_cf"] = curve("topk_cf", k_keys)
    agg["topk_field"] = curve("topk_field", k_keys)
    agg["suffix"] = curve("suffix", [str(f) for f in FRACS])
    agg["prefix"] = curve("prefix", [str(f) for f in FRACS])
    agg["n_down"] = summarize([r["plan"]["n_down"] for r in included], split.clusters, **boot)
    f_keys = [str(f) for f in TOPK_FRACS]
    agg["topk_in_frac"] = curve("topk_in_frac", f_keys)
    agg["topk_cf_frac"] = curve("topk_cf_frac", f_keys)
    n_means = max(MIN_NULL_DRAWS, int(stats["n_boot"]))
    for ni, (kind, keys, sets) in enumerate((("null_matched", k_keys, ("topk_in", "topk_cf")),
                                             ("null_uniform", k_keys, ("topk_in", "topk_cf")),
                                             ("null_matched_frac", f_keys, ("topk_in_frac", "topk_cf_frac")))):
        agg[kind] = {}
        for ki, k in enumerate(keys):
            rows = [r for r in included if k in r.get(kind, {})]
            if rows:
                agg[kind][k] = null_of_mean([r[kind][k] for r in rows],
                                            {o.removesuffix("_frac"): [r[o][k] for r in rows] for o in sets
                                             if all(k in r.get(o, {}) for r in rows)},
                                            alpha=stats["alpha"], n_means=n_means, seed=[int(stats["seed"]), ni, ki])
    agg["jaccard_in_cf"] = {k: summarize([r["jaccard_in_cf"][k] for r in included if k in r.get("jaccard_in_cf", {})],
                                         [r["scenario"] for r in included if k in r.get("jaccard_in_cf", {})], **boot)
                            for k in k_keys if any(k in r.get("jaccard_in_cf", {}) for r in included)}
    sanity = {"note": "topk_in at k >= n_down is the downstream splice ([b, dpos)); suffix/prefix at f = 1 are the "
                      "full splice (recovery 1 by construction)",
              "full_splice_recovery": [r["suffix"]["1.0"] for r in split.rows if "suffix" in r]}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("curves"), ks=list(KS), fracs=list(FRACS),
                                     topk_fracs=list(TOPK_FRACS))}


def _jaccard(x, y) -> float:
    x, y = set(x), set(y)
    return len(x & y) / len(x | y) if x | y else 1.0
