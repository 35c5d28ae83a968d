"""Read heads and write heads (paper_spec §4.1, §4.2; Fig. 15a, tab:circuit "read" / "write"), with the controls
§8 asks for: exact patches of every head (not a DLA-shortlist of 24), joint random-k nulls, a head set chosen on other
domains and evaluated on held-out ones, stability across pairs, and several note positions patched jointly.

Clean = the new-value prompt, corrupt = the old-value prompt; recovery = (m - m_old) / (m_new - m_old) with the
probe-wide readout. Every patch sets query head (l, h)'s output z to its clean value in the corrupt run, through
`kvnotes.heads.HeadPatchEngine` (prefix shared, suffix recomputed; equal to a full-forward `HeadPatch`, tested), or
with `backend=nnsight` / `transformer_lens` one full forward per patch through those libraries (circuits.common):

* read:   at the decision token (the query that reads the cache);
* write1: at the top-1 note position p1 during prefill, everything after it recomputed (the paper's write patch);
* writeN: at the top-`n_notes` note positions jointly (the note is spread over several positions: write1 is a floor).

Note positions are the downstream positions [b, dpos) whose single-position K/V splice (clean into corrupt) moves the
margin most (paper_spec §4.0 `find_aggregators`), ranked with a readout chosen on the pair's own unpatched states
(the probe-wide readout needs every pair's first pass; `notes_readout_agrees` records whether the two coincide).

Pass 1, per pair: the note positions; every head's single patch for the three sweeps; direct logit attribution (DLA)
of every head at the decision token, (z_clean - z_corrupt) W_O^h . d logit_t / d resid (the gradient of each
candidate token's logit through the final norm at the corrupt run's last residual; on Gemma-3 the post-attention
norm after W_O is skipped, so its DLA is approximate: `dla_exact_path` says which); the clean run's attention from the
decision token to the note positions and from p1 to the field, per head.
Pass 2, per included pair (the readout fixed): for k in KS the top-k heads by single recovery patched jointly,
ranked in-sample and cross-fitted (mean single recovery over the included pairs of every other domain), and
`n_null` (read) / `n_null_write` (write sweeps) uniformly random joint k-sets of heads: the joint random-k null.
"""
from __future__ import annotations

import itertools
import random
import time

import torch
from scipy.stats import spearmanr

from circuits.common import library_backend, pair_notes, patched_logits
from kvnotes.engine import unembed
from kvnotes.heads import HeadSet
from kvnotes.interventions import Capture, norms_block_outputs
from kvnotes.stats import MIN_NULL_DRAWS, null_of_mean, summarize
from probes.base import ProbeSpec
from probes.common import Split, boot_args, included_rows, margins, pair_row, readout_key

CONTRACT = ProbeSpec(
    name="heads", paper_refs=("§4.1", "§4.2", "Fig15a", "tab:circuit"),
    options={"batch_size": 64, "n_notes": 4, "n_null": 200, "n_null_write": 20, "null_seed": 0, "backend": "engine"},
    measure_options=("batch_size", "n_notes", "backend"),
    second_pass=True,
    not_reanalysable="its rows keep recoveries, not the candidate-token logits of pass 2's joint sets")
SWEEPS = ("read", "write1", "writeN")
KS = (1, 2, 3, 5, 8, 12, 20)
JACCARD_K = 8


def _clean_z(lm, pair, backend: str = "engine"):
    """(the capture backend, {layer: z [S, H, d_head]} of the clean (new-value) prompt)."""
    nns = library_backend(lm, backend)
    acts = nns.run(pair.new_ids, captures=[Capture("z", li) for li in range(nns.n_layers)]).acts
    return nns, {c.layer: z for c, z in acts.items()}


def _positions(sweep: str, dpos: int, notes: list) -> list:
    return [dpos] if sweep == "read" else notes[:1] if sweep == "write1" else sorted(notes)


def _sets(heads, positions, z) -> list:
    return [HeadSet.of([(li, h, p, z[li][p, h]) for li, h in hs for p in positions]) for hs in heads]


def _dla(lm, nns, pair, z_clean, token_ids) -> tuple[torch.Tensor | None, bool | None]:
    """[L * H, n_tokens]: each head's direct logit attribution at the decision token, clean minus corrupt; and
    whether the path is exact (no norm after W_O). (None, None) on a remote model (model.remote=true): its weights
    and the gradient through its final norm are not here."""
    if lm.spec.get("remote") is True:
        return None, None
    model, d, L = lm.model, pair.dpos, nns.n_layers
    run = nns.run(pair.old_ids, captures=[Capture("z", li) for li in range(L)] + [Capture("resid_post", L - 1)])
    r = run.acts[Capture("resid_post", L - 1)][d].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = unembed(model, model.get_decoder().norm(r[None].to(model.dtype)), token_ids)[0]
        grads = torch.stack([torch.autograd.grad(logits[i], r, retain_graph=True)[0] for i in range(len(token_ids))])
    H, dh = nns.n_heads, nns.d_head
    out = torch.empty(L * H, len(token_ids))
    for li in range(L):
        w_o = model.get_decoder().layers[li].self_attn.o_proj.weight.detach().float()     # [D, H * d_head]
        dz = z_clean[li][d] - run.acts[Capture("z", li)][d]                               # [H, d_head]
        contrib = torch.einsum("dhk,hk->hd", w_o.view(-1, H, dh), dz)                   # [H, D]
        out[li * H:(li + 1) * H] = contrib @ grads.T.float()
    return out, not norms_block_outputs(model.get_decoder().layers[0])   # a norm after W_O: DLA approximate


def measure(lm, pair, token_ids, batch_size: int = 64, n_notes: int = 4, backend: str = "engine") -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    states, notes, splice_rows, notes_readout = pair_notes(lm, pair, token_ids, n_notes, backend)
    a, b = pair.span
    d = pair.dpos
    nns, z = _clean_z(lm, pair, backend)
    L, H = nns.n_layers, nns.n_heads
    heads = [((li, h),) for li in range(L) for h in range(H)]
    rows = {}
    for sweep in SWEEPS:
        pos = _positions(sweep, d, notes)
        rows[sweep] = patched_logits(lm, pair.old_ids, min(pos), _sets(heads, pos, z), token_ids, backend,
                                     batch_size).tolist()
    dla, exact = _dla(lm, nns, pair, z, token_ids)
    attn_notes = attn_field = None
    if lm.spec.get("remote") is not True:   # probabilities need eager attention, which a hosted model may not run
        pat = nns.run(pair.new_ids, captures=[Capture("pattern", li) for li in range(L)]).acts
        attn_notes = torch.stack([pat[Capture("pattern", li)][:, d, notes].sum(-1) for li in range(L)]).flatten()
        attn_field = torch.stack([pat[Capture("pattern", li)][:, notes[0], a:b].sum(-1) for li in range(L)]).flatten()
    return {"states": states, "token_ids": token_ids, "n_layers": L, "n_heads": H, "down": list(range(b, d)),
            "splice_rows": splice_rows, "notes": notes, "notes_readout": notes_readout,
            **{f"rows_{k}": v for k, v in rows.items()}, "dla": None if dla is None else dla.tolist(),
            "dla_exact_path": exact,
            "attn_decision_to_notes": None if attn_notes is None else attn_notes.tolist(),   # [L * H]
            "attn_note_to_field": None if attn_field is None else attn_field.tolist(),
            "seconds": round(time.time() - t0, 3)}


# -- planning pass 2 ------------------------------------------------------------------------------------------------
def _single(raw, ro, row, sweep) -> list:
    """Recovery of every single-head patch of `sweep` (head index l * H + h)."""
    return ((margins(raw, ro, f"rows_{sweep}") - row["m_stale"]) / row["delta_m"]).tolist()


def _order(scores: list) -> list[int]:
    """Head indices by descending score (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def plan_second(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, probe_cfg: dict) -> dict:
    """Per included pair and sweep: the in-sample and cross-fitted top-k head sets and the random joint k-sets."""
    seed = int(probe_cfg.get("null_seed", 0))
    scenario_of = {inst.id: inst.scenario for inst in instances}
    single, include = {}, {}
    for inst in instances:
        row, include[inst.id] = included_rows([inst], pairs_info, raws, readouts, exclusion)[inst.id]
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        if include[inst.id]:
            single[inst.id] = {s: _single(raw, ro, row, s) for s in SWEEPS}
    plans = {}
    for inst in instances:
        if not include[inst.id]:
            plans[inst.id] = {"included_at_plan": False}
            continue
        n_heads = len(single[inst.id]["read"])
        rng = random.Random(f"heads-null:{seed}:{inst.id}")
        plan = {"included_at_plan": True, "notes": raws[inst.id]["notes"], "sets": {}}
        for sweep in SWEEPS:
            own = _order(single[inst.id][sweep])
            others = [j for j in single if scenario_of[j] != inst.scenario]
            n_null = int(probe_cfg.get("n_null" if sweep == "read" else "n_null_write"))
            sets = {"in": {str(k): own[:k] for k in KS if k <= n_heads}}
            if sweep == "read":         # sanity: every head at the decision token is the clean decision (= 1)
                sets["in"]["all"] = list(range(n_heads))
            if others:
                mean = [sum(single[j][sweep][i] for j in others) / len(others) for i in range(n_heads)]
                cf = _order(mean)
                sets["cf"] = {str(k): cf[:k] for k in KS if k <= n_heads}
                sets["cf_scenarios"] = sorted({scenario_of[j] for j in others})
            sets["null"] = {str(k): [sorted(rng.sample(range(n_heads), k)) for _ in range(n_null)]
                            for k in KS if 1 < k < n_heads}
            plan["sets"][sweep] = sets
        plans[inst.id] = plan
    return plans


# -- pass 2 -----------------------------------------------------------------------------------------------------------
def measure_second(lm, pair, token_ids, plan: dict, batch_size: int = 64, n_notes: int = 4,
                   backend: str = "engine") -> dict:
    """Candidate-token logits of every planned joint head set (unique sets patched once per sweep)."""
    t0 = time.time()
    if not plan.get("included_at_plan"):
        return {"sweeps": {}, "seconds": 0.0}
    token_ids = sorted(set(int(t) for t in token_ids))
    nns, z = _clean_z(lm, pair, backend)
    H = nns.n_heads
    notes = plan["notes"]
    out = {}
    for sweep, sets in plan["sets"].items():
        unique = sorted({tuple(s) for kind in ("in", "cf") for s in sets.get(kind, {}).values()}
                        | {tuple(s) for draws in sets["null"].values() for s in draws})
        pos = _positions(sweep, pair.dpos, notes)
        heads = [tuple((i // H, i % H) for i in s) for s in unique]
        out[sweep] = {"sets": [list(s) for s in unique],
                      "rows": patched_logits(lm, pair.old_ids, min(pos), _sets(heads, pos, z), token_ids, backend,
                                             batch_size).tolist()}
    return {"token_ids": token_ids, "sweeps": out, "seconds": round(time.time() - t0, 3)}


# -- analysis ---------------------------------------------------------------------------------------------------------
def _jaccard(x, y) -> float:
    x, y = set(x), set(y)
    return len(x & y) / len(x | y) if x | y else 1.0


def _name(i: int, n_heads: int) -> str:
    return f"{i // n_heads}.{i % n_heads}"


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair single-head recoveries, DLA, attention and joint top-k curves; cluster summaries and nulls.

    Aggregates per sweep (read / write1 / writeN), over included pairs, clustered by scenario (domain):
    * heads_ranked: the 15 heads of highest mean single recovery, each with its clustered CI, n, the mean DLA
      (read) and the mean attention to the notes (read: decision token -> note positions; writes: p1 -> field);
    * cum_in / cum_cf: recovery of jointly patching the top-k heads ranked in-sample / on the other domains' pairs;
    * null: `kvnotes.stats.null_of_mean` over each pair's random joint k-sets (k >= 2; B = max(2000, n_boot)
      null means), with one-sided p-values of cum_in and cum_cf against it; at k = 1 the null is exhaustive: the
      pair's mean single recovery over every head;
    * stability: mean pairwise Jaccard of the pairs' in-sample top-8 sets, and in how many pairs each of the pooled
      top-8 heads is in the pair's own top 8;
    * read only: dla_vs_exact, the per-pair Spearman correlation of DLA and exact single recovery over all heads,
      and the Jaccard of their top-8 sets.
    """
    split = Split(exclusion)
    n_heads = None
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        n_heads = raw["n_heads"]
        row.update({"notes": raw["notes"], "notes_readout_agrees": raw["notes_readout"] == [ro.safe_id, ro.unsafe_id],
                    "n_layers": raw["n_layers"], "n_heads": raw["n_heads"], "dla_exact_path": raw["dla_exact_path"]})
        if row["delta_m"]:
            idx = {t: i for i, t in enumerate(raw["token_ids"])}
            if raw["dla"] is not None:
                dla = torch.tensor(raw["dla"], dtype=torch.float64)
                row["dla_read"] = ((dla[:, idx[ro.safe_id]] - dla[:, idx[ro.unsafe_id]]) / row["delta_m"]).tolist()
            row["attn_read"] = raw["attn_decision_to_notes"]
            row["attn_write"] = raw["attn_note_to_field"]
            for sweep in SWEEPS:
                row[f"single_{sweep}"] = _single(raw, ro, row, sweep)
            second = raw.get("second", {}).get("sweeps", {})
            for sweep, sec in second.items():
                rec = (margins({**sec, "token_ids": raw["second"]["token_ids"]}, ro) - row["m_stale"]) / row["delta_m"]
                of = {tuple(s): float(r) for s, r in zip(sec["sets"], rec)}
                sets = raw["plan"]["sets"][sweep]
                row[f"cum_{sweep}"] = {kind: {k: of[tuple(s)] for k, s in sets[kind].items()}
                                       for kind in ("in", "cf") if kind in sets}
                row[f"null_{sweep}"] = {k: [of[tuple(d)] for d in draws] for k, draws in sets["null"].items()}
                row[f"null_{sweep}"]["1"] = row[f"single_{sweep}"]          # k = 1: every head, exhaustively
            if "plan" in raw and raw["plan"].get("included_at_plan"):  # the sets, without the null draws' members
                row["plan"] = {"notes": raw["plan"]["notes"],
                               "sets": {sw: {k: v for k, v in sets.items() if k != "null"}
                                        for sw, sets in raw["plan"]["sets"].items()}}
        split.add(inst, row)

    inc, boot = split.included, boot_args(stats)
    clusters = split.clusters
    n_means = max(MIN_NULL_DRAWS, int(stats["n_boot"]))
    agg = {}
    for si, sweep in enumerate(SWEEPS):
        rows = [r for r in inc if f"single_{sweep}" in r]
        if not rows:
            continue
        cl = [r["scenario"] for r in rows]
        a = {}
        per_head = torch.tensor([r[f"single_{sweep}"] for r in rows], dtype=torch.float64)      # [n, L * H]
        order = torch.argsort(-per_head.mean(0), stable=True).tolist()
        attn_key = "attn_read" if sweep == "read" else "attn_write"
        ranked = []
        for i in order[:15]:
            e = {"head": _name(i, n_heads), **summarize(per_head[:, i].tolist(), cl, **boot),
                 "attn_mean": (sum(r[attn_key][i] for r in rows) / len(rows)
                               if all(r[attn_key] is not None for r in rows) else None)}
            if sweep == "read" and all("dla_read" in r for r in rows):
                e["dla_mean"] = sum(r["dla_read"][i] for r in rows) / len(rows)
            ranked.append(e)
        a["heads_ranked"] = ranked
        for kind in ("in", "cf"):
            a[f"cum_{kind}"] = {}
            for k in map(str, KS):
                vals = [(r[f"cum_{sweep}"][kind][k], r["scenario"]) for r in rows
                        if kind in r.get(f"cum_{sweep}", {}) and k in r[f"cum_{sweep}"][kind]]
                if vals:
                    a[f"cum_{kind}"][k] = summarize([v for v, _ in vals], [c for _, c in vals], **boot)
        a["null"] = {}
        for ki, k in enumerate(map(str, KS)):
            with_null = [r for r in rows if k in r.get(f"null_{sweep}", {})]
            if not with_null:
                continue
            observed = {kind: [r[f"cum_{sweep}"][kind][k] for r in with_null] for kind in ("in", "cf")
                        if all(k in r[f"cum_{sweep}"].get(kind, {}) for r in with_null)}
            a["null"][k] = null_of_mean([r[f"null_{sweep}"][k] for r in with_null], observed, alpha=stats["alpha"],
                                        n_means=n_means, seed=[int(stats["seed"]), si, ki])
        tops = [set(_order(r[f"single_{sweep}"])[:JACCARD_K]) for r in rows]
        pairs = list(itertools.combinations(range(len(tops)), 2))
        pooled = order[:JACCARD_K]
        a["stability"] = {"k": JACCARD_K,
                          "mean_pairwise_jaccard": (sum(_jaccard(tops[i], tops[j]) for i, j in pairs) / len(pairs)
                                                    if pairs else None),
                          "n_pairs": len(rows),
                          "pooled_top_in_pair_top": {_name(i, n_heads): sum(i in t for t in tops) for i in pooled}}
        if sweep == "read" and not all("dla_read" in r for r in rows):
            a["dla_vs_exact"] = {"not_computed": "a remote model (model.remote=true): no local weights for DLA"}
        elif sweep == "read":
            rho = [float(spearmanr(r["dla_read"], r["single_read"]).statistic) for r in rows]
            jac = [_jaccard(_order(r["dla_read"])[:JACCARD_K], _order(r["single_read"])[:JACCARD_K]) for r in rows]
            a["dla_vs_exact"] = {"spearman": summarize(rho, cl, **boot), f"top{JACCARD_K}_jaccard":
                                 summarize(jac, cl, **boot), "exact_path": all(r["dla_exact_path"] for r in rows)}
        agg[sweep] = a
    agg["notes_readout_agrees"] = sum(r["notes_readout_agrees"] for r in inc)
    if any(r.get("attn_read", ()) is None for r in inc):
        agg["attention_not_computed"] = ("a remote model (model.remote=true): attention probabilities need eager "
                                         "attention, which the hosted model need not run")
    sanity = {"note": "true by construction (a check of the patching, not a finding): patching every head's z at the "
                      "decision token gives the clean decision, recovery 1 (the MLPs recompute from the patched "
                      "residual). k = 1 nulls are exhaustive (every head's single patch); the joint random-k nulls for "
                      "k >= 2 are drawn uniformly over all heads, per pair, seeded",
              "read_all_heads_recovery": [r["cum_read"]["in"]["all"] for r in split.rows
                                          if "all" in r.get("cum_read", {}).get("in", {})]}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("head recoveries"), ks=list(KS), clusters=len(set(clusters)))}
