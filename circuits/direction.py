"""Difference-of-means conclusion direction at the note positions (paper_spec §4.4; Fig. 15b, tab:circuit "dir"),
fitted leave-one-domain-out, tested for sufficiency and necessity against norm-matched random directions (§8 W20:
the paper's control was one random direction, not norm-matched).

Pass 1, per pair: the top-`n_notes` note positions (circuits.common.note_positions) and the residual stream after
each readout layer L (round(f (n_layers - 1)), f in `layer_fracs`) at those positions, in the clean (new-value) and
the corrupt (old-value) run. Each (run, position) is one sample labelled by the conclusion its prompt implies (safe
or not): every pair gives both labels, so the pool is balanced by construction.

Plan (the readouts and every pair's pass 1 known): for each included pair, directions fitted on the included pairs of
every OTHER domain, per layer: d_dm = normalise(mean(safe) - mean(unsafe)) and d_probe = the logistic-regression
direction (scikit-learn, standardised features, C = 1, coefficients divided by the feature scale, normalised).

Pass 2, per included pair and layer L, with Δ_p = r_clean - r_corrupt at each note position p (added after layer L
at every note position of the corrupt run, everything after the first note recomputed: kvnotes.heads):
* sufficiency: full Δ; along (Δ·d) d; orth Δ - (Δ·d) d; for d_dm and d_probe; and `n_random` random unit
  directions r, each added as |Δ_p·d_dm| sign(Δ_p·r) r: the same norm as the DoM component at every position,
  pointing the helpful way along r (norm-matched);
* necessity: on the clean run, -(r_clean·d) d added (the direction projected out) for d_dm, d_probe and
  `n_random_necessity` random unit directions.
Recovery = (m - m_corrupt) / (m_clean - m_corrupt); necessity drop = (m_clean - m) / (m_clean - m_corrupt). Random
directions are drawn in pass 2 from a seed per (pair, layer) that the plan records.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from circuits.common import library_backend, pair_notes, patched_logits
from kvnotes.heads import HeadSet
from kvnotes.interventions import Capture
from kvnotes.stats import MIN_NULL_DRAWS, null_of_mean, summarize
from probes.base import ProbeSpec
from probes.common import Split, boot_args, included_rows, margins, pair_row, readout_key

CONTRACT = ProbeSpec(
    name="direction", paper_refs=("§4.4", "Fig15b", "tab:circuit"),
    options={"batch_size": 32, "n_notes": 8, "layer_fracs": [0.33, 0.5, 0.67, 0.83], "n_random": 50,
             "n_random_necessity": 25, "seed": 0, "backend": "engine"},
    measure_options=("batch_size", "n_notes", "layer_fracs", "backend"),
    second_pass=True,
    not_reanalysable="its rows keep recoveries, not pass 2's candidate logits nor pass 1's residuals")
KINDS = ("full", "along_dm", "orth_dm", "along_probe", "orth_probe")


def layers_of(fracs, n_layers: int) -> list[int]:
    bad = [f for f in fracs if not 0 < float(f) <= 1]
    if bad:
        raise ValueError(f"layer_fracs must lie in (0, 1]; got {bad}")
    return sorted({round(float(f) * (n_layers - 1)) for f in fracs})


def _resid(lm, pair, layers, notes, backend: str = "engine") -> tuple[dict, dict]:
    """{layer: [n_notes, D]} residuals after each layer at the note positions, clean and corrupt."""
    nns = library_backend(lm, backend)
    caps = [Capture("resid_post", li) for li in layers]
    out = []
    for ids in (pair.new_ids, pair.old_ids):
        acts = nns.run(ids, captures=caps).acts
        out.append({c.layer: acts[c][notes] for c in caps})
    return out[0], out[1]


def measure(lm, pair, token_ids, batch_size: int = 32, n_notes: int = 8,
            layer_fracs=(0.33, 0.5, 0.67, 0.83), backend: str = "engine") -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    states, notes, _, notes_readout = pair_notes(lm, pair, token_ids, n_notes, backend)
    layers = layers_of(layer_fracs, lm.model.config.num_hidden_layers)
    clean, corrupt = _resid(lm, pair, layers, notes, backend)
    return {"states": states, "token_ids": token_ids, "notes": notes, "notes_readout": notes_readout,
            "layers": layers, "resid_clean": {str(li): clean[li].tolist() for li in layers},
            "resid_corrupt": {str(li): corrupt[li].tolist() for li in layers}, "seconds": round(time.time() - t0, 3)}


def fit_directions(X: np.ndarray, y: np.ndarray) -> dict:
    """Unit directions from samples X [n, D] with binary labels y [n]: "dm", the difference of the class means
    (1 minus 0), and "probe", a logistic regression's weight vector in the original feature units (scikit-learn on
    standardised features, C = 1). ValueError unless both classes are present."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    if len(set(y.tolist())) != 2:
        raise ValueError("fit_directions needs samples of both conclusions")
    dm = X[y == 1].mean(0) - X[y == 0].mean(0)
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X), y)
    w = clf.coef_[0] / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return {"dm": dm / np.linalg.norm(dm), "probe": w / np.linalg.norm(w)}


def plan_second(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, probe_cfg: dict) -> dict:
    """Per included pair: per layer the DoM and probe directions fitted on the other domains' included pairs, and
    the seed of its random directions."""
    seed = int(probe_cfg.get("seed", 0))
    include = {k: inc for k, (_, inc) in included_rows(instances, pairs_info, raws, readouts, exclusion).items()}
    label = {inst.id: (int(inst.expected_new == inst.safe), int(inst.expected_old == inst.safe)) for inst in instances}
    scenario_of = {inst.id: inst.scenario for inst in instances}
    plans = {}
    for inst in instances:
        if not include[inst.id]:
            plans[inst.id] = {"included_at_plan": False}
            continue
        train = [j for j in include if include[j] and scenario_of[j] != inst.scenario]
        plan = {"included_at_plan": True, "notes": raws[inst.id]["notes"], "train_pairs": len(train),
                "train_scenarios": sorted({scenario_of[j] for j in train}), "directions": {}}
        for li in raws[inst.id]["layers"]:
            X, y = [], []
            for j in train:
                for key, lab in (("resid_clean", label[j][0]), ("resid_corrupt", label[j][1])):
                    X += raws[j][key][str(li)]
                    y += [lab] * len(raws[j][key][str(li)])
            if len(set(y)) < 2:
                continue
            dirs = fit_directions(np.asarray(X, dtype=np.float64), np.asarray(y))
            plan["directions"][str(li)] = {k: v.tolist() for k, v in dirs.items()}
        plan.update({"random_seed": f"direction:{seed}:{inst.id}", "n_random": int(probe_cfg["n_random"]),
                     "n_random_necessity": int(probe_cfg["n_random_necessity"])})
        plans[inst.id] = plan
    return plans


def _random_dirs(seed: str, layer: int, n: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(f"{seed}:{layer}".encode(), "little") % (2 ** 63))
    r = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return r / r.norm(dim=1, keepdim=True)


def measure_second(lm, pair, token_ids, plan: dict, batch_size: int = 32, n_notes: int = 8,
                   layer_fracs=None, backend: str = "engine") -> dict:
    t0 = time.time()
    if not plan.get("included_at_plan") or not plan["directions"]:
        return {"layers": {}, "seconds": 0.0}
    n_random, n_random_necessity = plan["n_random"], plan["n_random_necessity"]
    token_ids = sorted(set(int(t) for t in token_ids))
    notes = plan["notes"]
    layers = [int(li) for li in plan["directions"]]
    clean, corrupt = _resid(lm, pair, layers, notes, backend)
    start = min(notes)
    out = {}
    for li in layers:
        rc, rx = clean[li].double(), corrupt[li].double()
        delta = rc - rx                                                        # [n_notes, D]
        dirs = {k: torch.tensor(v, dtype=torch.float64) for k, v in plan["directions"][str(li)].items()}

        def adds(vectors):
            return HeadSet.of([], [(li, p, v.float()) for p, v in zip(notes, vectors)])

        suff = {"full": adds(delta)}
        for k in ("dm", "probe"):
            along = (delta @ dirs[k])[:, None] * dirs[k]
            suff[f"along_{k}"], suff[f"orth_{k}"] = adds(along), adds(delta - along)
        rand = _random_dirs(plan["random_seed"], li, max(n_random, n_random_necessity), delta.shape[1])
        size = (delta @ dirs["dm"]).abs()                                     # the DoM component's norm per note
        rand_suff = [adds((size * torch.sign(delta @ r))[:, None] * r) for r in rand[:n_random]]
        nec = {k: adds(-(rc @ dirs[k])[:, None] * dirs[k]) for k in ("dm", "probe")}
        rand_nec = [adds(-(rc @ r)[:, None] * r) for r in rand[:n_random_necessity]]
        rows_x = patched_logits(lm, pair.old_ids, start, list(suff.values()) + rand_suff, token_ids, backend,
                                batch_size)
        rows_c = patched_logits(lm, pair.new_ids, start, list(nec.values()) + rand_nec, token_ids, backend,
                                batch_size)
        out[str(li)] = {"sufficiency": dict(zip(suff, rows_x[:len(suff)].tolist())),
                        "random": rows_x[len(suff):].tolist(),
                        "necessity": dict(zip(nec, rows_c[:len(nec)].tolist())),
                        "random_necessity": rows_c[len(nec):].tolist(),
                        "cos_dm_probe": float(dirs["dm"] @ dirs["probe"]),
                        "dm_component_norm": size.tolist()}
    return {"token_ids": token_ids, "layers": out, "seconds": round(time.time() - t0, 3)}


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per layer over included pairs (clustered by scenario): sufficiency recoveries (full, along / orth of each
    direction) and necessity drops, each direction's against its norm-matched random null (null_of_mean, B = max(2000,
    n_boot); one-sided p that the direction beats random), the DoM-probe cosine, and the held-out separation of
    the conclusions by the DoM direction (AUC over the pair's clean and corrupt samples at the notes)."""
    from sklearn.metrics import roc_auc_score
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row.update({"notes": raw["notes"], "notes_readout_agrees": raw["notes_readout"] == [ro.safe_id, ro.unsafe_id],
                    "layers": {}})
        second = raw.get("second", {}).get("layers", {})
        if row["delta_m"] and second:
            tok = raw["second"]["token_ids"]

            def m(rows):
                return margins({"rows": rows, "token_ids": tok}, ro)

            for li, sec in second.items():
                rec = lambda rows: ((m(rows) - row["m_stale"]) / row["delta_m"]).tolist()   # noqa: E731
                drop = lambda rows: ((row["m_oracle"] - m(rows)) / row["delta_m"]).tolist()  # noqa: E731
                kinds = list(sec["sufficiency"])
                suff = dict(zip(kinds, rec([sec["sufficiency"][k] for k in kinds])))
                nk = list(sec["necessity"])
                nec = dict(zip(nk, drop([sec["necessity"][k] for k in nk])))
                d = np.asarray(raw["plan"]["directions"][li]["dm"])
                xs = np.asarray(raw["resid_clean"][li] + raw["resid_corrupt"][li]) @ d
                ys = [int(inst.expected_new == inst.safe)] * len(raw["resid_clean"][li]) + \
                     [int(inst.expected_old == inst.safe)] * len(raw["resid_corrupt"][li])
                row["layers"][li] = {**suff, **{f"necessity_{k}": v for k, v in nec.items()},
                                     "random": rec(sec["random"]) if sec["random"] else [],
                                     "random_necessity": drop(sec["random_necessity"]) if sec["random_necessity"]
                                     else [],
                                     "cos_dm_probe": sec["cos_dm_probe"],
                                     "heldout_auc_dm": float(roc_auc_score(ys, xs)) if len(set(ys)) == 2 else None}
            row["train_scenarios"] = raw["plan"]["train_scenarios"]
        split.add(inst, row)
    inc, boot = split.included, boot_args(stats)
    n_means = max(MIN_NULL_DRAWS, int(stats["n_boot"]))
    agg = {}
    layers = sorted({li for r in inc for li in r["layers"]}, key=int)
    for i, li in enumerate(layers):
        rows = [r for r in inc if li in r["layers"]]
        cl = [r["scenario"] for r in rows]
        a = {k: summarize([r["layers"][li][k] for r in rows], cl, **boot)
             for k in [*KINDS, "necessity_dm", "necessity_probe", "cos_dm_probe"]}
        aucs = [(r["layers"][li]["heldout_auc_dm"], r["scenario"]) for r in rows
                if r["layers"][li]["heldout_auc_dm"] is not None]
        a["heldout_auc_dm"] = summarize([v for v, _ in aucs], [c for _, c in aucs], **boot)
        if all(r["layers"][li]["random"] for r in rows):
            observed = {k: [r["layers"][li][k] for r in rows] for k in ("along_dm", "along_probe")}
            a["random_null"] = null_of_mean([r["layers"][li]["random"] for r in rows], observed,
                                            alpha=stats["alpha"], n_means=n_means, seed=[int(stats["seed"]), i, 0])
        if all(r["layers"][li]["random_necessity"] for r in rows):
            a["random_necessity_null"] = null_of_mean(
                [r["layers"][li]["random_necessity"] for r in rows],
                {k: [r["layers"][li][f"necessity_{k}"] for r in rows] for k in ("dm", "probe")},
                alpha=stats["alpha"], n_means=n_means, seed=[int(stats["seed"]), i, 1])
        agg[li] = a
    sanity = {"note": "full (the whole clean - corrupt difference added at the notes after layer L) is the "
                      "directions' ceiling at that layer, not a test; random directions are norm-matched to the DoM "
                      "component at each note and point the helpful way, so the null is generous to chance"}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("direction tests"), layers=[int(x) for x in layers])}
