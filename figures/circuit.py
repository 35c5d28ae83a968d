"""Step 7, the component-level circuit (paper_spec §4, §6.5, §7.5): Fig. 15 and `tab:circuit` from the circuit
probes' records only, with the paper's numbers beside ours (figures/paper_numbers.yaml, never typed here).

    python -m figures.circuit [--results DIR] [--out DIR] [--models a,b]

Reads, per model, every record of the circuit probes (kvnotes.records.load_aggregates / load_index):
  heads/<m>/*.json        (a) read / write1 / writeN: joint top-k recovery, cross-fitted (solid) and in-sample
                          (dashed), against the joint random-k null band (2.5-97.5 % of the null means)
  direction/<m>/*.json    (b) per layer: DoM along, logistic-probe along, the norm-matched random null band, and the
                          full difference (the layer's ceiling)
  components/<m>/*.json   (c) per readout layer T: attention and MLP shares of the write at the top-1 note
  scrub/<m>/*.json        (d) drift when notes / rest / both are resampled from a same-conclusion donor (another
                          instance, another domain), and the notes' and the rest's interchange from the other arm
                          beside the matched random note-set null
Each record is one layout of the step-5 map (its tag names it; R->F / F->R from the layout), drawn in its own colour.

Writes (under --out, default figures/): fig15_circuit_<model>.png/.pdf with a .csv / .md of exactly the plotted
numbers, and tab_circuit.{csv,md,tex}: one row per model x layout x quantity, the paper's value per paper model in
columns of their own where the quantity has one. A model without any circuit record is named with the command that
makes them; nothing is dropped silently. tab_circuit_coverage.{csv,md}: per model and map cell, the included pairs
the circuit probes draw on and which of their records exist (a model that flips on no pair is listed, with why).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from figures.fig3 import _save  # noqa: E402
from figures.make_figures import (DEFAULT_OUT, DEFAULT_RESULTS, STYLE, WONG, _parse_list,  # noqa: E402
                                   latex_table, write_table)
from kvnotes.records import load_aggregates, load_index  # noqa: E402

PROBES = ("heads", "direction", "components", "scrub")
PAPER_NUMBERS = Path(__file__).resolve().parent / "paper_numbers.yaml"
COMMAND = "python run.py -m experiment=circuit model={model}"
R_TO_F = ("rule_first", "rule_first_user")
CELL = "-D0-Qlast-K1"   # experiment=circuit's map cell: no filler (D = 0), question last, one gate


def layout_of(tag) -> str:
    """The map layout a circuit record ran on, from its tag (map-<layout>-D..-Q..-K..)."""
    if isinstance(tag, str) and tag.startswith("map-"):
        return tag[4:].split("-D")[0]
    return str(tag)


def order_of(layout: str) -> str:
    return "R->F" if layout in R_TO_F else "F->R"


def frames(results: Path, models: list[str] | None) -> pd.DataFrame:
    """Every circuit record's aggregates, with a `layout` column."""
    parts = []
    for probe in PROBES:
        try:
            a = load_aggregates(results, probe=probe)
        except FileNotFoundError:
            continue
        if len(a):
            parts.append(a)
    if not parts:
        return pd.DataFrame()
    agg = pd.concat(parts, ignore_index=True)
    if models:
        agg = agg[agg["model"].isin(models)]
    return agg.assign(layout=agg["tag"].map(layout_of))


def _get(agg: pd.DataFrame, probe: str, layout: str, metric: str, key: str, col: str = "mean"):
    rows = agg[(agg["probe"] == probe) & (agg["layout"] == layout) & (agg["metric"] == metric) & (agg["key"] == key)]
    if rows.empty or col not in rows or pd.isna(rows.iloc[0][col]):
        return None
    return float(rows.iloc[0][col])


def plotted(agg: pd.DataFrame, model: str) -> pd.DataFrame:
    """The numbers Fig. 15 plots for `model`: one row per (panel, layout, series, x)."""
    sub = agg[agg["model"] == model]
    rows = []

    def summary(panel, layout, series, x, probe, metric, key):
        """A clustered summary (mean, CI, n) of the records, if present."""
        m = _get(sub, probe, layout, metric, key)
        if m is not None:
            rows.append({"panel": panel, "layout": layout, "series": series, "x": x, "mean": m,
                         **{c: _get(sub, probe, layout, metric, key, src)
                            for c, src in (("lo", "ci_lo"), ("hi", "ci_hi"), ("n", "n"))}})

    def null(panel, layout, series, x, probe, metric, key):
        """A null band (median, 2.5-97.5 % of the null means), if present."""
        lo = _get(sub, probe, layout, metric, key, "lo")
        if lo is not None:
            rows.append({"panel": panel, "layout": layout, "series": series, "x": x, "lo": lo,
                         "mean": _get(sub, probe, layout, metric, key, "median"),
                         "hi": _get(sub, probe, layout, metric, key, "hi")})

    for layout in sorted(set(sub["layout"])):
        for sweep in ("read", "write1", "writeN"):
            for k in ("1", "2", "3", "5", "8", "12", "20"):
                for series, kind in (("cross-fitted", "cf"), ("in-sample", "in")):
                    summary("a", layout, f"{sweep} {series}", int(k), "heads", sweep, f"cum_{kind}/{k}")
                null("a", layout, f"{sweep} random-k null", int(k), "heads", sweep, f"null/{k}")
        d = sub[(sub["probe"] == "direction") & (sub["layout"] == layout)]
        for li in sorted(set(d["metric"]), key=int):
            for series in ("along_dm", "along_probe", "full", "necessity_dm"):
                summary("b", layout, series, int(li), "direction", li, series)
            null("b", layout, "random (norm-matched) null", int(li), "direction", li, "random_null")
        c = sub[(sub["probe"] == "components") & (sub["layout"] == layout)]
        for T in sorted(set(c["metric"]), key=int):
            for series in ("attn_share", "mlp_share"):
                summary("c", layout, series, int(T), "components", T, series)
        for kind in ("instance", "domain"):
            for part in ("notes", "rest", "all"):
                summary("d", layout, f"drift, {kind} donor", part, "scrub", "drift", f"{kind}:{part}")
        for part in ("notes", "rest"):
            summary("d", layout, "interchange from the other arm", part, "scrub", "interchange", part)
        null("d", layout, "random note sets (matched null)", "notes", "scrub", "null_notes", "")
    return pd.DataFrame(rows, columns=["panel", "layout", "series", "x", "mean", "lo", "hi", "n"])


def _legend(ax, ncol: int = 1, loc: str = "best") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=5.5, frameon=True, framealpha=0.85, edgecolor="none", ncol=ncol, loc=loc,
                  columnspacing=0.8, handlelength=1.8)   # readable over a line
    else:
        ax.text(0.5, 0.5, "no record", ha="center", va="center", transform=ax.transAxes, fontsize=7)


def _headroom(ax, ncol: int = 1) -> None:
    """Room above the curves for an upper legend of `ncol` columns (a row per ncol layout x series entries), so
    that it covers no data."""
    lo, hi = ax.get_ylim()
    rows = -(-len(ax.get_legend_handles_labels()[0]) // ncol)
    ax.set_ylim(lo, hi + (hi - lo) * (0.14 * rows + 0.1))


def _f(series) -> np.ndarray:
    """A column of the plotted table as floats (the table mixes numeric and categorical x across panels)."""
    return pd.to_numeric(series).to_numpy(dtype=float)


def figure(table: pd.DataFrame, model: str) -> Figure:
    import matplotlib as mpl
    layouts = sorted(set(table["layout"]), key=lambda x: (order_of(x) != "F->R", x))
    colours = dict(zip(layouts, [WONG[c] for c in ("orange", "blue", "green", "red", "purple", "sky")]))
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(11.0, 3.2))
        axes = fig.subplots(1, 4)
        ax = axes[0]
        for layout in layouts:
            for sweep, ls in (("read", "-"), ("writeN", ":")):
                s = table[(table["panel"] == "a") & (table["layout"] == layout)]
                band = s[s["series"] == f"{sweep} random-k null"]
                if len(band):
                    ax.fill_between(_f(band["x"]), _f(band["lo"]), _f(band["hi"]), color=colours[layout], alpha=0.12,
                                    lw=0)
                cf = s[s["series"] == f"{sweep} cross-fitted"]
                if len(cf):
                    ax.plot(_f(cf["x"]), _f(cf["mean"]), ls=ls, marker="o", ms=2.5, color=colours[layout],
                            label=f"{layout} ({order_of(layout)}) {sweep}")
        ax.set(xscale="log", xlabel="k heads patched jointly", ylabel="recovery", title="(a) read / write heads")
        ks = sorted(set(_f(table[table["panel"] == "a"]["x"]).astype(int)))
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.axhline(0, color=WONG["grey"], lw=0.6)
        _headroom(ax)
        _legend(ax, loc="upper left")
        ax = axes[1]
        for layout in layouts:
            s = table[(table["panel"] == "b") & (table["layout"] == layout)]
            band = s[s["series"] == "random (norm-matched) null"]
            if len(band):
                ax.fill_between(_f(band["x"]), _f(band["lo"]), _f(band["hi"]), color=colours[layout], alpha=0.12,
                                lw=0)
            for series, ls in (("along_dm", "-"), ("along_probe", "--"), ("full", ":")):
                p = s[s["series"] == series]
                if len(p):
                    ax.plot(_f(p["x"]), _f(p["mean"]), ls=ls, marker="o", ms=2.5, color=colours[layout],
                            label=f"{layout} {series}")
        ax.set(xlabel="layer", ylabel="recovery", title="(b) conclusion direction vs random")
        ax.axhline(0, color=WONG["grey"], lw=0.6)
        ncol = 1 if len(ax.get_legend_handles_labels()[0]) <= 4 else 2
        _headroom(ax, ncol)
        _legend(ax, ncol, "upper left")
        ax = axes[2]
        width = 0.8 / max(len(layouts), 1)
        for i, layout in enumerate(layouts):
            s = table[(table["panel"] == "c") & (table["layout"] == layout)]
            a, m = s[s["series"] == "attn_share"], s[s["series"] == "mlp_share"]
            if len(a):
                xs = np.arange(len(a)) + i * width
                ax.bar(xs, _f(a["mean"]), width, color=colours[layout], label=layout)
                ax.bar(xs, _f(m["mean"]), width, bottom=_f(a["mean"]), color=colours[layout], alpha=0.35)
                ax.set_xticks(np.arange(len(a)) + width * (len(layouts) - 1) / 2, [str(int(x)) for x in _f(a["x"])])
        ax.set(xlabel="readout layer T (dark: attention, light: MLP)", ylabel="share of |δ_T|", ylim=(0, 1.45),
               title="(c) attention vs MLP write")
        _legend(ax, 2, "upper center")
        ax = axes[3]
        d = table[table["panel"] == "d"]
        cats = list(dict.fromkeys(f"{s} | {x}" for s, x in zip(d["series"], d["x"])))
        here = [x for x in layouts if x in set(d["layout"])]
        width = 0.8 / max(len(here), 1)
        for i, layout in enumerate(here):
            s = d[d["layout"] == layout]
            xs = [cats.index(f"{a} | {b}") + i * width for a, b in zip(s["series"], s["x"])]
            mean = s["mean"].astype(float).to_numpy()
            lo = s["lo"].astype(float).fillna(s["mean"].astype(float)).to_numpy()
            hi = s["hi"].astype(float).fillna(s["mean"].astype(float)).to_numpy()
            ax.bar(xs, mean, width, color=colours[layout], label=layout,
                   yerr=[np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)], capsize=1.5)
        ax.set_xticks(np.arange(len(cats)) + width * (len(here) - 1) / 2,
                      [c.replace(" | ", "\n") for c in cats], rotation=90, fontsize=4.5)
        ax.set(ylabel="drift / recovery", title="(d) causal scrubbing")
        ax.axhline(0, color=WONG["grey"], lw=0.6)
        _legend(ax)
        fig.suptitle(f"Fig. 15 on {model}", fontsize=8)
        fig.tight_layout()
    return fig


def paper_rows(path: Path = PAPER_NUMBERS) -> tuple[list[str], dict]:
    spec = yaml.safe_load(Path(path).read_text())["circuit"]
    return spec["models"], {r["key"]: r for r in spec["rows"]}


def circuit_table(agg: pd.DataFrame, paper_path: Path = PAPER_NUMBERS) -> pd.DataFrame:
    """tab:circuit: per model x layout, the quantities the paper reports (its values beside ours where it has one)."""
    paper_models, paper = paper_rows(paper_path)
    rows = []

    def add(model, layout, quantity, probe, metric, key, paper_key=None, value="mean"):
        m = _get(agg[agg["model"] == model], probe, layout, metric, key, value)
        if m is None:
            return
        sub = agg[agg["model"] == model]
        row = {"model": model, "layout": layout, "order": order_of(layout), "quantity": quantity, "value": m,
               "ci_lo": _get(sub, probe, layout, metric, key, "ci_lo"),
               "ci_hi": _get(sub, probe, layout, metric, key, "ci_hi"), "n": _get(sub, probe, layout, metric, key, "n")}
        for j, pm in enumerate(paper_models):
            row[f"paper {pm}"] = paper[paper_key]["values"][j] if paper_key in paper else None
        rows.append(row)

    for model in sorted(set(agg["model"])):
        sub = agg[agg["model"] == model]
        for layout in sorted(set(sub["layout"])):
            for k in ("1", "2", "3", "5", "8", "12"):
                add(model, layout, f"read heads, joint top-{k}, cross-fitted", "heads", "read", f"cum_cf/{k}",
                    f"read_cum_{k}")
                add(model, layout, f"read heads, joint top-{k}, in-sample", "heads", "read", f"cum_in/{k}")
                add(model, layout, f"read heads, random joint {k}-set (null mean)", "heads", "read", f"null/{k}")
                add(model, layout, f"read heads, p(cross-fitted top-{k} >= random)", "heads", "read", f"null/{k}",
                    value="p_cf_ge_null")
            add(model, layout, "read control: mean single random head", "heads", "read", "null/1",
                "read_control")
            for sweep, name in (("write1", "top-1 note"), ("writeN", "top-4 notes jointly")):
                for k in ("1", "12"):
                    add(model, layout, f"write heads at the {name}, joint top-{k}, cross-fitted", "heads", sweep,
                        f"cum_cf/{k}", f"write_cum_{k}" if sweep == "write1" else None)
            add(model, layout, "DLA vs exact single-head recovery, Spearman", "heads", "read",
                "dla_vs_exact/spearman")
            d = sub[(sub["probe"] == "direction") & (sub["layout"] == layout)]
            for li in sorted(set(d["metric"]), key=int):
                add(model, layout, f"DoM direction L{li}, along", "direction", li, "along_dm", "dir_along")
                add(model, layout, f"DoM direction L{li}, full difference", "direction", li, "full", "dir_full")
                add(model, layout, f"DoM direction L{li}, norm-matched random (null mean)", "direction", li,
                    "random_null", "dir_random")
                add(model, layout, f"DoM direction L{li}, p(along >= random)", "direction", li, "random_null",
                    value="p_along_dm_ge_null")
                add(model, layout, f"DoM direction L{li}, necessity drop", "direction", li, "necessity_dm",
                    "dir_necessity")
                add(model, layout, f"probe direction L{li}, along", "direction", li, "along_probe", "dir_probe_along")
            c = sub[(sub["probe"] == "components") & (sub["layout"] == layout)]
            for T in sorted(set(c["metric"]), key=int):
                add(model, layout, f"attention share at T = {T}", "components", T, "attn_share", "attn_share")
            for kind in ("instance", "domain"):
                for part in ("notes", "rest", "all"):
                    add(model, layout, f"scrub drift, {part} from a same-conclusion {kind} donor", "scrub", "drift",
                        f"{kind}:{part}", {"all": "scrub_drift_all", "notes": "scrub_drift_note",
                                          "rest": "scrub_drift_rest"}[part])
            for part in ("notes", "rest"):
                add(model, layout, f"scrub interchange of the {part} from the other arm", "scrub", "interchange",
                    part, f"scrub_{part}_opp")
            add(model, layout, "scrub: random note sets from the other arm (null mean)", "scrub", "null_notes", "")
    return pd.DataFrame(rows)


def _count(x) -> int | None:
    """A record's pair count as an int, None where the record has none."""
    return None if x is None or pd.isna(x) else int(x)


def _shown(path) -> str:
    """A record's path as the user can open it: relative to the working directory when under it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def coverage_table(index: pd.DataFrame, models: list[str] | None = None) -> pd.DataFrame:
    """Which pairs each model's circuit records could use, and which records exist: one row per model x locality
    record of the map cell that `experiment=circuit` draws its pairs from (`pairs_from`: `map-<layout>` + CELL), with
    the record's included and gated pairs and, per circuit probe, whether a record of that scenario and layout exists.
    A model with no such map record (the map was not run on it) gets one row per locality record it has; a model with
    circuit records but no locality record at all, one row per circuit cell. A cell that included no pair cannot have
    a circuit record (run.py writes none: nothing to measure), and its `status` says so; this is how tab:circuit
    records that a model does not flip (issue "Step 7": smollm2-135m, gemma3-270m). `index`: load_index of the
    results directory (every probe's records)."""
    loc, have = index[index["probe"] == "locality"], index[index["probe"].isin(PROBES)]
    rows = []
    for model in sorted(m for m in set(loc["model"]) | set(have["model"]) if not models or m in models):
        mine, theirs = loc[loc["model"] == model], have[have["model"] == model]
        if mine.empty:   # circuit records whose pairs came from elsewhere (pairs_from=null or another results dir)
            for (scenario, tag), recs in theirs.groupby(["scenario", "tag"], dropna=False):
                made = set(recs["probe"])
                rows.append({"model": model, "scenario": scenario, "layout": layout_of(tag), "order": order_of(
                    layout_of(tag)), "included pairs": None, "gated pairs": None,
                    **{p: "yes" if p in made else "" for p in PROBES},
                    "status": "circuit records, but no locality record of this model here: their pairs came from "
                              "pairs_from=null or another results directory (each record's pairs_from says)",
                    "source": ""})
            continue
        cells = mine[mine["tag"].fillna("").str.match(rf"map-.*{CELL}$")]
        use_map = not cells.empty
        for _, r in (cells if use_map else mine).sort_values(["scenario", "tag"], na_position="first").iterrows():
            layout = layout_of(r["tag"]) if use_map else None
            n_inc, n_gated = _count(r["n_included"]), _count(r["n_gated"])
            made, fewer = dict.fromkeys(PROBES, False), []
            for p in PROBES if use_map else ():
                rec = theirs[(theirs["probe"] == p) & (theirs["scenario"] == r["scenario"])
                             & (theirs["tag"] == r["tag"])]
                made[p] = not rec.empty
                n_rec = _count(rec["n_included"].iloc[0]) if made[p] else None
                if made[p] and n_rec != n_inc:
                    fewer.append(f"{p} measured {n_rec} pairs, the cell included {n_inc} "
                                 f"(its record's pairs_from says which, e.g. a domains_subset)")
            if n_inc is None:
                status = "the locality record has no pair counts (summary.n_included): re-run or re-analyse it"
            elif n_inc == 0:
                status = ("no decision flip passes the inclusion rule: no circuit record can be made"
                          + ("" if use_map else " (and no map record of this model)"))
            elif all(made.values()):
                status = "every circuit probe has a record"
            else:
                missing = ",".join(p for p, ok in made.items() if not ok)
                status = (f"missing: {missing} (run: {COMMAND.format(model=model)} probe={missing} "
                          f"scenario.params.layout={layout})" if use_map else "not a map cell: no circuit run")
            rows.append({"model": model, "scenario": r["scenario"], "layout": layout or "",
                         "order": order_of(layout) if layout else "", "included pairs": n_inc,
                         "gated pairs": n_gated, **{p: "yes" if made[p] else "" for p in PROBES},
                         "status": "; ".join([status, *fewer]), "source": _shown(r["path"])})
    return pd.DataFrame(rows)


def circuit(results: Path = DEFAULT_RESULTS, out: Path = DEFAULT_OUT, models: list[str] | None = None) -> list[Path]:
    agg = frames(Path(results), models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    index = load_index(Path(results))   # read once: the coverage table and the record count below
    cover = coverage_table(index, models)   # first: it matters most where no model has a circuit record
    if len(cover):
        write_table(out, "tab_circuit_coverage", cover)
        written.append(out / "tab_circuit_coverage.csv")
    else:
        for ext in ("csv", "md"):   # never leave an earlier run's table beside this run's figures
            (out / f"tab_circuit_coverage.{ext}").unlink(missing_ok=True)
    if agg.empty:
        print(f"no circuit record under {results} (run: {COMMAND.format(model='<model>')})")
        return written
    for model in sorted(set(agg["model"])):
        table = plotted(agg, model)
        stem = f"fig15_circuit_{model}"
        write_table(out, stem, table)
        written.append(_save(figure(table, model), out, stem))
        present = set(agg[agg["model"] == model]["probe"])
        for probe in PROBES:
            if probe not in present:
                print(f"{model}: no {probe} record (run: {COMMAND.format(model=model)} probe={probe})")
    tab = circuit_table(agg)
    write_table(out, "tab_circuit", tab)
    (out / "tab_circuit.tex").write_text(latex_table(tab))
    print(f"wrote {out / 'tab_circuit.tex'}")
    written.append(out / "tab_circuit.csv")
    print(f"tab:circuit from {sum(index['probe'].isin(PROBES))} records")
    return written


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(DEFAULT_RESULTS))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--models", default=None, help="comma-separated model names (default: every model with a record)")
    args = ap.parse_args(argv)
    return circuit(Path(args.results), Path(args.out), _parse_list(args.models) if args.models else None)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
