"""Step 5 regime map (issue 11): when does a model take notes? Field-only recovery over prompt structure, computed from
the locality records of the sweep and nothing else.

The sweep (`python run.py -m experiment=regime_map ...`) writes one locality record per cell, tagged
`map-<layout>-D<n_filler>-Q<question>-K<n_gates>`; the factors are read back from each record's own config:

  O  layout (its rule order R->F or F->R: scenarios.diverse.LAYOUTS)
  D  unique filler lines between the field and the next block (scenario.params.n_filler, an exact count)
  Q  the question last (after the record) or first
  K  number of gates (1, or several on different fields)

Per cell: flip and correct-flip rates by direction (cluster-aware proportions, kvnotes.stats.summarize_proportion,
from the per-pair frame); field-only, field+newline, downstream-only, K-only, V-only recovery on the included pairs
and on every gated pair with |delta m| >= 0.5 (the record's step-4 aggregates); the field-only new-decision rate.

The regression: per-pair field-only recovery on O x log(1 + D) x Q (+ K when it varies), ordinary least squares
(statsmodels formula API builds the design) with CR2 cluster-robust standard errors by domain and t on each
coefficient's (and each fitted cell mean's) own Imbens-Kolesar df, kvnotes.stats.cluster_robust_ols: a cell that
rests on two or three domains gets few df and a wide interval, where statsmodels' CR1 with G - 1 df (kept beside it
as se_cr1) gave a D = 48 cell of 2 pairs a CI 0.003 wide. Fitted on the
included pairs and, separately, on every gated pair with |delta m| >= 0.5. A cell without pairs leaves its
interaction unidentified: the fit then drops to the largest nested model whose design has full rank, and says so.
The boundary: per (O, Q, K), the predicted field-only recovery with its CI at each measured D, the smallest D where
the prediction is below 0.2, and the smallest D where its whole CI is.

    python -m figures.regime_map [--results DIR] [--out DIR] [--models a,b] [--scenario diverse_all] [--prefix map-]
    python -m figures.regime_map --pilot      # the pilot's per-layout flip rates (records tagged pilot-<layout>)

Writes results/regime_map/<scenario>-<prefix stem>.json (the analysis record: cells, regression, boundary, the
records it read with their git shas) and figures/regime_map[_<scenario>].{png,pdf,csv,md,tex}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from figures.make_figures import DEFAULT_OUT, DEFAULT_RESULTS, INK, STYLE, WONG, write_table  # noqa: E402
from kvnotes.records import (RecordError, find_records, load_aggregates, load_frame, read_record,  # noqa: E402
                             repo_relative, split_record_name, write_json_atomic)
from kvnotes.stats import cluster_robust_ols, summarize_proportion  # noqa: E402

BOUNDARY = 0.2           # "field-only below 0.2": the threshold for "the notes carry the decision"
RELAXED = "abs_delta_m_ge_0.5"
RECOVERIES = {"field_only": "field_only_recovery", "field_line": "field_line_recovery",
              "downstream_only": "downstream_only_recovery", "field_k_only": "field_k_only_recovery",
              "field_v_only": "field_v_only_recovery"}
DIRECTIONS = ("allow->refuse", "refuse->allow")


class RegimeMapError(RecordError):
    pass


def cell_factors(rec: dict, path: Path, exact_d: bool = True) -> dict:
    """O / D / Q / K of one cell, from the record's scenario params. A D given as a range [lo, hi] must be exact for
    a map cell (RegimeMapError otherwise); with exact_d=False (the pilot) it is kept as the string "lo-hi"."""
    from scenarios.diverse import LAYOUTS
    params = rec["config"]["scenario"]["params"]
    layout = params.get("layout") or "rule_first"
    d = params.get("n_filler")
    if isinstance(d, list):
        if len(d) != 2:
            raise RegimeMapError(f"{path}: n_filler {d} is neither a count nor a range [lo, hi]")
        if d[0] != d[1] and exact_d:
            raise RegimeMapError(f"{path}: n_filler {d} is a range; a map cell needs an exact count")
        d = d[0] if d[0] == d[1] else f"{d[0]}-{d[1]}"
    return {"layout": layout, "order": LAYOUTS[layout], "D": d if isinstance(d, str) else int(d),
            "Q": params.get("question", "last"), "K": int(params.get("n_gates", 1))}


def map_records(results: Path, scenario: str, prefix: str, models: list[str] | None = None) -> list[Path]:
    paths = [p for p in find_records(results, probe="locality", model=models, scenario=scenario)
             if (split_record_name(p)[1] or "").startswith(prefix)]
    if not paths:
        raise RegimeMapError(f"no locality records tagged {prefix}* for scenario {scenario!r} under {results} "
                             f"(make them with: python run.py -m experiment=regime_map)")
    return paths


def _summary(agg: pd.DataFrame, metric: str, key: str = "") -> dict:
    hit = agg[(agg["metric"] == metric) & (agg["key"] == key)]
    if hit.empty:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "G": 0}
    r = hit.iloc[0]
    val = lambda x: None if pd.isna(x) else float(x)   # noqa: E731
    return {"mean": val(r["mean"]), "lo": val(r["ci_lo"]), "hi": val(r["ci_hi"]),
            "n": int(r["n"]) if not pd.isna(r["n"]) else 0,
            "G": int(r["n_clusters"]) if not pd.isna(r["n_clusters"]) else 0}


def _pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per gated pair of the frame with its decisions, direction, delta m and field-only recovery."""
    gated = frame[frame["kind"] == "gated"]
    first = gated.drop_duplicates(["path", "instance"]).set_index(["path", "instance"])
    fo = gated[gated["metric"] == "field_only_recovery"].set_index(["path", "instance"])["value"]
    out = first[["model", "domain", "status", "flip", "expected_old", "expected_new", "dec_stale", "dec_oracle",
                 "delta_m"]].copy()
    out["field_only"] = fo.reindex(out.index)
    out["flips"] = out["dec_stale"] != out["dec_oracle"]
    out["correct"] = (out["dec_stale"] == out["expected_old"]) & (out["dec_oracle"] == out["expected_new"])
    return out.reset_index()


def _rate(rows: pd.DataFrame, column: str) -> dict:
    if rows.empty:
        return {"mean": None, "lo": None, "hi": None, "k": 0, "n": 0, "G": 0}
    s = summarize_proportion(rows[column].astype(bool).tolist(), rows["domain"].astype(str).tolist())
    lo, hi = s["ci"] if s["ci"] else (None, None)
    return {"mean": s["mean"], "lo": lo, "hi": hi, "k": s["k"], "n": s["n"], "G": s["n_clusters"]}


def cells(paths: list[Path], exact_d: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(the cell table, the per-pair table with the cell factors, the records read)."""
    rows, pairs, sources = [], [], []
    for path in paths:
        rec = read_record(path)
        f = cell_factors(rec, path, exact_d)
        agg = load_aggregates(path)
        per_pair = _pairs(load_frame(path)).assign(**f)
        pairs.append(per_pair)
        seconds = (rec.get("timing") or {}).get("per_instance_s", {}).values()
        sources.append({"path": repo_relative(path), "git_sha": rec["provenance"].get("git_sha"),
                        "model_s": round(sum(v or 0 for v in seconds), 1), "tag": split_record_name(path)[1], **f})
        row = {"model": rec["model"]["name"], **f, "n_gated": int(rec["summary"]["n_gated"]),
               "n_included": int(rec["summary"]["n_included"]), "n_domains": len({*per_pair["domain"]})}
        for name, col in (("flip", "flips"), ("correct_flip", "correct")):
            row[name] = _rate(per_pair, col)
            for d in DIRECTIONS:
                row[f"{name}/{d}"] = _rate(per_pair[per_pair["flip"] == d], col)
        for name, metric in RECOVERIES.items():
            row[name] = _summary(agg, metric)
            row[f"{name}/{RELAXED}"] = _summary(agg, "slices", f"{RELAXED}/{metric}")
        row["field_only_new_decision"] = _summary(agg, "field_only_new_decision_rate")
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(   # R->F (the contrast) before F->R
        ["model", "order", "layout", "K", "Q", "D"], key=lambda c: c.map({"R->F": 0, "F->R": 1}) if c.name == "order"
        else c, kind="stable")
    return table.reset_index(drop=True), pd.concat(pairs, ignore_index=True), sources


# ---------------------------------------------------------------- the regression and the boundary
FORMULAS = (  # from the full model down: the first whose design has full rank is fitted
    ("O x log1p(D) x Q", "y ~ C(layout, Treatment(ref)) * x * C(Q, Treatment('last'))"),
    ("O x log1p(D) + Q x log1p(D)", "y ~ C(layout, Treatment(ref)) * x + C(Q, Treatment('last')) * x"),
    ("O x log1p(D) + Q", "y ~ C(layout, Treatment(ref)) * x + C(Q, Treatment('last'))"),
    ("O + log1p(D) + Q", "y ~ C(layout, Treatment(ref)) + x + C(Q, Treatment('last'))"),
)


def regression(pairs: pd.DataFrame, which: str = "included") -> dict:
    """Field-only recovery on O x log(1 + D) x Q (+ K) with CR2 errors clustered by domain and t on each
    coefficient's Imbens-Kolesar df (kvnotes.stats.cluster_robust_ols; statsmodels builds the design and gives the
    CR1 SE kept beside it for comparison). which: "included" (the inclusion rule) or RELAXED (every gated pair with
    |delta m| >= 0.5). Returns the model fitted, its formula, n, G, and per coefficient estimate / se / df / t / p /
    ci / se_cr1; or a `not_fitted` reason."""
    import statsmodels.formula.api as smf

    rows = pairs[pairs["status"] == "included"] if which == "included" else pairs[pairs["delta_m"].abs() >= 0.5]
    rows = rows.dropna(subset=["field_only"]).assign(y=lambda r: r["field_only"], x=lambda r: np.log1p(r["D"]))
    domains = rows["domain"].astype(str).tolist()
    G = len(set(domains))
    if len(rows) < 3 or G < 2:
        return {"rows": which, "n": int(len(rows)), "G": G, "not_fitted": "fewer than 3 pairs or 2 domains"}
    ref = "rule_first" if "rule_first" in set(rows["layout"]) else sorted(set(rows["layout"]))[0]
    extra = " + C(K)" if rows["K"].nunique() > 1 else ""
    tried, seen = [], set()
    for name, formula in FORMULAS:
        if rows["Q"].nunique() == 1:   # one question position in the data: Q is not a factor of the fit
            formula = formula.replace(" * C(Q, Treatment('last'))", "").replace(
                " + C(Q, Treatment('last')) * x", "").replace(" + C(Q, Treatment('last'))", "")
            name = name.replace(" x Q", "").replace(" + Q x log1p(D)", "").replace(" + Q", "")
        if formula in seen:
            continue
        seen.add(formula)
        formula = formula.replace("Treatment(ref)", f"Treatment('{ref}')") + extra
        model = smf.ols(formula, data=rows)
        p = model.exog.shape[1]
        if np.linalg.matrix_rank(model.exog) < p or p >= G:
            tried.append(f"{name}: {'rank-deficient design' if p < G else f'{p} coefficients >= {G} domains'}")
            continue
        fit = cluster_robust_ols(model.exog, rows["y"].to_numpy(), domains)
        coefs = {k: {key: fit[key][j] for key in ("se", "df", "t", "p", "ci", "se_cr1")}
                 | {"estimate": fit["params"][j]} for j, k in enumerate(model.exog_names)}
        return {"rows": which, "model": name, "formula": formula, "reference_layout": ref, "n": int(len(rows)),
                "G": G, "se_method": fit["method"] + "; se_cr1: statsmodels' CR1 (comparison only)",
                "coefficients": coefs, "not_identified": tried,
                "_design": (model, rows["y"].to_numpy(), domains)}
    return {"rows": which, "n": int(len(rows)), "G": G, "not_fitted": "; ".join(tried)}


def boundary(reg: dict, pairs: pd.DataFrame, threshold: float = BOUNDARY) -> list[dict]:
    """Per (layout, Q, K) of the data: the fitted field-only recovery with its 95 % CI (CR2, t on the fitted value's
    own Imbens-Kolesar df, so a cell resting on few domains gets a wide interval) at each measured D, the smallest
    measured D whose prediction is below `threshold`, and the smallest whose CI lies wholly below it."""
    if "_design" not in reg:
        return []
    model, y, domains = reg["_design"]
    spec = model.data.model_spec
    ds = sorted(set(pairs["D"]))
    fitted = model.data.frame        # the rows the regression used: a layout none of whose pairs count has no level
    cells = list(fitted.groupby(["layout", "Q", "K"]).groups)
    missing = [c for c in pairs.groupby(["layout", "Q", "K"]).groups if c not in set(cells)]
    grid = pd.DataFrame([{"layout": layout, "Q": q, "K": k, "D": d, "x": np.log1p(d), "y": 0.0}
                         for layout, q, k in cells for d in ds])
    if hasattr(spec, "get_model_matrix"):   # statsmodels' formula engine: formulaic ...
        rows = np.asarray(spec.get_model_matrix(grid))
    else:                                   # ... or patsy (its DesignInfo)
        import patsy
        rows = np.asarray(patsy.build_design_matrices([spec], grid)[0])
    pred = cluster_robust_ols(model.exog, y, domains, contrasts=rows)["contrasts"]   # one fit, every fitted value
    out = []
    for i, (layout, q, k) in enumerate(cells):
        points = [{"D": int(d), "fitted": c["estimate"], "ci": c["ci"], "df": c["df"]}
                  for d, c in zip(ds, pred[i * len(ds):(i + 1) * len(ds)])]
        below = [p["D"] for p in points if p["fitted"] < threshold]
        surely = [p["D"] for p in points if p["ci"][1] < threshold]
        out.append({"layout": layout, "Q": q, "K": int(k), "threshold": threshold, "points": points,
                    "first_D_fitted_below": below[0] if below else None,
                    "first_D_ci_below": surely[0] if surely else None})
    for layout, q, k in missing:
        out.append({"layout": layout, "Q": q, "K": int(k), "threshold": threshold, "points": [],
                    "not_fitted": "no pair of this layout in the regression's rows (none passes its inclusion)"})
    return out


# ---------------------------------------------------------------- outputs
def flat_table(table: pd.DataFrame) -> pd.DataFrame:
    """The cell table with one column per number (for CSV / markdown): counts, the flip and correct-flip rates (any
    direction, then by direction, k/n), and each recovery's mean and CI on the included pairs and on every gated pair
    with |delta m| >= 0.5 (with that subset's n)."""
    cols = {"model": table["model"], "order": table["order"], "layout": table["layout"], "K": table["K"],
            "Q": table["Q"], "D": table["D"], "included": table["n_included"], "gated": table["n_gated"],
            "domains": table["n_domains"]}
    for name in ("flip", "correct_flip", "correct_flip/allow->refuse", "correct_flip/refuse->allow"):
        cols[f"{name} k/n"] = [f"{c['k']}/{c['n']}" for c in table[name]]
    cols[f"n {RELAXED}"] = [c["n"] for c in table[f"field_only/{RELAXED}"]]
    for name in (*RECOVERIES, *(f"{r}/{RELAXED}" for r in RECOVERIES), "field_only_new_decision"):
        cols[name] = [c["mean"] for c in table[name]]
        cols[f"{name} lo"] = [c["lo"] for c in table[name]]
        cols[f"{name} hi"] = [c["hi"] for c in table[name]]
    return pd.DataFrame(cols)


def latex_table(table: pd.DataFrame) -> str:
    """A compact LaTeX table of the cells (names escaped by hand: the headers are LaTeX): counts, correct flips,
    field-only and downstream-only as "mean [lo, hi]" on the included pairs, and field-only on every gated pair with
    |delta m| >= 0.5 with its n. The CSV has every number."""
    def est(c):
        if c["mean"] is None:
            return ""
        return f"{c['mean']:.2f}" + ("" if c["lo"] is None else f" [{c['lo']:.2f}, {c['hi']:.2f}]")

    compact = pd.DataFrame({
        "model": table["model"], "order": table["order"], "layout": table["layout"], "K": table["K"],
        "Q": table["Q"], "D": table["D"],
        "correct flips": [f"{c['k']}/{c['n']}" for c in table["correct_flip"]],
        "included": [f"{i}/{g}" for i, g in zip(table["n_included"], table["n_gated"])],
        "field-only": table["field_only"].map(est), "downstream-only": table["downstream_only"].map(est),
        r"field-only, $|\Delta m| \geq 0.5$": table[f"field_only/{RELAXED}"].map(est),
        r"$n$, $|\Delta m| \geq 0.5$": [c["n"] for c in table[f"field_only/{RELAXED}"]]})
    for col in ("model", "order", "layout", "Q"):          # the only free text: names with _ and the arrow
        compact[col] = compact[col].astype(str).str.replace("_", r"\_").str.replace("->", r"$\to$")
    return compact.to_latex(index=False, escape=False, na_rep="")


YLIM = (-0.5, 1.3)


def phase_figure(table: pd.DataFrame) -> Figure:
    """Field-only recovery per one-gate cell with its CI: on the included pairs (solid, n above) and on every gated
    pair with |delta m| >= 0.5 (dashed, hollow, nudged right, n below); a line joins neighbouring Ds only. Columns =
    layouts (R->F first), rows = Q, one colour per model over D (log(1 + D) axis); the 0.2 boundary dashed grey. The y
    axis spans YLIM (widened to show every mean): an interval beyond it (a cell of 1-3 pairs) is cut there and marked
    with an arrowhead; a model with no included pair in any cell of a layout is named in that panel."""
    import matplotlib as mpl
    layouts = list(dict.fromkeys(table.sort_values(["order"], key=lambda s: s != "R->F", kind="stable")["layout"]))
    qs = [q for q in ("last", "first") if q in set(table["Q"])]
    models = list(dict.fromkeys(table["model"]))
    ds_all = sorted(set(table["D"]))
    colors = [WONG[c] for c in ("blue", "orange", "green", "red", "purple", "sky")]
    means = [c["mean"] for col in ("field_only", f"field_only/{RELAXED}") for c in table[col] if c["mean"] is not None]
    ylim = (min([YLIM[0]] + [m - 0.1 for m in means]), max([YLIM[1]] + [m + 0.1 for m in means]))  # every mean shows
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(2.3 * len(layouts) + 0.6, 2.2 * len(qs) + 0.7))
        axes = fig.subplots(len(qs), len(layouts), squeeze=False, sharey=True)
        for i, q in enumerate(qs):
            for j, layout in enumerate(layouts):
                ax = axes[i][j]
                sub = table[(table["Q"] == q) & (table["layout"] == layout) & (table["K"] == 1)]
                for m, model in enumerate(models):
                    for col, style, label, nudge in (
                            ("field_only", dict(marker="o", ls="-"), f"{model}, included pairs", 0.0),
                            (f"field_only/{RELAXED}", dict(marker="s", ls="--", mfc="white"),
                             f"{model}, every gated pair with |Δm| ≥ 0.5", 0.06)):
                        s = sub[sub["model"] == model].sort_values("D")
                        s = s[[c["mean"] is not None for c in s[col]]]
                        if s.empty:
                            continue
                        x = np.log1p(s["D"].to_numpy()) + nudge
                        y = np.array([c["mean"] for c in s[col]])
                        lo = np.array([c["lo"] if c["lo"] is not None else c["mean"] for c in s[col]])
                        hi = np.array([c["hi"] if c["hi"] is not None else c["mean"] for c in s[col]])
                        c = colors[m % len(colors)]
                        clo, chi = np.clip(lo, *ylim), np.clip(hi, *ylim)
                        ax.errorbar(x, y, yerr=[y - clo, chi - y], color=c, ms=3, lw=1.0, capsize=2, label=label,
                                    **{**style, "ls": "none"})
                        step = np.diff([ds_all.index(d) for d in s["D"]])     # a line joins neighbouring Ds only
                        for seg in np.split(np.arange(len(x)), np.flatnonzero(step > 1) + 1):
                            ax.plot(x[seg], y[seg], color=c, lw=1.0, ls=style["ls"])
                        for xi, cut_lo, cut_hi in zip(x, lo < ylim[0], hi > ylim[1]):   # CI beyond the axis
                            if cut_lo:
                                ax.plot(xi, ylim[0], marker="v", color=c, ms=3.5, clip_on=False)
                            if cut_hi:
                                ax.plot(xi, ylim[1], marker="^", color=c, ms=3.5, clip_on=False)
                        ns = s["n_included"] if col == "field_only" else [c_["n"] for c_ in s[col]]
                        for xi, yi, n in zip(x, y, ns):          # n above an included point, below a |dm| one
                            ax.annotate(f"n={n}", (xi, yi), textcoords="offset points",
                                        xytext=(3, 4) if col == "field_only" else (3, -8), fontsize=5.5,
                                        color=INK if col == "field_only" else c)
                for m, model in enumerate(models):     # a model none of whose pairs count in this layout
                    s = sub[sub["model"] == model]
                    if len(s) and (s["n_included"] == 0).all():
                        ax.text(0.03, 0.03 + 0.08 * m, f"{model}: 0 included in {len(s)} cell{'s' * (len(s) > 1)}",
                                fontsize=5.5,
                                color=colors[m % len(colors)], transform=ax.transAxes)
                ax.set_ylim(*ylim)
                ax.axhline(BOUNDARY, color=WONG["grey"], ls="--", lw=0.8)
                ax.axhline(0, color=INK, lw=0.6)
                ds = sorted(set(table["D"]))
                ax.set_xticks(np.log1p(ds), [str(d) for d in ds])
                order = table[table["layout"] == layout]["order"].iloc[0]
                ax.set_title(f"{layout} ({order}), Q {q}", fontsize=7.5)
                if j == 0:
                    ax.set_ylabel("field-only recovery")
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.tight_layout(rect=(0, 0.2, 1, 0.96))
        fig.supxlabel("D: unique filler lines between the field and the next block (log(1 + D) axis); CIs beyond "
                      f"[{ylim[0]:.1f}, {ylim[1]:.1f}] end in an arrowhead", fontsize=7.5, y=0.13)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=6.5, frameon=False)
        fig.suptitle("Field-only recovery per cell, one gate (K = 1); n = pairs behind each point", fontsize=8)
    return fig


def _total_model_s(sources: list[dict]) -> float:
    """The records' summed per-pair model time in seconds (timing.per_instance_s: complete across resumed sessions;
    model loading and analysis not counted)."""
    return round(float(sum(s["model_s"] for s in sources)), 1)


def _json_ready(reg: dict) -> dict:
    return {k: v for k, v in reg.items() if not k.startswith("_")}


def regime_map(results: Path = DEFAULT_RESULTS, out: Path = DEFAULT_OUT, scenario: str = "diverse_all",
               prefix: str = "map-", models: list[str] | None = None) -> dict:
    """Read the map's records, write the analysis record, the table and the phase figure; return the analysis."""
    paths = map_records(results, scenario, prefix, models)
    table, pairs, sources = cells(paths)
    analysis = {"kind": "regime_map", "scenario": scenario, "prefix": prefix, "records": sources,
                "model_s_total": _total_model_s(sources), "boundary_threshold": BOUNDARY, "models": {}}
    for model, sub in pairs.groupby("model"):
        regs = {which: regression(sub, which) for which in ("included", RELAXED)}
        analysis["models"][model] = {
            "regression": {w: _json_ready(r) for w, r in regs.items()},
            "boundary": {w: boundary(r, sub) for w, r in regs.items()},
            "cells": json.loads(table[table["model"] == model].to_json(orient="records")),
        }
    stem = "regime_map" if scenario == "diverse_all" else f"regime_map_{scenario}"
    record = Path(results) / "regime_map" / f"{scenario}-{prefix.rstrip('-')}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, analysis)
    print(f"wrote {record}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = flat_table(table)
    write_table(out, stem, flat)
    (out / f"{stem}.tex").write_text(latex_table(table))
    fig = phase_figure(table)
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{stem}.{ext}", dpi=200)
    print(f"wrote {out / stem}.png, .pdf and .tex")
    return analysis


def regime_pilot(results: Path = DEFAULT_RESULTS, out: Path = DEFAULT_OUT, scenario: str = "diverse_all",
                 prefix: str = "pilot-", models: list[str] | None = None) -> dict:
    """The pilot's table (experiment=regime_pilot: one record per layout, D drawn from a range): every layout's flip
    and correct-flip rates by direction and its recoveries, chosen or not; no regression (D is not a factor there).
    Writes results/regime_map/<scenario>-pilot.json (-<prefix stem>-pilot.json for another prefix) and
    figures/regime_pilot.{csv,md,tex}."""
    paths = map_records(results, scenario, prefix, models)
    table, _, sources = cells(paths, exact_d=False)
    rate = table["correct_flip"].map(lambda c: c["mean"] if c["mean"] is not None else -1.0)
    table = table.assign(_rate=rate).sort_values(["model", "_rate"], ascending=[True, False], kind="stable")
    table = table.drop(columns="_rate").reset_index(drop=True)
    analysis = {"kind": "regime_pilot", "scenario": scenario, "prefix": prefix, "records": sources,
                "model_s_total": _total_model_s(sources), "cells": json.loads(table.to_json(orient="records"))}
    name = f"{scenario}-{prefix.rstrip('-')}" + ("" if prefix == "pilot-" else "-pilot")  # never a map's name
    record = Path(results) / "regime_map" / f"{name}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, analysis)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "regime_pilot" if scenario == "diverse_all" else f"regime_pilot_{scenario}"
    flat = flat_table(table)
    at = list(flat.columns).index("correct_flip k/n") + 1      # the rate the pilot chooses by, with its CI
    for i, (col, key) in enumerate((("correct_flip", "mean"), ("correct_flip lo", "lo"), ("correct_flip hi", "hi"))):
        flat.insert(at + i, col, [c[key] for c in table["correct_flip"]])
    write_table(out, stem, flat)
    (out / f"{stem}.tex").write_text(latex_table(table))
    print(f"wrote {record} and {out / stem}.tex")
    return analysis


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The step-5 regime map from the sweep's locality records.")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--scenario", default="diverse_all")
    p.add_argument("--prefix", default=None, help="the cells' tag prefix (default map-, or pilot- with --pilot)")
    p.add_argument("--pilot", action="store_true", help="the pilot's per-layout table instead of the map")
    p.add_argument("--models", default=None, help="comma-separated; default: every model with cells")
    a = p.parse_args(argv)
    try:
        models = a.models.split(",") if a.models else None
        if a.pilot:
            regime_pilot(a.results, a.out, a.scenario, a.prefix or "pilot-", models)
        else:
            regime_map(a.results, a.out, a.scenario, a.prefix or "map-", models)
    except RecordError as e:
        print(f"[kvnotes] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
