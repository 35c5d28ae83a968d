"""Fig. 3 (b–d) and the mechanism-probe figures, computed from records alone, each with a CSV and a markdown table of
exactly the numbers it shows.

  fig_sweeps        P2 mean single-position recovery per fine label, and P3 recovery by layer (one layer, layers
                    <= l, layers >= l) (records: results/positions|layers/<model>/diverse.json)
  fig3b_topk        top-k locality (in-sample and cross-fitted) against the matched random-k null band, and the
                    suffix / prefix curves (records: results/topk/<model>/diverse.json)
  fig3c_reads       where the decision reads: causal share (field-only vs downstream-only recovery, locality record)
                    and attention share (the decision query's mass on the field vs the downstream in the oracle
                    state, knockout record E4) — the quantity the paper hard-coded as [0.01, 0.99]
  fig3d_wording     P(decision = the new value's action) per update wording, on the oracle prompt and on the stale
                    cache, Wilson CIs (results/wording/<model>/diverse.json)
  fig_knockout      graded knockout curves per state and ablation, with the matched-mass random knockout band
  fig_dose          field-only / downstream-only recovery per field placement (results/dose/<model>/diverse_dose.json)
  fig_decodability  leave-one-scenario-out probe accuracy per layer, conclusion vs field value
                    (results/decodability/<model>/diverse_polarity.json)

  fig3_<model>      the paper's 1x4 layout (a locality over models, b top-k, c reads, d wording) for every model
                    with all four records

    python -m figures.fig3 [--results DIR] [--out DIR] [--models a,b] [--only fig3b_topk,fig3]

A figure whose records are missing is skipped with a message naming the record and the command that makes it.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from matplotlib.patches import Patch  # noqa: E402

from figures.make_figures import (DEFAULT_OUT, DEFAULT_RESULTS, FIG3A_METRICS, INK, STYLE, WONG,  # noqa: E402
                                 draw_locality_panel, load_locality_record, locality_y_range)

SOURCES = {  # figure -> (probe, scenario)
    "fig_sweeps": ("positions", "diverse"),
    "fig3b_topk": ("topk", "diverse"),
    "fig3c_reads": ("knockout", "diverse"),
    "fig3d_wording": ("wording", "diverse"),
    "fig_knockout": ("knockout", "diverse"),
    "fig_dose": ("dose", "diverse_dose"),
    "fig_decodability": ("decodability", "diverse_polarity"),
}


class Missing(Exception):
    pass


def load(results: Path, probe: str, model: str, scenario: str) -> dict:
    path = Path(results) / probe / model / f"{scenario}.json"
    if not path.is_file():
        raise Missing(f"{path} (run: python run.py probe={probe} model={model} scenario={scenario})")
    rec = json.loads(path.read_text())
    if rec.get("experiment") != probe:
        raise SystemExit(f"malformed record {path}: 'experiment' is {rec.get('experiment')!r}, expected {probe!r}")
    print(f"read {path}")
    return rec


def models_with(results: Path, probe: str, scenario: str) -> list[str]:
    return sorted(p.parent.name for p in (Path(results) / probe).glob(f"*/{scenario}.json"))


def _ci(s: dict) -> tuple:
    ci = s.get("ci") or [None, None]
    return s.get("mean"), ci[0], ci[1], s.get("n")


def write_table(out: Path, stem: str, header: list, rows: list) -> None:
    """`<stem>.csv` and `<stem>.md` with the numbers a figure shows."""
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    fmt = lambda x: "" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)   # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (stem + '.csv')} and .md")


def _save(fig: Figure, out: Path, stem: str) -> Path:
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight", metadata={"CreationDate": None})   # byte-stable PDFs
    print(f"wrote {png}")
    return png


def _row_of_panels(n: int, width: float, height: float = 2.8, extra: float = 0.0):
    """A figure with one row of `n` panels (one per model) and its axes."""
    fig = Figure(figsize=(width * n + extra, height), layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _band(ax, xs, lo, hi, color, label=None):
    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0, label=label)


# -- position and layer sweeps (P2, P3) -----------------------------------------------------------------------------
def fig_sweeps(results: Path, out: Path, models: list[str]) -> Path:
    """Per model: mean single-position recovery per fine label (P2, symlog axis: the field dwarfs the rest), and
    recovery of splicing the downstream in one layer / in layers <= l / in layers >= l (P3)."""
    fig = Figure(figsize=(3.6 * 2, 2.6 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    rows = []
    for (ax_p, ax_l), model in zip(axes, models):
        pos, lay = load(results, "positions", model, "diverse"), load(results, "layers", model, "diverse")
        agg = pos["aggregate"]
        labels = sorted((k.split("/", 1)[1] for k in agg if k.startswith("label_recovery/")),
                        key=lambda lab: -agg[f"label_recovery/{lab}"]["mean"])
        for i, lab in enumerate(labels):
            mean, lo, hi, n = _ci(agg[f"label_recovery/{lab}"])
            color = WONG["orange"] if lab == "field" else WONG["blue"]
            ax_p.bar(i, mean, color=color, edgecolor="white",
                     yerr=[[mean - lo], [hi - mean]] if lo is not None else None, capsize=2, ecolor=INK)
            ax_p.text(i, max(mean, hi or mean) * 1.3 + 2e-4, f"{mean:.3f}\nn={n}", ha="center", fontsize=5)
            rows.append([model, "position_label", lab, mean, lo, hi, n])
        ax_p.set_yscale("symlog", linthresh=1e-3)
        ax_p.set_ylim(-2e-3, 3)
        ax_p.set_xticks(range(len(labels)))
        ax_p.set_xticklabels(labels, rotation=35, ha="right", fontsize=6.5)
        ax_p.axhline(0, color=INK, lw=0.7)
        ax_p.set_ylabel("single-position recovery")
        ax_p.set_title(f"(P2) one position at a time, {model}\nmean per position of each label "
                       f"(n={pos['summary']['n_included']})", fontsize=7)
        la = lay["aggregate"]
        n_layers = lay["summary"]["n_layers"]
        x = list(range(n_layers))
        for kind, color, label in (("single_by_layer", WONG["blue"], "one layer"),
                                   ("upto_by_layer", WONG["green"], "layers <= l"),
                                   ("from_by_layer", WONG["red"], "layers >= l")):
            curve = la[kind]
            _band(ax_l, x, [c["ci"][0] for c in curve], [c["ci"][1] for c in curve], color)
            ax_l.plot(x, [c["mean"] for c in curve], "-", color=color, label=label)
            rows += [[model, kind, li, c["mean"], *c["ci"], c["n"]] for li, c in enumerate(curve)]
        bands = {b: la[f"band_recovery/{b}"] for b in ("early", "mid", "late") if f"band_recovery/{b}" in la}
        rows += [[model, "band_mean_single", b, *_ci(v)] for b, v in bands.items()]
        ax_l.axhline(0, color=INK, lw=0.7)
        ax_l.axhline(1, color=INK, lw=0.7, ls=":")
        ax_l.set_xlabel(f"layer (of {n_layers})")
        ax_l.set_ylabel("recovery, [field, decision) spliced")
        ax_l.set_title(f"(P3) by layer, {model} (n={lay['summary']['n_included']})\nband means e/m/l: "
                       + " / ".join(f"{v['mean']:.3f}" for v in bands.values()), fontsize=7)
        ax_l.legend(fontsize=6, loc="center right")
    write_table(out, "fig_sweeps", ["model", "curve", "label_or_layer", "mean", "lo", "hi", "n"], rows)
    return _save(fig, out, "fig_sweeps")


# -- Fig. 3b -------------------------------------------------------------------------------------------------------
def _draw_topk(ax, model: str, rec: dict, legend_size: float = 6) -> list:
    """Top-k curves (in-sample, cross-fitted) against the matched and uniform random-k nulls; returns table rows."""
    agg, n = rec["aggregate"], rec["summary"]["n_included"]
    ks = [k for k in map(str, rec["summary"]["ks"]) if k in agg["topk_in"]]
    x = [int(k) for k in ks]
    null, uni = agg["null_matched"], agg["null_uniform"]
    _band(ax, x, [null[k]["lo"] for k in ks], [null[k]["hi"] for k in ks], WONG["grey"],
          f"matched random-k null ({null[ks[0]]['n_draws']} draws, 95 %)")
    ax.plot(x, [null[k]["median"] for k in ks], color=WONG["grey"], lw=1.0, ls="--")
    ax.plot(x, [uni[k]["median"] for k in ks], color=WONG["grey"], lw=1.0, ls=":",
            label=f"uniform random-k (unmatched, {uni[ks[0]]['n_draws']} draws)")
    for kind, color, label in (("topk_in", WONG["blue"], "top-k, ranked in-sample"),
                               ("topk_cf", WONG["orange"], "top-k, ranked on other scenarios")):
        _band(ax, x, [agg[kind][k]["ci"][0] for k in ks], [agg[kind][k]["ci"][1] for k in ks], color)
        ax.plot(x, [agg[kind][k]["mean"] for k in ks], "-o", color=color, label=label, ms=3)
    ax.set_xscale("log", base=2)
    ax.axhline(0, color=INK, lw=0.7)
    ax.axhline(1, color=INK, lw=0.7, ls=":")
    ax.set_xlabel("downstream positions spliced (k)")
    ax.set_ylabel("decision recovery")
    ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(0, 0.97))
    return [[model, "topk", k, agg["topk_in"][k]["mean"], *agg["topk_in"][k]["ci"], agg["topk_cf"][k]["mean"],
             *agg["topk_cf"][k]["ci"], null[k]["median"], null[k]["lo"], null[k]["hi"],
             null[k].get("p_topk_in_ge_null"), null[k].get("p_topk_cf_ge_null"), uni[k]["median"], n] for k in ks]


def _draw_suffix(ax, model: str, rec: dict) -> list:
    """Suffix and prefix curves (last / first fraction of the downstream spliced); returns table rows."""
    agg, n = rec["aggregate"], rec["summary"]["n_included"]
    fr = [f for f in map(str, rec["summary"]["fracs"]) if f in agg["suffix"]]
    xf = [float(f) for f in fr]
    for kind, color in (("suffix", WONG["green"]), ("prefix", WONG["red"])):
        _band(ax, xf, [agg[kind][f]["ci"][0] for f in fr], [agg[kind][f]["ci"][1] for f in fr], color)
        ax.plot(xf, [agg[kind][f]["mean"] for f in fr], "-o", color=color, ms=3,
                label=f"{kind}: {'last' if kind == 'suffix' else 'first'} fraction of [field, decision)")
    ax.axhline(0, color=INK, lw=0.7)
    ax.set_xlabel("fraction of positions spliced")
    ax.legend(fontsize=6, loc="upper left")
    return [[model, "suffix/prefix", f, agg["suffix"][f]["mean"], *agg["suffix"][f]["ci"], agg["prefix"][f]["mean"],
             *agg["prefix"][f]["ci"], None, None, None, None, None, None, n] for f in fr]


TOPK_HEADER = ["model", "curve", "k_or_frac", "in_sample_or_suffix", "lo", "hi", "cross_fit_or_prefix", "lo", "hi",
               "null_median", "null_lo", "null_hi", "p_in_vs_null", "p_cf_vs_null", "uniform_null_median", "n"]


def fig3b(results: Path, out: Path, models: list[str]) -> Path:
    recs = {m: load(results, "topk", m, "diverse") for m in models}
    fig = Figure(figsize=(3.6 * 2, 2.7 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    rows = []
    for (ax_k, ax_s), (model, rec) in zip(axes, recs.items()):
        n = rec["summary"]["n_included"]
        rows += _draw_topk(ax_k, model, rec)
        ax_k.set_title(f"(b) top-k notes, {model} (n={n}, {len(rec['summary']['scenarios_included'])} scen.)",
                       fontsize=8)
        rows += _draw_suffix(ax_s, model, rec)
        ax_s.set_title(f"suffix / prefix, {model} (n={n})", fontsize=8)
    write_table(out, "fig3b_topk", TOPK_HEADER, rows)
    return _save(fig, out, "fig3b_topk")


# -- Fig. 3c -------------------------------------------------------------------------------------------------------
def _draw_reads(ax, model: str, loc: dict, ko: dict) -> list:
    """Causal share (locality recoveries) beside attention share (E4, oracle state); returns table rows."""
    bars = [("causal: field-only", loc["field_only_recovery"], WONG["orange"]),
            ("causal: downstream-only", loc["downstream_only_recovery"], WONG["blue"]),
            ("attention: field", ko["field"], WONG["orange"]),
            ("attention: downstream", ko["downstream"], WONG["blue"]),
            ("attention: sink", ko["sink"], WONG["grey"])]
    rows = []
    for i, (label, s, color) in enumerate(bars):
        mean, lo, hi, n = _ci(s)
        ax.bar(i, mean, color=color, edgecolor="white", hatch="" if label.startswith("causal") else "//",
               yerr=[[mean - lo], [hi - mean]] if lo is not None else None, capsize=2, ecolor=INK)
        ax.text(i, max(mean, hi or mean) + 0.02, f"{mean:.2f}", ha="center", fontsize=6)
        rows.append([model, label, mean, lo, hi, n])
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[0] for b in bars], rotation=40, ha="right", fontsize=6.5)
    ax.axhline(0, color=INK, lw=0.7)
    ax.set_ylim(min(0, *(r[3] or 0 for r in rows)) - 0.05, 1.15)
    return rows


def _reads_records(results: Path, model: str) -> tuple[dict, dict]:
    loc = load(results, "locality", model, "diverse")["aggregate"]
    return loc, load(results, "knockout", model, "diverse")["aggregate"]["oracle"]["E4_attention_mass"]


def fig3c(results: Path, out: Path, models: list[str]) -> Path:
    fig, axes = _row_of_panels(len(models), 2.6, extra=0.6)
    rows = []
    for ax, model in zip(axes, models):
        loc, ko = _reads_records(results, model)
        rows += _draw_reads(ax, model, loc, ko)
        ax.set_title(f"(c) where the decision reads, {model}\nrecovery (n={loc['field_only_recovery']['n']}); "
                     f"attention mass, oracle state (n={ko['field']['n']})", fontsize=7)
    axes[0].set_ylabel("recovery / attention share")
    write_table(out, "fig3c_reads", ["model", "quantity", "mean", "lo", "hi", "n"], rows)
    return _save(fig, out, "fig3c_reads")


# -- Fig. 3d -------------------------------------------------------------------------------------------------------
def _draw_wording(ax, model: str, rec: dict) -> list:
    """P(new value's action) per wording, one bar per setting (oracle prompt / stale cache), Wilson CIs."""
    table = rec["aggregate"]["p_decision_is_new_action"]     # {setting: {variant: proportion summary}}
    labels = rec["wording"]["labels"]
    settings = list(table)
    variants = list(table[settings[0]])
    w = 0.8 / len(settings)
    rows = []
    for si, (setting, color) in enumerate(zip(settings, (WONG["green"], WONG["red"], WONG["blue"]))):
        for vi, v in enumerate(variants):
            mean, lo, hi, n = _ci(table[setting][v])
            x = vi + (si - (len(settings) - 1) / 2) * w
            ax.bar(x, mean, width=w, color=color, edgecolor="white", label=setting if vi == 0 else None,
                   yerr=[[mean - lo], [hi - mean]], capsize=2, ecolor=INK)
            rows.append([model, setting, labels.get(v, v), mean, lo, hi, n])
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([labels.get(v, v) for v in variants], rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("P(decision = new value's action)")
    ax.legend(fontsize=6, loc="lower left", title="note appended to", title_fontsize=6)
    return rows


def fig3d(results: Path, out: Path, models: list[str]) -> Path:
    fig, axes = _row_of_panels(len(models), 3.8)
    rows = []
    for ax, model in zip(axes, models):
        rows += _draw_wording(ax, model, load(results, "wording", model, "diverse"))
        ax.set_title(f"(d) update wording, {model} (n={rows[-1][-1]}, Wilson 95 %)", fontsize=8)
    write_table(out, "fig3d_wording", ["model", "setting", "variant", "p_new", "lo", "hi", "n"], rows)
    return _save(fig, out, "fig3d_wording")


# -- Fig. 3, the paper's 1x4 composite ------------------------------------------------------------------------------
COMPOSITE_METRICS = [m for m in FIG3A_METRICS
                     if m[0] in ("field_only_recovery", "downstream_only_recovery", "full_downstream_recovery")]


def fig3_composite(results: Path, out: Path, model: str) -> Path:
    """The paper's Fig. 3 layout (a-d in one row) for one model, every panel from a record: (a) locality over all
    models with a `diverse` locality record, (b) top-k vs the matched null, (c) reads, (d) wording."""
    topk, wording = load(results, "topk", model, "diverse"), load(results, "wording", model, "diverse")
    loc, ko = _reads_records(results, model)
    loc_models = models_with(results, "locality", "diverse")
    per_model = {m: load_locality_record(results / "locality" / m / "diverse.json") for m in loc_models}
    fig = Figure(figsize=(13.5, 3.4), layout="constrained")
    ax_a, ax_b, ax_c, ax_d = fig.subplots(1, 4, width_ratios=[1.25, 1, 0.8, 1])
    draw_locality_panel(ax_a, per_model, loc_models, locality_y_range({"diverse": per_model}), COMPOSITE_METRICS)
    ax_a.set_xticklabels(ax_a.get_xticklabels(), rotation=30, ha="right", fontsize=6)
    ax_a.set_ylabel("decision recovery")
    ax_a.set_title("(a) field-KV vs downstream, all models", fontsize=8, loc="left")
    ax_a.legend(handles=[Patch(facecolor=c, label=lab.split(" (")[0]) for _, lab, c in COMPOSITE_METRICS],
                fontsize=5.5, loc="upper right")
    rows = [[m, "a", k, r["metrics"][k]["mean"], r["metrics"][k]["lo"], r["metrics"][k]["hi"], r["metrics"][k]["n"]]
            for m, r in per_model.items() for k, _, _ in COMPOSITE_METRICS]
    n = topk["summary"]["n_included"]
    rows += [[model, "b", f"{r[1]}@{r[2]}", r[3], r[4], r[5], r[-1]] for r in _draw_topk(ax_b, model, topk, 5.5)]
    ax_b.set_title(f"(b) top-k notes vs matched null (n={n})", fontsize=8, loc="left")
    rows += [[r[0], "c", r[1], *r[2:]] for r in _draw_reads(ax_c, model, loc, ko)]
    ax_c.set_title("(c) where the decision reads", fontsize=8, loc="left")
    rows += [[r[0], "d", f"{r[1]}: {r[2]}", *r[3:]] for r in _draw_wording(ax_d, model, wording)]
    ax_d.set_title(f"(d) update wording (n={rows[-1][-1]}, Wilson)", fontsize=8, loc="left")
    ax_d.set_ylim(0, 1.32)
    ax_d.legend(fontsize=6, loc="upper center", ncol=2, title="note appended to", title_fontsize=6)
    fig.suptitle(f"Fig. 3, {model}: four causal probes (95 % CIs; bootstrap clustered by scenario, Wilson for "
                 f"proportions)", fontsize=9)
    stem = f"fig3_{model}"
    write_table(out, stem, ["model", "panel", "quantity", "mean", "lo", "hi", "n"], rows)
    return _save(fig, out, stem)


# -- knockout -------------------------------------------------------------------------------------------------------
def fig_knockout(results: Path, out: Path, models: list[str]) -> Path:
    recs = {m: load(results, "knockout", m, "diverse") for m in models}
    states = ("field_only", "stale", "oracle")
    fig = Figure(figsize=(3.0 * len(states), 2.6 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(states), squeeze=False)
    rows = []
    for axrow, (model, rec) in zip(axes, recs.items()):
        n = rec["summary"]["n_included"]
        for ax, state in zip(axrow, states):
            agg = rec["aggregate"][state]
            fr = list(agg["graded"])
            x = [float(f) for f in fr]
            rnd = agg["random_matched_mass"]
            rx = [float(f) for f in rnd]
            if rx:
                _band(ax, rx, [rnd[f]["recovery"]["lo"] for f in rnd], [rnd[f]["recovery"]["hi"] for f in rnd],
                      WONG["grey"], "random, matched attention mass")
            methods = [("mask", WONG["red"]), ("mean", WONG["blue"]), ("resample", WONG["purple"])]
            if rec["summary"].get("resample_donors") != "prefix":   # made before the fix: resample was a permutation
                methods = methods[:2]
            for method, color in methods:
                m = [agg["graded"][f][method]["recovery"]["mean"] for f in fr]
                ax.plot(x, m, "-o", color=color, ms=3, label=f"top-attention {method}")
                for f in fr:
                    c = agg["graded"][f][method]
                    rows.append([model, state, "graded", f, method, c["recovery"]["mean"], *c["recovery"]["ci"],
                                 c["p_new"]["mean"], *c["p_new"]["ci"], c.get("kl", {}).get("mean"),
                                 c.get("mass", {}).get("sink"), n])
            for band in agg["band"]:
                c = agg["band"][band]["mask"]
                rows.append([model, state, "band", band, "mask", c["recovery"]["mean"], *c["recovery"]["ci"],
                             c["p_new"]["mean"], *c["p_new"]["ci"], c.get("kl", {}).get("mean"),
                             c.get("mass", {}).get("sink"), n])
            ax.axhline(0, color=INK, lw=0.7)
            ax.axhline(1, color=INK, lw=0.7, ls=":")
            ax.set_title(f"{state} state, {model} (n={n})", fontsize=8)
            ax.set_xlabel("fraction of downstream knocked out")
        axrow[0].set_ylabel("recovery toward the oracle")
        axrow[0].legend(fontsize=6)
    write_table(out, "fig_knockout", ["model", "state", "kind", "frac_or_band", "method", "recovery", "lo", "hi",
                                      "p_new", "p_lo", "p_hi", "kl", "sink_mass", "n"], rows)
    return _save(fig, out, "fig_knockout")


# -- dose -----------------------------------------------------------------------------------------------------------
def fig_dose(results: Path, out: Path, models: list[str]) -> Path:
    fig, axes = _row_of_panels(len(models), 3.8)
    rows = []
    for ax, model in zip(axes, models):
        rec = load(results, "dose", model, "diverse_dose")
        by = rec["aggregate"]["by_level"]
        levels = list(by)
        for key, color, label in (("field_only_recovery", WONG["orange"], "field-only"),
                                  ("downstream_only_recovery", WONG["blue"], "downstream-only")):
            m = [by[lv][key]["mean"] for lv in levels]
            lo = [by[lv][key]["ci"][0] if by[lv][key]["ci"] else None for lv in levels]
            hi = [by[lv][key]["ci"][1] if by[lv][key]["ci"] else None for lv in levels]
            ax.errorbar(range(len(levels)), m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]],
                        fmt="-o", color=color, ms=3, capsize=2, label=label)
        for lv in levels:
            v = by[lv]
            rows.append([model, lv, v["distance"]["mean"], v["field_only_recovery"]["mean"],
                         *(v["field_only_recovery"]["ci"] or [None, None]), v["downstream_only_recovery"]["mean"],
                         v["suffix_frac_for_80pct"]["mean"], v["n_included"], v["n_gated"]])
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([f"{lv}\n{by[lv]['distance']['mean']:.0f} tok, n={by[lv]['n_included']}" for lv in levels],
                           fontsize=5.5, rotation=30, ha="right")
        ax.axhline(0, color=INK, lw=0.7)
        rho = rec["aggregate"]["spearman_field_only_vs_distance"]
        ax.set_title(f"dose-response, {model}: rho(distance, field-only) = {rho['rho']:.2f} "
                     f"[{rho['ci'][0]:.2f}, {rho['ci'][1]:.2f}]", fontsize=7)
        ax.set_ylabel("decision recovery")
        ax.legend(fontsize=6)
    write_table(out, "fig_dose", ["model", "level", "distance_tokens", "field_only", "lo", "hi", "downstream_only",
                                  "suffix_frac_for_80pct", "n_included", "n_gated"], rows)
    return _save(fig, out, "fig_dose")


# -- decodability ---------------------------------------------------------------------------------------------------
def fig_decodability(results: Path, out: Path, models: list[str]) -> Path:
    recs = {m: load(results, "decodability", m, "diverse_polarity") for m in models}
    anchors = recs[models[0]]["aggregate"]["anchors"]
    fig = Figure(figsize=(2.6 * len(anchors), 2.5 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(anchors), squeeze=False)
    rows = []
    for axrow, (model, rec) in zip(axes, recs.items()):
        agg = rec["aggregate"]
        r = agg["targets"]["correlation"]
        minority = agg["minority_arms"]
        for ax, anchor in zip(axrow, anchors):
            for target, color in (("conclusion", WONG["blue"]), ("field_value", WONG["orange"])):
                curve = agg["logistic"][anchor][target]
                x = [c["depth"] for c in curve]
                _band(ax, x, [c["ci"][0] for c in curve], [c["ci"][1] for c in curve], color)
                ax.plot(x, [c["mean"] for c in curve], "-", color=color, label=target.replace("_", " "))
                for c in curve:
                    rows.append([model, anchor, target, c["layer"], c["depth"], c["mean"], *c["ci"], c["n"]])
            null = agg["best_layer"][anchor]["conclusion"]["null"]
            ax.axhline(null["p95"], color=WONG["grey"], ls="--", lw=0.9, label="permutation null, 95th pct")
            ax.axhline(0.5, color=INK, lw=0.6, ls=":")
            ax.set_ylim(0.2, 1.05)
            acc = minority["accuracy"].get(anchor, {})
            for target in acc:
                best = agg["best_layer"][anchor][target]
                rows.append([model, anchor, f"{target}, minority arms", best["layer"], best["depth"],
                             *_ci(acc[target])])
            if acc:
                ax.text(0.02, 0.03, "arms with conclusion = field value\n(n={}): conclusion {}/{}, value {}/{}".format(
                    minority["n_arms"], acc["conclusion"]["k"], minority["n_arms"], acc["field_value"]["k"],
                    minority["n_arms"]), transform=ax.transAxes, fontsize=5.5, va="bottom")
            ax.set_title(f"{anchor}, {model}\nn={agg['n_samples']} arms, r(targets)={r:.2f}", fontsize=7)
            ax.set_xlabel("relative depth")
        axrow[0].set_ylabel("LOSO accuracy")
        axrow[0].legend(fontsize=5.5, loc="center right")
    write_table(out, "fig_decodability", ["model", "anchor", "target", "layer", "depth", "accuracy", "lo", "hi", "n"],
                rows)
    return _save(fig, out, "fig_decodability")


FIGURES = {"fig_sweeps": fig_sweeps, "fig3b_topk": fig3b, "fig3c_reads": fig3c, "fig3d_wording": fig3d,
           "fig_knockout": fig_knockout, "fig_dose": fig_dose, "fig_decodability": fig_decodability}


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Fig. 3 (b-d) and the mechanism-probe figures from the records.")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--models", default=None, help="comma-separated; default: every model with the figure's record")
    p.add_argument("--only", default=None, help="comma-separated figure names: " + ", ".join([*FIGURES, "fig3"]))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in FIGURES.items():
        if args.only and name not in args.only.split(","):
            continue
        probe, scenario = SOURCES[name]
        models = args.models.split(",") if args.models else models_with(args.results, probe, scenario)
        if name == "fig3c_reads":
            models = [m for m in models if (args.results / "locality" / m / "diverse.json").is_file()]
        if name == "fig_sweeps":
            models = [m for m in models if (args.results / "layers" / m / "diverse.json").is_file()]
        if name in ("fig_sweeps", "fig3b_topk", "fig_knockout", "fig_decodability"):
            models = [m for m in models
                      if json.loads((args.results / probe / m / f"{scenario}.json").read_text())
                      ["summary"]["n_included"] > 0] if not args.models else models
        if not models:
            print(f"skipped {name}: no {probe} record with included pairs under {args.results / probe} "
                  f"(run: python run.py probe={probe} scenario={scenario})")
            continue
        try:
            with matplotlib.rc_context(STYLE):
                written.append(fn(args.results, args.out, models))
        except Missing as e:
            print(f"skipped {name}: missing record {e}")
    if not args.only or "fig3" in args.only.split(","):
        written += _composites(args.results, args.out, args.models.split(",") if args.models else None)
    return written


def _composites(results: Path, out: Path, models: list[str] | None) -> list[Path]:
    """One 1x4 Fig. 3 per model that has every record it needs (top-k with included pairs, knockout, wording)."""
    need = [("topk", "diverse"), ("knockout", "diverse"), ("wording", "diverse"), ("locality", "diverse")]
    models = models or models_with(results, "topk", "diverse")
    written = []
    for model in models:
        missing = [f"python run.py probe={p} model={model} scenario={s}" for p, s in need
                   if not (results / p / model / f"{s}.json").is_file()]
        if missing:
            print(f"skipped fig3_{model}: missing record(s); run: " + "; ".join(missing))
            continue
        if json.loads((results / "topk" / model / "diverse.json").read_text())["summary"]["n_included"] == 0:
            print(f"skipped fig3_{model}: its top-k record has no included pairs (the model never flips)")
            continue
        with matplotlib.rc_context(STYLE):
            written.append(fig3_composite(results, out, model))
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
