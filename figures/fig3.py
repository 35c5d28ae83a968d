"""Fig. 3 (b–d) and the mechanism-probe figures, computed from records alone, each with a CSV and a markdown table of
exactly the numbers it shows.

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

    python -m figures.fig3 [--results DIR] [--out DIR] [--models a,b]

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

from figures.make_figures import DEFAULT_OUT, DEFAULT_RESULTS, INK, STYLE, WONG  # noqa: E402

SOURCES = {  # figure -> (probe, scenario)
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
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight")
    print(f"wrote {png}")
    return png


def _row_of_panels(n: int, width: float, height: float = 2.8, extra: float = 0.0):
    """A figure with one row of `n` panels (one per model) and its axes."""
    fig = Figure(figsize=(width * n + extra, height), layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _band(ax, xs, lo, hi, color, label=None):
    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0, label=label)


# -- Fig. 3b -------------------------------------------------------------------------------------------------------
def fig3b(results: Path, out: Path, models: list[str]) -> Path:
    recs = {m: load(results, "topk", m, "diverse") for m in models}
    fig = Figure(figsize=(3.6 * 2, 2.7 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    rows = []
    for (ax_k, ax_s), (model, rec) in zip(axes, recs.items()):
        agg, n = rec["aggregate"], rec["summary"]["n_included"]
        ks = [k for k in map(str, rec["summary"]["ks"]) if k in agg["topk_in"]]
        x = [int(k) for k in ks]
        null = agg["null_matched"]
        _band(ax_k, x, [null[k]["lo"] for k in ks], [null[k]["hi"] for k in ks], WONG["grey"],
              f"matched random-k null ({null[ks[0]]['n_draws']} draws, 95 %)")
        ax_k.plot(x, [null[k]["median"] for k in ks], color=WONG["grey"], lw=1.0, ls="--")
        uni = agg["null_uniform"]
        ax_k.plot(x, [uni[k]["median"] for k in ks], color=WONG["grey"], lw=1.0, ls=":",
                  label=f"uniform random-k (unmatched, {uni[ks[0]]['n_draws']} draws)")
        for kind, color, label in (("topk_in", WONG["blue"], "top-k, ranked in-sample"),
                                   ("topk_cf", WONG["orange"], "top-k, ranked on other scenarios")):
            m = [agg[kind][k]["mean"] for k in ks]
            _band(ax_k, x, [agg[kind][k]["ci"][0] for k in ks], [agg[kind][k]["ci"][1] for k in ks], color)
            ax_k.plot(x, m, "-o", color=color, label=label, ms=3)
        for k in ks:
            rows.append([model, "topk", k, agg["topk_in"][k]["mean"], *agg["topk_in"][k]["ci"],
                         agg["topk_cf"][k]["mean"], *agg["topk_cf"][k]["ci"], null[k]["median"], null[k]["lo"],
                         null[k]["hi"], null[k].get("p_topk_in_ge_null"), null[k].get("p_topk_cf_ge_null"),
                         uni[k]["median"], n])
        ax_k.set_xscale("log", base=2)
        ax_k.axhline(0, color=INK, lw=0.7)
        ax_k.axhline(1, color=INK, lw=0.7, ls=":")
        ax_k.set_xlabel("downstream positions spliced (k)")
        ax_k.set_ylabel("decision recovery")
        ax_k.set_title(f"(b) top-k notes, {model} (n={n}, {len(rec['summary']['scenarios_included'])} scen.)",
                       fontsize=8)
        ax_k.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, 0.97))
        fr = [f for f in map(str, rec["summary"]["fracs"]) if f in agg["suffix"]]
        xf = [float(f) for f in fr]
        for kind, color in (("suffix", WONG["green"]), ("prefix", WONG["red"])):
            _band(ax_s, xf, [agg[kind][f]["ci"][0] for f in fr], [agg[kind][f]["ci"][1] for f in fr], color)
            ax_s.plot(xf, [agg[kind][f]["mean"] for f in fr], "-o", color=color, ms=3,
                      label=f"{kind}: {'last' if kind == 'suffix' else 'first'} fraction of [field, decision)")
        for f in fr:
            rows.append([model, "suffix/prefix", f, agg["suffix"][f]["mean"], *agg["suffix"][f]["ci"],
                         agg["prefix"][f]["mean"], *agg["prefix"][f]["ci"], None, None, None, None, None, None, n])
        ax_s.axhline(0, color=INK, lw=0.7)
        ax_s.set_xlabel("fraction of positions spliced")
        ax_s.set_title(f"suffix / prefix, {model} (n={n})", fontsize=8)
        ax_s.legend(fontsize=6, loc="upper left")
    write_table(out, "fig3b_topk", ["model", "curve", "k_or_frac", "in_sample_or_suffix", "lo", "hi",
                                    "cross_fit_or_prefix", "lo", "hi", "null_median", "null_lo", "null_hi",
                                    "p_in_vs_null", "p_cf_vs_null", "uniform_null_median", "n"], rows)
    return _save(fig, out, "fig3b_topk")


# -- Fig. 3c -------------------------------------------------------------------------------------------------------
def fig3c(results: Path, out: Path, models: list[str]) -> Path:
    fig, axes = _row_of_panels(len(models), 2.6, extra=0.6)
    rows = []
    for ax, model in zip(axes, models):
        loc = load(results, "locality", model, "diverse")["aggregate"]
        ko_rec = load(results, "knockout", model, "diverse")
        ko = ko_rec["aggregate"]["oracle"]["E4_attention_mass"]
        bars = [("causal: field-only", loc["field_only_recovery"], WONG["orange"]),
                ("causal: downstream-only", loc["downstream_only_recovery"], WONG["blue"]),
                ("attention: field", ko["field"], WONG["orange"]),
                ("attention: downstream", ko["downstream"], WONG["blue"]),
                ("attention: sink", ko["sink"], WONG["grey"])]
        for i, (label, s, color) in enumerate(bars):
            mean, lo, hi, n = _ci(s)
            ax.bar(i, mean, color=color, edgecolor="white", hatch="" if label.startswith("causal") else "//",
                   yerr=[[mean - lo], [hi - mean]] if lo is not None else None, capsize=2, ecolor=INK)
            ax.text(i, max(mean, hi or mean) + 0.02, f"{mean:.2f}", ha="center", fontsize=6)
            rows.append([model, label, mean, lo, hi, n])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[0] for b in bars], rotation=40, ha="right", fontsize=6.5)
        ax.axhline(0, color=INK, lw=0.7)
        ax.set_ylim(min(0, *(r[3] or 0 for r in rows if r[0] == model)) - 0.05, 1.15)
        ax.set_title(f"(c) where the decision reads, {model}\nrecovery (n={loc['field_only_recovery']['n']}); "
                     f"attention mass, oracle state (n={ko['field']['n']})", fontsize=7)
    axes[0].set_ylabel("recovery / attention share")
    write_table(out, "fig3c_reads", ["model", "quantity", "mean", "lo", "hi", "n"], rows)
    return _save(fig, out, "fig3c_reads")


# -- Fig. 3d -------------------------------------------------------------------------------------------------------
def fig3d(results: Path, out: Path, models: list[str]) -> Path:
    fig, axes = _row_of_panels(len(models), 3.8)
    rows = []
    for ax, model in zip(axes, models):
        rec = load(results, "wording", model, "diverse")
        table = rec["aggregate"]["p_decision_is_new_action"]     # {setting: {variant: proportion summary}}
        labels = rec["wording"]["labels"]
        settings = list(table)
        variants = list(table[settings[0]])
        w = 0.8 / len(settings)
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
        ax.set_title(f"(d) update wording, {model} (n={rows[-1][-1]}, Wilson 95 %)", fontsize=8)
        ax.legend(fontsize=6, loc="lower left", title="note appended to", title_fontsize=6)
    write_table(out, "fig3d_wording", ["model", "setting", "variant", "p_new", "lo", "hi", "n"], rows)
    return _save(fig, out, "fig3d_wording")


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
            ax.set_title(f"{anchor}, {model}\nn={agg['n_samples']} arms, r(targets)={r:.2f}", fontsize=7)
            ax.set_xlabel("relative depth")
        axrow[0].set_ylabel("LOSO accuracy")
        axrow[0].legend(fontsize=5.5, loc="lower right")
    write_table(out, "fig_decodability", ["model", "anchor", "target", "layer", "depth", "accuracy", "lo", "hi", "n"],
                rows)
    return _save(fig, out, "fig_decodability")


FIGURES = {"fig3b_topk": fig3b, "fig3c_reads": fig3c, "fig3d_wording": fig3d, "fig_knockout": fig_knockout,
           "fig_dose": fig_dose, "fig_decodability": fig_decodability}


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Fig. 3 (b-d) and the mechanism-probe figures from the records.")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--models", default=None, help="comma-separated; default: every model with the figure's record")
    p.add_argument("--only", default=None, help="comma-separated figure names: " + ", ".join(FIGURES))
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
        if name in ("fig3b_topk", "fig_knockout", "fig_decodability"):
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
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
