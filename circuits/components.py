"""Attention vs MLP write attribution at the note position (paper_spec §4.3; Fig. 15c, tab:circuit "attn share").

At the top-1 note position p1 (circuits.common.note_positions) the clean (new-value) and corrupt (old-value) runs
differ in the residual stream. For a readout layer T, δ_T = r_clean[T] - r_corrupt[T] (the residual after decoder
layer T) and d = δ_T / |δ_T|. Because r[T] = e + Σ_{l <= T} (attn_out_l + mlp_out_l) (e = the residual entering
layer 0; attn_out / mlp_out = what each block adds, after Gemma-3's post-norms: kvnotes.interventions' sites),

    |δ_T| = Δe·d + Σ_{l <= T} (Δattn_out_l·d + Δmlp_out_l·d)

exactly, on every architecture; the record keeps the identity's residual error per pair (`decomposition_error`,
in units of |δ_T|) rather than assuming it, and Δe·d (zero at a downstream position, whose token is the same in both
prompts). attn_share = Σ Δattn·d / |δ_T|, mlp_share likewise; write_depth_p50 / p90: the normalised layer index
(l / (L - 1)) where the cumulative share first reaches 50 % / 90 %. Readout layers: round(f (L - 1)) for f in
`readout_fracs` (the paper took "the causal conclusion layer" by hand per model; §8 asks for a fixed rule).
"""
from __future__ import annotations

import time

import torch

from circuits.common import library_backend, pair_notes
from kvnotes.interventions import Capture
from kvnotes.stats import summarize
from probes.base import ProbeSpec
from probes.common import Split, band, boot_args, pair_row, readout_key

CONTRACT = ProbeSpec(
    name="components", paper_refs=("§4.3", "Fig15c", "tab:circuit"),
    options={"readout_fracs": [0.33, 0.5, 0.67, 1.0], "backend": "engine"},
    measure_options=("readout_fracs", "backend"),
    not_reanalysable="its rows keep the per-layer projections, not the residual differences they project")
SITES = ("attn_out", "mlp_out", "resid_post")


def readout_layers(fracs, n_layers: int) -> list[int]:
    """round(f (L - 1)) for each fraction f in (0, 1], deduplicated, in order; ValueError for a fraction outside."""
    bad = [f for f in fracs if not 0 < float(f) <= 1]
    if bad:
        raise ValueError(f"readout_fracs must lie in (0, 1]; got {bad}")
    return sorted({round(float(f) * (n_layers - 1)) for f in fracs})


def decompose(clean: dict, corrupt: dict, p: int, T: int) -> dict:
    """The attribution of δ_T at position p from two runs' captures ({Capture: tensor [S, D]} of attn_out, mlp_out
    and resid_post at every layer <= T): per-layer projections a_l, m_l on d = δ_T/|δ_T|, the embedding term, and
    the identity's error, all in units of |δ_T|."""
    def get(acts, site, li):
        return acts[Capture(site, li)][p].double()

    delta = get(clean, "resid_post", T) - get(corrupt, "resid_post", T)
    norm = float(delta.norm())
    if norm == 0.0:
        return {"norm": 0.0}
    d = delta / norm
    a = [float((get(clean, "attn_out", li) - get(corrupt, "attn_out", li)) @ d) / norm for li in range(T + 1)]
    m = [float((get(clean, "mlp_out", li) - get(corrupt, "mlp_out", li)) @ d) / norm for li in range(T + 1)]
    embed = [get(acts, "resid_post", 0) - get(acts, "attn_out", 0) - get(acts, "mlp_out", 0)
             for acts in (clean, corrupt)]
    e = float((embed[0] - embed[1]) @ d) / norm
    return {"norm": norm, "attn": a, "mlp": m, "embed": e, "decomposition_error": abs(e + sum(a) + sum(m) - 1.0)}


def measure(lm, pair, token_ids, readout_fracs=(0.33, 0.5, 0.67, 1.0), backend: str = "engine") -> dict:
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    states, notes, _, notes_readout = pair_notes(lm, pair, token_ids, 1, backend)
    nns = library_backend(lm, backend)
    L = nns.n_layers
    ts = readout_layers(readout_fracs, L)
    caps = [Capture(s, li) for s in SITES for li in range(L)]
    clean, corrupt = nns.run(pair.new_ids, captures=caps).acts, nns.run(pair.old_ids, captures=caps).acts
    return {"states": states, "token_ids": token_ids, "n_layers": L, "note": notes[0], "notes_readout": notes_readout,
            "readout_layers": ts, "by_T": {str(T): decompose(clean, corrupt, notes[0], T) for T in ts},
            "seconds": round(time.time() - t0, 3)}


def _depth(parts: list, q: float) -> float | None:
    """Normalised layer index where the cumulative attention + MLP share first reaches q (None if it never does)."""
    cum, n = 0.0, len(parts)
    for li, x in enumerate(parts):
        cum += x
        if cum >= q:
            return li / max(n - 1, 1)
    return None


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per readout layer T over included pairs, clustered by scenario: attn_share, mlp_share, embed_share, the write
    depths, per-layer mean shares and the early / mid / late band shares of the attention + MLP total."""
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row.update({"note": raw["note"], "notes_readout_agrees": raw["notes_readout"] == [ro.safe_id, ro.unsafe_id],
                    "n_layers": raw["n_layers"], "by_T": {}})
        for T, dec in raw["by_T"].items():
            if not dec["norm"]:
                row["by_T"][T] = {"norm": 0.0}
                continue
            parts = [x + y for x, y in zip(dec["attn"], dec["mlp"])]
            row["by_T"][T] = {"norm": dec["norm"], "attn_share": sum(dec["attn"]), "mlp_share": sum(dec["mlp"]),
                              "embed_share": dec["embed"], "decomposition_error": dec["decomposition_error"],
                              "write_depth_p50": _depth(parts, 0.5), "write_depth_p90": _depth(parts, 0.9),
                              "attn": dec["attn"], "mlp": dec["mlp"]}
        split.add(inst, row)
    inc, boot = split.included, boot_args(stats)
    agg = {}
    for T in (raws[next(iter(raws))]["by_T"] if raws else {}):
        rows = [r for r in inc if r["by_T"].get(T, {}).get("norm")]
        if not rows:
            continue
        cl = [r["scenario"] for r in rows]
        n_layers = rows[0]["n_layers"]
        a = {key: summarize([r["by_T"][T][key] for r in rows], cl, **boot)
             for key in ("attn_share", "mlp_share", "embed_share")}
        for q in ("p50", "p90"):
            vals = [(r["by_T"][T][f"write_depth_{q}"], r["scenario"]) for r in rows
                    if r["by_T"][T][f"write_depth_{q}"] is not None]
            a[f"write_depth_{q}"] = summarize([v for v, _ in vals], [c for _, c in vals], **boot)
        n_t = int(T) + 1
        a["attn_per_layer"] = [sum(r["by_T"][T]["attn"][li] for r in rows) / len(rows) for li in range(n_t)]
        a["mlp_per_layer"] = [sum(r["by_T"][T]["mlp"][li] for r in rows) / len(rows) for li in range(n_t)]
        a["band_share"] = {b: {k: sum(a[f"{k}_per_layer"][li] for li in range(n_t) if band(li, n_layers) == b)
                               for k in ("attn", "mlp")} for b in ("early", "mid", "late")}
        a["relative_depth"] = int(T) / max(n_layers - 1, 1)
        agg[T] = a
    errors = [r["by_T"][T]["decomposition_error"] for r in split.rows for T in r["by_T"] if r["by_T"][T].get("norm")]
    sanity = {"note": "the decomposition is an identity (the parts sum to |δ_T| on every architecture, Gemma-3's "
                      "post-norms included): decomposition_error_max is its numerical error in units of |δ_T|",
              "decomposition_error_max": max(errors) if errors else None,
              "notes_readout_agrees": sum(r["notes_readout_agrees"] for r in inc)}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("attributions"))}
