"""P6 attention knockout (paper_spec §3.6, E1/E2/E4) on three cache states, with the controls §8 W14 asks for.

The paper knocked the decision query's attention out of the downstream positions on the field-only cache only, with
−inf masking only. Here, per pair and for each state — `field_only` (stale cache, field K/V from the new prefill),
`stale` and `oracle` — the splice engine decodes:

* E1 graded: the top fraction f of downstream positions [b, dpos), ranked by that state's own decision-query attention
  (mean over heads and layers), knocked out in all layers, f in FRACS;
* E2 bands: all of [b, dpos) knocked out in the early / mid / late third of the layers, or all layers;
* each of these three ways: `mask` (score −inf, the rest renormalises: the paper's knockout), `mean` (K and V
  replaced by their mean over [b, dpos), per layer and head) and `resample` (K and V of a random position of the
  prefix before the field, sink excluded, seeded; keys keep their donor's rotary phase);
* a random-position mask knockout at matched attention mass: random downstream positions added until their
  attention mass reaches the top-f set's (n_random draws per f), the null the graded curve stands against;
* E4: the unedited decode's attention mass on the sink (the first 3 positions), the rest of the prefix, the field,
  the downstream and the token itself.

Every intervention also logs how the decision query's attention moved (engine `attention_groups`): per layer the
head-mean mass per group, the KL to the unedited attention and the entropy change. Decisions are read with the
probe-wide readout; aggregates give recovery toward the oracle, P(decision = new value's action) and P(safe) with
Wilson intervals.
"""
from __future__ import annotations

import copy
import math
import random
import time

import torch

from kvnotes import kv
from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import MIN_NULL_DRAWS, null_of_mean, summarize, summarize_proportion
from probes.base import ProbeSpec
from probes.common import (Split, band, boot_args, end_states, pair_row, prefill_pair,
                           readout_key)

CONTRACT = ProbeSpec(
    name="knockout", paper_refs=("P6", "§3.6", "E1", "E2", "E4"),
    options={"batch_size": 400, "n_random": 50, "seed": 0},
    measure_options=("batch_size", "n_random", "seed"),
    not_reanalysable="its rows keep each intervention's margin and decision, not the candidate logits measure() "
                     "returns, nor the unspliced stale / oracle states")
STATES = ("field_only", "stale", "oracle")
FRACS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
BANDS = ("early", "mid", "late", "all")
METHODS = ("mask", "mean", "resample")
GROUPS = ("sink", "prefix", "field", "downstream")
RESAMPLE_DONORS = "prefix"   # records without this key resampled within the downstream: a no-op permutation, invalid


def band_layers(name: str, n_layers: int) -> tuple:
    """The layers of band `name` (the layer sweep's early / mid / late thirds, or all)."""
    if name not in BANDS:
        raise KeyError(f"unknown layer band {name!r}; the bands are {BANDS}")
    return tuple(li for li in range(n_layers) if name == "all" or band(li, n_layers) == name)


def ablation_sources(cache, down: list, donors: list, seed: str) -> dict:
    """Copies of `cache` whose downstream K/V are their mean over `down` (per layer and head), or, for resampling,
    the K/V of a random position drawn from `donors` (positions outside the downstream, so that no knockout set can
    resample from itself: a permutation of a set of keys and values within the set leaves attention unchanged). A
    donor outside a sliding window gives the mean instead."""
    if not donors:
        raise ValueError("resample-ablation needs donor positions outside the downstream (an empty prefix)")
    idx = torch.as_tensor(down, dtype=torch.long)
    rng = random.Random(seed)
    pidx = torch.as_tensor([rng.choice(donors) for _ in down], dtype=torch.long)
    mean, resample = copy.deepcopy(cache), copy.deepcopy(cache)
    for src, lm_, lr in zip(cache.layers, mean.layers, resample.layers):
        off = kv._layer_offset(src)
        keep = idx >= off
        i, j = idx[keep] - off, pidx[keep] - off
        if len(i) == 0:
            continue
        for t_src, t_mean, t_res in ((src.keys, lm_.keys, lr.keys), (src.values, lm_.values, lr.values)):
            mu = t_src[:, :, i].mean(2, keepdim=True)
            t_mean[:, :, i] = mu
            ok = j >= 0
            t_res[:, :, i[ok]] = t_src[:, :, j[ok]]
            t_res[:, :, i[~ok]] = mu
    return {"mean": mean, "resample": resample}


def _attention_summary(attn: dict) -> dict:
    """Per intervention: per-layer head-mean mass per group (+ self), KL to the unedited decode, entropy."""
    return {k: attn[k].mean(2) for k in ("mass", "kl", "entropy")}


def measure(lm, pair, token_ids, batch_size: int = 400, check_decode: bool = False, n_random: int = 50,
            seed: int = 0) -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    model = lm.model
    stale, oracle, last = prefill_pair(model, pair)
    a, b = pair.span
    dpos = pair.dpos
    down = list(range(b, dpos))
    groups = {"sink": list(range(min(3, a))), "prefix": list(range(min(3, a), a)), "field": list(range(a, b)),
              "downstream": down}
    caches = {"field_only": kv.splice(stale, oracle, range(a, b)), "stale": stale, "oracle": oracle}
    n_layers = len(stale.layers)
    out = {"token_ids": token_ids, "n_layers": n_layers, "n_down": len(down), "groups": list(GROUPS) + ["self"],
           "states": end_states(model, stale, oracle, last, token_ids), "knockout": {}}
    for state, cache in caches.items():
        donors = groups["prefix"] or groups["sink"]
        engine = SpliceEngine(model, cache, ablation_sources(cache, down, donors, f"{pair.instance.id}:{state}:{seed}"),
                              last, chunk_size=batch_size)
        # the state's own decision attention to each downstream position (mean over heads and layers): the ranking
        _, per_pos = engine.run([Splice(())], tokens=token_ids, attention_groups={str(p): [p] for p in down})
        att = per_pos["mass"][0, :, :, :len(down)].mean((0, 1))
        order = [down[i] for i in torch.argsort(-att, stable=True).tolist()]
        att_of = dict(zip(down, att.tolist()))
        plan = []                                        # (kind, key, method, positions, layers)
        for f in FRACS:
            top = order[:math.ceil(f * len(down))]
            for method in METHODS:
                plan.append(("graded", str(f), method, top, None))
        for name in BANDS:
            for method in METHODS:
                plan.append(("band", name, method, down, band_layers(name, n_layers)))
        rng = random.Random(f"knockout-random:{seed}:{pair.instance.id}:{state}")
        for f in FRACS[1:-1]:
            target = sum(att_of[p] for p in order[:math.ceil(f * len(down))])
            for _ in range(n_random):
                shuffled = rng.sample(down, len(down))
                pick, mass = [], 0.0
                for p in shuffled:
                    if mass >= target:
                        break
                    pick.append(p)
                    mass += att_of[p]
                plan.append(("random", str(f), "mask", pick, None))
        splices = [Splice(tuple(pos), layers=layers, which="mask") if method == "mask" else
                   Splice(tuple(pos), layers=layers, source=method) for _, _, method, pos, layers in plan]
        logits, attn = engine.run([Splice(())] + splices, tokens=token_ids, attention_groups=groups)
        summ = _attention_summary(attn)
        entries = []
        for i, (kind, key, method, pos, layers) in enumerate(plan, start=1):
            e = {"kind": kind, "key": key, "method": method, "n_positions": len(pos),
                 "logits": logits[i].tolist(),
                 "mass": summ["mass"][i].mean(0).tolist(),                     # mean over layers, per group
                 "kl": float(summ["kl"][i].mean()),
                 "entropy_change": float((summ["entropy"][i] - summ["entropy"][0]).mean())}
            if kind != "random":
                e.update({"positions": list(pos), "layers": None if layers is None else list(layers),
                          "mass_by_layer": summ["mass"][i].tolist(), "kl_by_layer": summ["kl"][i].tolist()})
            entries.append(e)
        out["knockout"][state] = {"base_logits": logits[0].tolist(), "base_mass": summ["mass"][0].mean(0).tolist(),
                                "base_mass_by_layer": summ["mass"][0].tolist(),
                                "attention_order": order, "attention": att.tolist(), "entries": entries}
    out["seconds"] = round(time.time() - t0, 3)
    return out


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair knockout outcomes per state, cluster summaries per cell, and the matched-mass random null.

    `random_matched_mass/<f>` (per state): `kvnotes.stats.null_of_mean` on each included pair's n_random stored
    random-position knockouts: B = max(2000, stats.n_boot) null means of recovery (and of the 0/1 "decision is the
    oracle's", `p_new`, without a p-value), each the mean over pairs of one draw picked independently per pair,
    with lo / median / hi, p_floor = 1/(B+1) and the one-sided p_graded_mask_ge_null of the top-attention mask
    knockout. With n_random = 50 draws a pair's own null has at most 50 distinct values (and `p_new` only 0 or 1),
    but the null of the across-pair mean built by independent per-pair resampling is still valid: under the null a
    pair's draws are exchangeable with its observed value and are drawn independently of the other pairs' (the null
    conditions on the pairs). Its resolution is set by B, not by n_random; n_random bounds how well each pair's null
    is known. (Before: draw j's mean over pairs, so only n_random null means and a p floor of 1/51.)
    """
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = {**pair_row(inst, pairs_info[inst.id], raw, ro), "safe_action": inst.safe}
        idx = {t: i for i, t in enumerate(raw["token_ids"])}

        def read(logits):
            lg = {t: logits[i] for t, i in idx.items()}
            m = ro.margin(lg)
            return m, ro.decision(lg)

        dm = row["delta_m"]
        states = {}
        for state in STATES:
            st = raw["knockout"][state]
            m0, d0 = read(st["base_logits"])
            res = {"base": {"margin": m0, "decision": d0, "mass": dict(zip(raw["groups"], st["base_mass"]))},
                   "graded": {}, "band": {}, "random": {}}
            for e in st["entries"]:
                m, d = read(e["logits"])
                rec = (m - row["m_stale"]) / dm if dm else None
                if e["kind"] == "random":        # compact: many draws
                    r = res["random"].setdefault(e["key"], {"recovery": [], "decision": [], "n_positions": []})
                    r["recovery"].append(rec)
                    r["decision"].append(d)
                    r["n_positions"].append(e["n_positions"])
                    continue
                res[e["kind"]].setdefault(e["key"], {})[e["method"]] = {
                    "margin": m, "decision": d, "recovery": rec, "kl": e["kl"], "entropy_change": e["entropy_change"],
                    "mass": dict(zip(raw["groups"], e["mass"])), "n_positions": e["n_positions"]}
                if e["method"] == "mask" and (e["kind"] == "band" or e["key"] == "1.0"):
                    res.setdefault("mass_by_layer", {})[f"{e['kind']}/{e['key']}"] = e["mass_by_layer"]
            res["mass_by_layer"]["base"] = st["base_mass_by_layer"]
            res["base"]["recovery"] = (m0 - row["m_stale"]) / dm if dm else None
            states[state] = res
        row["knockout"] = states
        split.add(inst, row)

    included, boot = split.included, boot_args(stats)
    clusters = split.clusters
    n_means = max(MIN_NULL_DRAWS, int(stats["n_boot"]))
    agg = {}
    for si, state in enumerate(STATES):
        sa = {"base": _cell(included, clusters, lambda r: r["knockout"][state]["base"], boot),
              "E4_attention_mass": {g: summarize([r["knockout"][state]["base"]["mass"][g] for r in included], clusters,
                                                 **boot) for g in list(GROUPS) + ["self"]}}
        for kind, keys in (("graded", [str(f) for f in FRACS]), ("band", BANDS)):
            sa[kind] = {k: {m: _cell(included, clusters, lambda r, k=k, m=m: r["knockout"][state][kind][k][m], boot)
                            for m in METHODS} for k in keys}
        sa["random_matched_mass"] = {}
        for fi, f in enumerate([str(f) for f in FRACS[1:-1]]):
            draws = [r["knockout"][state]["random"][f]["recovery"] for r in included]
            obs = [r["knockout"][state]["graded"][f]["mask"]["recovery"] for r in included]
            p_new = [[float(d == r["dec_oracle"]) for d in r["knockout"][state]["random"][f]["decision"]]
                     for r in included]
            null = {"alpha": stats["alpha"], "n_means": n_means, "seed": [int(stats["seed"]), si, fi]}
            sa["random_matched_mass"][f] = {"recovery": null_of_mean(draws, {"graded_mask": obs}, **null),
                                            "p_new": null_of_mean(p_new, {}, **null)} if included else {}
        # how the decision's attention redistributes under the knockouts, per layer (head mean, mean over pairs)
        sa["mass_by_layer"] = {key: torch.tensor([r["knockout"][state]["mass_by_layer"][key] for r in included])
                               .mean(0).tolist() for key in (included[0]["knockout"][state]["mass_by_layer"]
                                                             if included else [])}
        agg[state] = sa
    for r in split.rows:     # per-layer masses live in the aggregate; per pair they would multiply the record's size
        for state in STATES:
            r["knockout"][state].pop("mass_by_layer", None)
    sanity = {"note": "graded f = 0 removes nothing (equals the unedited decode of the state); the field_only base "
                      "recovery is P1's field-only recovery; the oracle base recovery is 1 by construction",
              "graded_0_max_abs_margin_diff": max((abs(r["knockout"][s]["graded"]["0.0"][m]["margin"]
                                                       - r["knockout"][s]["base"]["margin"])
                                                   for r in split.rows for s in STATES for m in METHODS), default=None)}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("knockouts"), states=list(STATES), fracs=list(FRACS),
                                     bands=list(BANDS), methods=list(METHODS), resample_donors=RESAMPLE_DONORS)}


def _cell(rows: list, clusters: list, get, boot: dict) -> dict:
    """Recovery, P(decision = the oracle's), P(safe), attention KL / entropy change / mass moved, for one cell."""
    vals = [get(r) for r in rows]
    out = {"recovery": summarize([v["recovery"] for v in vals], clusters, **boot),
           "p_new": summarize_proportion([v["decision"] == r["dec_oracle"] for v, r in zip(vals, rows)], clusters),
           "p_old": summarize_proportion([v["decision"] == r["dec_stale"] for v, r in zip(vals, rows)], clusters)}
    out["p_safe"] = summarize_proportion([v["decision"] == r["safe_action"] for v, r in zip(vals, rows)], clusters)
    if vals and "kl" in vals[0]:
        out["kl"] = summarize([v["kl"] for v in vals], clusters, **boot)
        out["entropy_change"] = summarize([v["entropy_change"] for v in vals], clusters, **boot)
        out["mass"] = {g: float(sum(v["mass"][g] for v in vals) / len(vals)) for g in vals[0]["mass"]}
    return out
