"""Fig. 3 (b–d) and the mechanism-probe figures, computed from records alone, each with a CSV and a markdown table of
exactly the numbers it shows. Every table is a DataFrame selected from `kvnotes.records.load_aggregates` (the
record's summary counts from `load_index`); the figure is drawn from that table and the table is written with pandas.

  fig_sweeps        P2 mean single-position recovery per fine label, and P3 recovery by layer (one layer, layers
                    <= l, layers >= l) (records: results/positions|layers/<model>/<scenario>.json)
  fig3b_topk        top-k locality (in-sample and cross-fitted) against the matched random-k null band, and the
                    suffix / prefix curves (records: results/topk/<model>/<scenario>.json)
  fig3c_reads       where the decision reads: causal share (field-only vs downstream-only recovery, locality record)
                    and attention share (the decision query's mass on the field vs the downstream in the oracle
                    state, knockout record E4) — the quantity the paper hard-coded as [0.01, 0.99]
  fig3d_wording     P(decision = the new value's action) per update wording, on the oracle prompt and on the stale
                    cache, Wilson CIs (results/wording/<model>/<scenario>.json)
  fig_knockout      graded knockout curves per state and ablation, with the matched-mass random knockout band
  fig_dose          field-only / downstream-only recovery per field placement (default scenario diverse_dose)
  fig_decodability  leave-one-scenario-out probe accuracy per layer, conclusion vs field value
                    (default scenario diverse_polarity)

  fig3_<model>      the paper's 1x4 layout (a locality over models, b top-k, c reads, d wording) for every model
                    with all four records

    python -m figures.fig3 [--results DIR] [--out DIR] [--models a,b] [--only fig3b_topk,fig3] [--scenario S] [--tag T]

Without --scenario each figure reads its own default scenario (SOURCES: diverse, diverse_dose for fig_dose,
diverse_polarity for fig_decodability); with it, every selected figure reads that scenario. A scenario other than
the figure's default, and a tag, go into the output names (fig3b_topk_family_a, fig3b_topk-<tag>), so figures of
different families do not overwrite each other. A figure whose records are missing is skipped with a message naming
the record and the command that makes it; a figure that leaves out registered models (configs/model, kind != tiny)
names them, with the command or the reason (no included pairs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from figures.make_figures import (DEFAULT_OUT, DEFAULT_RESULTS, FIG3A_METRICS, INK, STYLE, WONG,  # noqa: E402
                                  draw_locality_panel, load_locality_record, locality_y_range, models_with_record,
                                  note_missing_models, output_stem, write_table)
from kvnotes.records import (MissingRecord, RecordError, load_aggregates, load_index, read_record,  # noqa: E402
                             record_path, run_command)

SOURCES = {  # figure -> (probe, default scenario)
    "fig_sweeps": ("positions", "diverse"),
    "fig3b_topk": ("topk", "diverse"),
    "fig3c_reads": ("knockout", "diverse"),
    "fig3d_wording": ("wording", "diverse"),
    "fig_knockout": ("knockout", "diverse"),
    "fig_dose": ("dose", "diverse_dose"),
    "fig_decodability": ("decodability", "diverse_polarity"),
}
COMPOSITE_SCENARIO = "diverse"

Missing = MissingRecord   # the name this module used before the records API existed


# -- reading records through the frames ------------------------------------------------------------------------------
def _path(results: Path, probe: str, model: str, scenario: str, tag: str | None) -> Path:
    path = record_path(results, probe, model, scenario, tag)
    if not path.is_file():
        cmd = run_command(probe, model, scenario, tag)
        raise MissingRecord(f"{path} (run: {cmd})", cmd)
    return path


def _plain(x):
    """A frame cell as a plain value (NA / NaN -> None)."""
    return None if x is None or (isinstance(x, float) and x != x) or x is pd.NA else x


def rows_of(table: pd.DataFrame) -> list[dict]:
    """A table's rows as dicts of plain Python values (gaps are None), for drawing."""
    return [{k: _plain(v) for k, v in r.items()} for r in table.to_dict("records")]


def summary(results: Path, probe: str, model: str, scenario: str, tag: str | None = None) -> dict:
    """A record's index row (identity, summary counts such as n_included, n_layers, ks) as a dict."""
    path = _path(results, probe, model, scenario, tag)
    row = rows_of(load_index(path))[0]
    if row["probe"] != probe:
        raise RecordError(f"malformed record {path}: 'experiment' is {row['probe']!r}, expected {probe!r}")
    return row


def aggregates(results: Path, probe: str, model: str, scenario: str, tag: str | None = None) -> pd.DataFrame:
    """A record's aggregates frame (`load_aggregates`), after checking it is a `probe` record. Prints the path."""
    summary(results, probe, model, scenario, tag)
    path = record_path(results, probe, model, scenario, tag)
    print(f"read {path}")
    return load_aggregates(path)


def pick(agg: pd.DataFrame, metric: str, keys: list[str] | None = None, columns=("mean", "ci_lo", "ci_hi", "n")):
    """The summaries of one aggregate metric, indexed by key (reindexed to `keys` if given); absent columns are NA."""
    sub = agg[agg["metric"] == metric].set_index("key")
    if keys is not None:
        sub = sub.reindex(keys)
    return sub.reindex(columns=list(columns))


def one(agg: pd.DataFrame, metric: str, key: str = "") -> dict:
    """One summary (metric, key) as a dict of plain values; RecordError naming it when the record lacks it."""
    sub = agg[(agg["metric"] == metric) & (agg["key"] == key)]
    if sub.empty:
        where = metric + (f"/{key}" if key else "")
        raise RecordError(f"malformed record {agg['path'].iloc[0] if len(agg) else '?'}: no aggregate '{where}'")
    return rows_of(sub)[0]


def keys_under(agg: pd.DataFrame, metric: str, prefix: str = "") -> list[str]:
    """The next path part of the keys of `metric` below `prefix`, in record order (e.g. the fracs under 'graded/')."""
    keys = agg.loc[agg["metric"] == metric, "key"]
    keys = keys[keys.str.startswith(prefix) & (keys.str.len() > len(prefix))]
    return list(pd.unique(keys.str.slice(len(prefix)).str.split("/").str[0]))


def _save(fig: Figure, out: Path, stem: str) -> Path:
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight", metadata={"CreationDate": None})   # byte-stable PDFs
    print(f"wrote {png} and .pdf")
    return png


def _row_of_panels(n: int, width: float, height: float = 2.8, extra: float = 0.0):
    """A figure with one row of `n` panels (one per model) and its axes."""
    fig = Figure(figsize=(width * n + extra, height), layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _band(ax, xs, lo, hi, color, label=None):
    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0, label=label)


def _where(scenario: str, default: str, tag: str | None) -> str:
    """', <scenario>[, tag <tag>]' for titles when not the figure's defaults; '' otherwise."""
    return (f", {scenario}" if scenario != default else "") + (f", tag {tag}" if tag else "")


def _stem(name: str, scenario: str, tag: str | None) -> str:
    return output_stem(name, scenario, SOURCES[name][1], tag)


# -- position and layer sweeps (P2, P3) -----------------------------------------------------------------------------
def fig_sweeps(results: Path, out: Path, models: list[str], scenario: str = "diverse", tag: str | None = None) -> Path:
    """Per model: mean single-position recovery per fine label (P2, symlog axis: the field dwarfs the rest), and
    recovery of splicing the downstream in one layer / in layers <= l / in layers >= l (P3)."""
    fig = Figure(figsize=(3.6 * 2, 2.6 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    tables = []
    where = _where(scenario, SOURCES["fig_sweeps"][1], tag)
    for (ax_p, ax_l), model in zip(axes, models):
        pos, lay = aggregates(results, "positions", model, scenario, tag), aggregates(results, "layers", model,
                                                                                       scenario, tag)
        pos_n = summary(results, "positions", model, scenario, tag)["n_included"]
        lay_info = summary(results, "layers", model, scenario, tag)
        labels = pos[pos["metric"].str.startswith("label_recovery/") & (pos["key"] == "")]
        labels = labels.assign(order=-labels["mean"]).sort_values("order", kind="stable")   # largest first
        t_pos = pd.DataFrame({"model": model, "curve": "position_label",
                              "label_or_layer": labels["metric"].str.split("/", n=1).str[1],
                              "mean": labels["mean"], "lo": labels["ci_lo"], "hi": labels["ci_hi"], "n": labels["n"]})
        for i, r in enumerate(rows_of(t_pos)):
            mean, lo, hi, n = r["mean"], r["lo"], r["hi"], r["n"]
            color = WONG["orange"] if r["label_or_layer"] == "field" else WONG["blue"]
            ax_p.bar(i, mean, color=color, edgecolor="white",
                     yerr=[[mean - lo], [hi - mean]] if lo is not None else None, capsize=2, ecolor=INK)
            ax_p.text(i, max(mean, hi or mean) * 1.3 + 2e-4, f"{mean:.3f}\nn={n}", ha="center", fontsize=5)
        ax_p.set_yscale("symlog", linthresh=1e-3)
        ax_p.set_ylim(-2e-3, 3)
        ax_p.set_xticks(range(len(t_pos)))
        ax_p.set_xticklabels(t_pos["label_or_layer"].tolist(), rotation=35, ha="right", fontsize=6.5)
        ax_p.axhline(0, color=INK, lw=0.7)
        ax_p.set_ylabel("single-position recovery")
        ax_p.set_title(f"(P2) one position at a time, {model}{where}\nmean per position of each label "
                       f"(n={pos_n})", fontsize=7)
        tables.append(t_pos)
        n_layers = lay_info["n_layers"]
        x = list(range(n_layers))
        for kind, color, label in (("single_by_layer", WONG["blue"], "one layer"),
                                   ("upto_by_layer", WONG["green"], "layers <= l"),
                                   ("from_by_layer", WONG["red"], "layers >= l")):
            curve = pick(lay, kind)
            _band(ax_l, x, curve["ci_lo"].tolist(), curve["ci_hi"].tolist(), color)
            ax_l.plot(x, curve["mean"].tolist(), "-", color=color, label=label)
            tables.append(pd.DataFrame({"model": model, "curve": kind, "label_or_layer": curve.index.astype(int),
                                        "mean": curve["mean"], "lo": curve["ci_lo"], "hi": curve["ci_hi"],
                                        "n": curve["n"]}))
        band_metrics = [f"band_recovery/{b}" for b in ("early", "mid", "late")]
        bands = lay[(lay["key"] == "") & lay["metric"].isin(band_metrics)].set_index("metric")
        bands = bands.reindex([m for m in band_metrics if m in bands.index])
        tables.append(pd.DataFrame({"model": model, "curve": "band_mean_single",
                                    "label_or_layer": bands.index.str.split("/", n=1).str[1], "mean": bands["mean"],
                                    "lo": bands["ci_lo"], "hi": bands["ci_hi"], "n": bands["n"]}))
        ax_l.axhline(0, color=INK, lw=0.7)
        ax_l.axhline(1, color=INK, lw=0.7, ls=":")
        ax_l.set_xlabel(f"layer (of {n_layers})")
        ax_l.set_ylabel("recovery, [field, decision) spliced")
        ax_l.set_title(f"(P3) by layer, {model} (n={lay_info['n_included']})\nband means e/m/l: "
                       + " / ".join(f"{v:.3f}" for v in bands["mean"]), fontsize=7)
        ax_l.legend(fontsize=6, loc="center right")
    stem = _stem("fig_sweeps", scenario, tag)
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


# -- Fig. 3b -------------------------------------------------------------------------------------------------------
TOPK_HEADER = ["model", "curve", "k_or_frac", "in_sample_or_suffix", "lo", "hi", "cross_fit_or_prefix", "lo", "hi",
               "null_median", "null_lo", "null_hi", "p_in_vs_null", "p_cf_vs_null", "uniform_null_median", "n"]
_TOPK_COLUMNS = ["model", "curve", "k_or_frac", "a", "a_lo", "a_hi", "b", "b_lo", "b_hi", "null_median", "null_lo",
                 "null_hi", "p_in_vs_null", "p_cf_vs_null", "uniform_null_median", "n"]
_NULL_COLUMNS = ("median", "lo", "hi", "n_draws", "p_topk_in_ge_null", "p_topk_cf_ge_null")


def topk_table(model: str, agg: pd.DataFrame, info: dict) -> pd.DataFrame:
    """Top-k rows (in-sample, cross-fitted, matched and uniform nulls) then suffix / prefix rows (TOPK_HEADER)."""
    ks = [k for k in map(str, info["ks"]) if k in set(keys_under(agg, "topk_in"))]
    t_in, t_cf = pick(agg, "topk_in", ks), pick(agg, "topk_cf", ks)
    null, uni = pick(agg, "null_matched", ks, _NULL_COLUMNS), pick(agg, "null_uniform", ks, _NULL_COLUMNS)
    topk = pd.DataFrame({"model": model, "curve": "topk", "k_or_frac": ks, "a": t_in["mean"].tolist(),
                         "a_lo": t_in["ci_lo"].tolist(), "a_hi": t_in["ci_hi"].tolist(), "b": t_cf["mean"].tolist(),
                         "b_lo": t_cf["ci_lo"].tolist(), "b_hi": t_cf["ci_hi"].tolist(),
                         "null_median": null["median"].tolist(), "null_lo": null["lo"].tolist(),
                         "null_hi": null["hi"].tolist(), "p_in_vs_null": null["p_topk_in_ge_null"].tolist(),
                         "p_cf_vs_null": null["p_topk_cf_ge_null"].tolist(),
                         "uniform_null_median": uni["median"].tolist(), "n": info["n_included"]},
                        columns=_TOPK_COLUMNS)
    fr = [f for f in map(str, info["fracs"]) if f in set(keys_under(agg, "suffix"))]
    suf, pre = pick(agg, "suffix", fr), pick(agg, "prefix", fr)
    suffix = pd.DataFrame({"model": model, "curve": "suffix/prefix", "k_or_frac": fr, "a": suf["mean"].tolist(),
                           "a_lo": suf["ci_lo"].tolist(), "a_hi": suf["ci_hi"].tolist(), "b": pre["mean"].tolist(),
                           "b_lo": pre["ci_lo"].tolist(), "b_hi": pre["ci_hi"].tolist(), "n": info["n_included"]},
                          columns=_TOPK_COLUMNS)
    return pd.concat([topk, suffix], ignore_index=True)


def _draw_topk(ax, agg: pd.DataFrame, table: pd.DataFrame, legend_size: float = 6) -> None:
    """Top-k curves (in-sample, cross-fitted) against the matched and uniform random-k nulls (the topk rows)."""
    t = table[table["curve"] == "topk"]
    x = [int(k) for k in t["k_or_frac"]]
    draws = pick(agg, "null_matched", list(t["k_or_frac"][:1]), ["n_draws"])["n_draws"].iloc[0]
    uni_draws = pick(agg, "null_uniform", list(t["k_or_frac"][:1]), ["n_draws"])["n_draws"].iloc[0]
    _band(ax, x, t["null_lo"].tolist(), t["null_hi"].tolist(), WONG["grey"],
          f"matched random-k null ({draws} draws, 95 %)")
    ax.plot(x, t["null_median"].tolist(), color=WONG["grey"], lw=1.0, ls="--")
    ax.plot(x, t["uniform_null_median"].tolist(), color=WONG["grey"], lw=1.0, ls=":",
            label=f"uniform random-k (unmatched, {uni_draws} draws)")
    for col, color, label in (("a", WONG["blue"], "top-k, ranked in-sample"),
                              ("b", WONG["orange"], "top-k, ranked on other scenarios")):
        _band(ax, x, t[f"{col}_lo"].tolist(), t[f"{col}_hi"].tolist(), color)
        ax.plot(x, t[col].tolist(), "-o", color=color, label=label, ms=3)
    ax.set_xscale("log", base=2)
    ax.axhline(0, color=INK, lw=0.7)
    ax.axhline(1, color=INK, lw=0.7, ls=":")
    ax.set_xlabel("downstream positions spliced (k)")
    ax.set_ylabel("decision recovery")
    ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(0, 0.97))


def _draw_suffix(ax, table: pd.DataFrame) -> None:
    """Suffix and prefix curves (last / first fraction of the downstream spliced), the suffix/prefix rows."""
    t = table[table["curve"] == "suffix/prefix"]
    xf = [float(f) for f in t["k_or_frac"]]
    for col, kind, color in (("a", "suffix", WONG["green"]), ("b", "prefix", WONG["red"])):
        _band(ax, xf, t[f"{col}_lo"].tolist(), t[f"{col}_hi"].tolist(), color)
        ax.plot(xf, t[col].tolist(), "-o", color=color, ms=3,
                label=f"{kind}: {'last' if kind == 'suffix' else 'first'} fraction of [field, decision)")
    ax.axhline(0, color=INK, lw=0.7)
    ax.set_xlabel("fraction of positions spliced")
    ax.legend(fontsize=6, loc="upper left")


def fig3b(results: Path, out: Path, models: list[str], scenario: str = "diverse", tag: str | None = None) -> Path:
    recs = {m: (aggregates(results, "topk", m, scenario, tag), summary(results, "topk", m, scenario, tag))
            for m in models}
    fig = Figure(figsize=(3.6 * 2, 2.7 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    tables = []
    where = _where(scenario, SOURCES["fig3b_topk"][1], tag)
    for (ax_k, ax_s), (model, (agg, info)) in zip(axes, recs.items()):
        n = info["n_included"]
        table = topk_table(model, agg, info)
        _draw_topk(ax_k, agg, table)
        ax_k.set_title(f"(b) top-k notes, {model}{where} (n={n}, {info['n_scenarios']} scen.)", fontsize=8)
        _draw_suffix(ax_s, table)
        ax_s.set_title(f"suffix / prefix, {model} (n={n})", fontsize=8)
        tables.append(table)
    stem = _stem("fig3b_topk", scenario, tag)
    write_table(out, stem, pd.concat(tables, ignore_index=True), TOPK_HEADER)
    return _save(fig, out, stem)


# -- Fig. 3c -------------------------------------------------------------------------------------------------------
READS = [  # (label, record, metric, key, colour)
    ("causal: field-only", "locality", "field_only_recovery", "", WONG["orange"]),
    ("causal: downstream-only", "locality", "downstream_only_recovery", "", WONG["blue"]),
    ("attention: field", "knockout", "oracle", "E4_attention_mass/field", WONG["orange"]),
    ("attention: downstream", "knockout", "oracle", "E4_attention_mass/downstream", WONG["blue"]),
    ("attention: sink", "knockout", "oracle", "E4_attention_mass/sink", WONG["grey"]),
]


def reads_table(model: str, loc: pd.DataFrame, ko: pd.DataFrame) -> pd.DataFrame:
    """Causal share (locality recoveries) beside attention share (knockout E4, oracle state)."""
    src = {"locality": loc, "knockout": ko}
    rows = []
    for label, probe, metric, key, _ in READS:
        s = one(src[probe], metric, key)
        rows.append({"model": model, "quantity": label, "mean": s["mean"], "lo": s.get("ci_lo"),
                     "hi": s.get("ci_hi"), "n": s["n"]})
    return pd.DataFrame(rows, columns=["model", "quantity", "mean", "lo", "hi", "n"])


def _draw_reads(ax, table: pd.DataFrame) -> None:
    rows = rows_of(table)
    for i, (r, (label, _, _, _, color)) in enumerate(zip(rows, READS)):
        mean, lo, hi = r["mean"], r["lo"], r["hi"]
        ax.bar(i, mean, color=color, edgecolor="white", hatch="" if label.startswith("causal") else "//",
               yerr=[[mean - lo], [hi - mean]] if lo is not None else None, capsize=2, ecolor=INK)
        ax.text(i, max(mean, hi or mean) + 0.02, f"{mean:.2f}", ha="center", fontsize=6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["quantity"] for r in rows], rotation=40, ha="right", fontsize=6.5)
    ax.axhline(0, color=INK, lw=0.7)
    ax.set_ylim(min(0, *(r["lo"] or 0 for r in rows)) - 0.05, 1.15)


def _reads_records(results: Path, model: str, scenario: str, tag: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (aggregates(results, "locality", model, scenario, tag),
            aggregates(results, "knockout", model, scenario, tag))


def fig3c(results: Path, out: Path, models: list[str], scenario: str = "diverse", tag: str | None = None) -> Path:
    fig, axes = _row_of_panels(len(models), 2.6, extra=0.6)
    tables = []
    where = _where(scenario, SOURCES["fig3c_reads"][1], tag)
    for ax, model in zip(axes, models):
        loc, ko = _reads_records(results, model, scenario, tag)
        table = reads_table(model, loc, ko)
        _draw_reads(ax, table)
        ax.set_title(f"(c) where the decision reads, {model}{where}\nrecovery (n={table['n'].iloc[0]}); "
                     f"attention mass, oracle state (n={table['n'].iloc[2]})", fontsize=7)
        tables.append(table)
    axes[0].set_ylabel("recovery / attention share")
    stem = _stem("fig3c_reads", scenario, tag)
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


# -- Fig. 3d -------------------------------------------------------------------------------------------------------
def wording_table(model: str, agg: pd.DataFrame, labels: dict) -> pd.DataFrame:
    """P(new value's action) per (setting, wording variant): aggregate p_decision_is_new_action/<setting>/<variant>."""
    settings = keys_under(agg, "p_decision_is_new_action")
    variants = keys_under(agg, "p_decision_is_new_action", f"{settings[0]}/")
    tables = []
    for setting in settings:
        t = pick(agg, "p_decision_is_new_action", [f"{setting}/{v}" for v in variants])
        tables.append(pd.DataFrame({"model": model, "setting": setting,
                                    "variant": [labels.get(v, v) for v in variants], "p_new": t["mean"].tolist(),
                                    "lo": t["ci_lo"].tolist(), "hi": t["ci_hi"].tolist(), "n": t["n"].tolist()}))
    return pd.concat(tables, ignore_index=True)


def _draw_wording(ax, table: pd.DataFrame) -> None:
    """One bar per setting (oracle prompt / stale cache) and wording, Wilson CIs."""
    settings = list(pd.unique(table["setting"]))
    variants = list(pd.unique(table["variant"]))
    w = 0.8 / len(settings)
    for si, (setting, color) in enumerate(zip(settings, (WONG["green"], WONG["red"], WONG["blue"]))):
        for vi, r in enumerate(rows_of(table[table["setting"] == setting])):
            mean, lo, hi = r["p_new"], r["lo"], r["hi"]
            x = vi + (si - (len(settings) - 1) / 2) * w
            ax.bar(x, mean, width=w, color=color, edgecolor="white", label=setting if vi == 0 else None,
                   yerr=[[mean - lo], [hi - mean]], capsize=2, ecolor=INK)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("P(decision = new value's action)")
    ax.legend(fontsize=6, loc="lower left", title="note appended to", title_fontsize=6)


def _wording(results: Path, model: str, scenario: str, tag: str | None) -> pd.DataFrame:
    agg = aggregates(results, "wording", model, scenario, tag)
    labels = read_record(record_path(results, "wording", model, scenario, tag)).get("wording", {}).get("labels", {})
    return wording_table(model, agg, labels)


def fig3d(results: Path, out: Path, models: list[str], scenario: str = "diverse", tag: str | None = None) -> Path:
    fig, axes = _row_of_panels(len(models), 3.8)
    tables = []
    where = _where(scenario, SOURCES["fig3d_wording"][1], tag)
    for ax, model in zip(axes, models):
        table = _wording(results, model, scenario, tag)
        _draw_wording(ax, table)
        ax.set_title(f"(d) update wording, {model}{where} (n={table['n'].iloc[-1]}, Wilson 95 %)", fontsize=8)
        tables.append(table)
    stem = _stem("fig3d_wording", scenario, tag)
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


# -- Fig. 3, the paper's 1x4 composite ------------------------------------------------------------------------------
COMPOSITE_METRICS = [m for m in FIG3A_METRICS
                     if m[0] in ("field_only_recovery", "downstream_only_recovery", "full_downstream_recovery")]


def fig3_composite(results: Path, out: Path, model: str, scenario: str = COMPOSITE_SCENARIO,
                   tag: str | None = None) -> Path:
    """The paper's Fig. 3 layout (a-d in one row) for one model, every panel from a record: (a) locality over all
    models with a locality record of `scenario`, (b) top-k vs the matched null, (c) reads, (d) wording."""
    topk, topk_info = aggregates(results, "topk", model, scenario, tag), summary(results, "topk", model, scenario, tag)
    wording = _wording(results, model, scenario, tag)
    loc, ko = _reads_records(results, model, scenario, tag)
    loc_models = models_with_record(results, "locality", scenario, tag)
    per_model = {m: load_locality_record(record_path(results, "locality", m, scenario, tag)) for m in loc_models}
    fig = Figure(figsize=(13.5, 3.4), layout="constrained")
    ax_a, ax_b, ax_c, ax_d = fig.subplots(1, 4, width_ratios=[1.25, 1, 0.8, 1])
    draw_locality_panel(ax_a, per_model, loc_models, locality_y_range({scenario: per_model}), COMPOSITE_METRICS)
    ax_a.set_xticklabels(ax_a.get_xticklabels(), rotation=30, ha="right", fontsize=6)
    ax_a.set_ylabel("decision recovery")
    ax_a.set_title("(a) field-KV vs downstream, all models", fontsize=8, loc="left")
    ax_a.legend(handles=[Patch(facecolor=c, label=lab.split(" (")[0]) for _, lab, c in COMPOSITE_METRICS],
                fontsize=5.5, loc="upper right")
    header = ["model", "panel", "quantity", "mean", "lo", "hi", "n"]
    panel_a = pd.DataFrame([[m, "a", k, *(r["metrics"][k][f] for f in ("mean", "lo", "hi", "n"))]
                            for m, r in per_model.items() for k, _, _ in COMPOSITE_METRICS], columns=header)
    n = topk_info["n_included"]
    t_topk = topk_table(model, topk, topk_info)
    _draw_topk(ax_b, topk, t_topk, 5.5)
    t_topk = t_topk[t_topk["curve"] == "topk"]
    panel_b = pd.DataFrame({"model": t_topk["model"], "panel": "b", "quantity": t_topk["curve"] + "@"
                            + t_topk["k_or_frac"], "mean": t_topk["a"], "lo": t_topk["a_lo"], "hi": t_topk["a_hi"],
                            "n": t_topk["n"]})
    ax_b.set_title(f"(b) top-k notes vs matched null (n={n})", fontsize=8, loc="left")
    t_reads = reads_table(model, loc, ko)
    _draw_reads(ax_c, t_reads)
    panel_c = t_reads.assign(panel="c")[header]
    ax_c.set_title("(c) where the decision reads", fontsize=8, loc="left")
    _draw_wording(ax_d, wording)
    panel_d = pd.DataFrame({"model": wording["model"], "panel": "d",
                            "quantity": wording["setting"] + ": " + wording["variant"], "mean": wording["p_new"],
                            "lo": wording["lo"], "hi": wording["hi"], "n": wording["n"]})
    ax_d.set_title(f"(d) update wording (n={wording['n'].iloc[-1]}, Wilson)", fontsize=8, loc="left")
    ax_d.set_ylim(0, 1.32)
    ax_d.legend(fontsize=6, loc="upper center", ncol=2, title="note appended to", title_fontsize=6)
    fig.suptitle(f"Fig. 3, {model}{_where(scenario, COMPOSITE_SCENARIO, tag)}: four causal probes (95 % CIs; "
                 f"bootstrap clustered by scenario, Wilson for proportions)", fontsize=9)
    stem = output_stem(f"fig3_{model}", scenario, COMPOSITE_SCENARIO, tag)
    write_table(out, stem, pd.concat([panel_a, panel_b, panel_c, panel_d], ignore_index=True))
    return _save(fig, out, stem)


# -- knockout -------------------------------------------------------------------------------------------------------
KNOCKOUT_HEADER = ["model", "state", "kind", "frac_or_band", "method", "recovery", "lo", "hi", "p_new", "p_lo", "p_hi",
                   "kl", "sink_mass", "n"]


def _knockout_row(model: str, state: str, kind: str, where: str, method: str, cell: pd.DataFrame, n: int) -> dict:
    """One knockout cell (graded/<frac>/<method> or band/<band>/<method>) of one state, from its summaries."""
    def get(quantity, column):
        key = f"{kind}/{where}/{method}/{quantity}"
        return _plain(cell.at[key, column]) if key in cell.index else None
    return {"model": model, "state": state, "kind": kind, "frac_or_band": where, "method": method,
            "recovery": get("recovery", "mean"), "lo": get("recovery", "ci_lo"), "hi": get("recovery", "ci_hi"),
            "p_new": get("p_new", "mean"), "p_lo": get("p_new", "ci_lo"), "p_hi": get("p_new", "ci_hi"),
            "kl": get("kl", "mean"), "sink_mass": get("mass", "sink"), "n": n}


def fig_knockout(results: Path, out: Path, models: list[str], scenario: str = "diverse",
                 tag: str | None = None) -> Path:
    recs = {m: (aggregates(results, "knockout", m, scenario, tag), summary(results, "knockout", m, scenario, tag))
            for m in models}
    states = ("field_only", "stale", "oracle")
    fig = Figure(figsize=(3.0 * len(states), 2.6 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(states), squeeze=False)
    rows = []
    where = _where(scenario, SOURCES["fig_knockout"][1], tag)
    for axrow, (model, (agg, info)) in zip(axes, recs.items()):
        n = info["n_included"]
        for ax, state in zip(axrow, states):
            cell = pick(agg, state, columns=("mean", "ci_lo", "ci_hi", "lo", "hi", "sink"))
            fr = keys_under(agg, state, "graded/")
            x = [float(f) for f in fr]
            rnd = keys_under(agg, state, "random_matched_mass/")
            rx = [float(f) for f in rnd]
            if rx:
                band = cell.loc[[f"random_matched_mass/{f}/recovery" for f in rnd]]
                _band(ax, rx, band["lo"].tolist(), band["hi"].tolist(), WONG["grey"], "random, matched attention mass")
            methods = [("mask", WONG["red"]), ("mean", WONG["blue"]), ("resample", WONG["purple"])]
            if info.get("resample_donors") != "prefix":   # made before the fix: resample was a permutation
                methods = methods[:2]
            for method, color in methods:
                graded = [_knockout_row(model, state, "graded", f, method, cell, n) for f in fr]
                ax.plot(x, [r["recovery"] for r in graded], "-o", color=color, ms=3, label=f"top-attention {method}")
                rows += graded
            rows += [_knockout_row(model, state, "band", b, "mask", cell, n) for b in keys_under(agg, state, "band/")]
            ax.axhline(0, color=INK, lw=0.7)
            ax.axhline(1, color=INK, lw=0.7, ls=":")
            ax.set_title(f"{state} state, {model}{where} (n={n})", fontsize=8)
            ax.set_xlabel("fraction of downstream knocked out")
        axrow[0].set_ylabel("recovery toward the oracle")
        axrow[0].legend(fontsize=6)
    stem = _stem("fig_knockout", scenario, tag)
    write_table(out, stem, pd.DataFrame(rows, columns=KNOCKOUT_HEADER))
    return _save(fig, out, stem)


# -- dose -----------------------------------------------------------------------------------------------------------
DOSE_HEADER = ["model", "level", "distance_tokens", "field_only", "lo", "hi", "downstream_only",
               "suffix_frac_for_80pct", "n_included", "n_gated"]


def dose_table(model: str, agg: pd.DataFrame) -> pd.DataFrame:
    """One row per field placement (aggregate by_level/<level>/...)."""
    levels = keys_under(agg, "by_level")
    by = agg[agg["metric"] == "by_level"].set_index("key")
    col = lambda keys, column: [_plain(by.at[k, column]) for k in keys]   # noqa: E731
    return pd.DataFrame({"model": model, "level": levels,
                         "distance_tokens": col([f"{lv}/distance" for lv in levels], "mean"),
                         "field_only": col([f"{lv}/field_only_recovery" for lv in levels], "mean"),
                         "lo": col([f"{lv}/field_only_recovery" for lv in levels], "ci_lo"),
                         "hi": col([f"{lv}/field_only_recovery" for lv in levels], "ci_hi"),
                         "downstream_only": col([f"{lv}/downstream_only_recovery" for lv in levels], "mean"),
                         "suffix_frac_for_80pct": col([f"{lv}/suffix_frac_for_80pct" for lv in levels], "mean"),
                         "n_included": col(levels, "n_included"), "n_gated": col(levels, "n_gated")},
                        columns=DOSE_HEADER)


def fig_dose(results: Path, out: Path, models: list[str], scenario: str = "diverse_dose",
             tag: str | None = None) -> Path:
    fig, axes = _row_of_panels(len(models), 3.8)
    tables = []
    where = _where(scenario, SOURCES["fig_dose"][1], tag)
    for ax, model in zip(axes, models):
        agg = aggregates(results, "dose", model, scenario, tag)
        table = dose_table(model, agg)
        levels = table["level"].tolist()
        by = pick(agg, "by_level", [f"{lv}/downstream_only_recovery" for lv in levels])
        for key, color, label, (m, lo, hi) in (
                ("field_only_recovery", WONG["orange"], "field-only",
                 (table["field_only"].tolist(), table["lo"].tolist(), table["hi"].tolist())),
                ("downstream_only_recovery", WONG["blue"], "downstream-only",
                 (by["mean"].tolist(), by["ci_lo"].tolist(), by["ci_hi"].tolist()))):
            ax.errorbar(range(len(levels)), m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]],
                        fmt="-o", color=color, ms=3, capsize=2, label=label)
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([f"{r['level']}\n{r['distance_tokens']:.0f} tok, n={r['n_included']}"
                            for r in rows_of(table)], fontsize=5.5, rotation=30, ha="right")
        ax.axhline(0, color=INK, lw=0.7)
        rho = one(agg, "spearman_field_only_vs_distance")
        ax.set_title(f"dose-response, {model}{where}: rho(distance, field-only) = {rho['rho']:.2f} "
                     f"[{rho['ci_lo']:.2f}, {rho['ci_hi']:.2f}]", fontsize=7)
        ax.set_ylabel("decision recovery")
        ax.legend(fontsize=6)
        tables.append(table)
    stem = _stem("fig_dose", scenario, tag)
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


# -- decodability ---------------------------------------------------------------------------------------------------
DECODABILITY_HEADER = ["model", "anchor", "target", "layer", "depth", "accuracy", "lo", "hi", "n"]


def fig_decodability(results: Path, out: Path, models: list[str], scenario: str = "diverse_polarity",
                     tag: str | None = None) -> Path:
    recs = {m: aggregates(results, "decodability", m, scenario, tag) for m in models}
    anchors = keys_under(recs[models[0]], "logistic")
    fig = Figure(figsize=(2.6 * len(anchors), 2.5 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(anchors), squeeze=False)
    tables = []
    where = _where(scenario, SOURCES["fig_decodability"][1], tag)
    for axrow, (model, agg) in zip(axes, recs.items()):
        r = one(agg, "targets")["correlation"]
        n_arms = one(agg, "minority_arms")["n_arms"]
        n_samples = one(agg, "n_samples")["value"]
        for ax, anchor in zip(axrow, anchors):
            for target, color in (("conclusion", WONG["blue"]), ("field_value", WONG["orange"])):
                prefix = f"{anchor}/{target}/"
                curve = pick(agg, "logistic", [prefix + i for i in keys_under(agg, "logistic", prefix)],
                             ("layer", "depth", "mean", "ci_lo", "ci_hi", "n"))
                x = curve["depth"].tolist()
                _band(ax, x, curve["ci_lo"].tolist(), curve["ci_hi"].tolist(), color)
                ax.plot(x, curve["mean"].tolist(), "-", color=color, label=target.replace("_", " "))
                tables.append(pd.DataFrame({"model": model, "anchor": anchor, "target": target,
                                            "layer": curve["layer"].tolist(), "depth": x,
                                            "accuracy": curve["mean"].tolist(), "lo": curve["ci_lo"].tolist(),
                                            "hi": curve["ci_hi"].tolist(), "n": curve["n"].tolist()},
                                           columns=DECODABILITY_HEADER))
            null = one(agg, "best_layer", f"{anchor}/conclusion/null")
            ax.axhline(null["p95"], color=WONG["grey"], ls="--", lw=0.9, label="permutation null, 95th pct")
            ax.axhline(0.5, color=INK, lw=0.6, ls=":")
            ax.set_ylim(0.2, 1.05)
            acc = {t: one(agg, "minority_arms", f"accuracy/{anchor}/{t}")
                   for t in keys_under(agg, "minority_arms", f"accuracy/{anchor}/")}
            rows = []
            for target, s in acc.items():
                best = one(agg, "best_layer", f"{anchor}/{target}")
                rows.append([model, anchor, f"{target}, minority arms", best["layer"], best["depth"], s["mean"],
                             s.get("ci_lo"), s.get("ci_hi"), s["n"]])
            if rows:
                tables.append(pd.DataFrame(rows, columns=DECODABILITY_HEADER))
            if acc:
                ax.text(0.02, 0.03, "arms with conclusion = field value\n(n={}): conclusion {}/{}, value {}/{}".format(
                    n_arms, acc["conclusion"]["k"], n_arms, acc["field_value"]["k"], n_arms),
                    transform=ax.transAxes, fontsize=5.5, va="bottom")
            ax.set_title(f"{anchor}, {model}{where}\nn={n_samples} arms, r(targets)={r:.2f}", fontsize=7)
            ax.set_xlabel("relative depth")
        axrow[0].set_ylabel("LOSO accuracy")
        axrow[0].legend(fontsize=5.5, loc="center right")
    stem = _stem("fig_decodability", scenario, tag)
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


FIGURES = {"fig_sweeps": fig_sweeps, "fig3b_topk": fig3b, "fig3c_reads": fig3c, "fig3d_wording": fig3d,
           "fig_knockout": fig_knockout, "fig_dose": fig_dose, "fig_decodability": fig_decodability}
NEEDS_INCLUDED = ("fig_sweeps", "fig3b_topk", "fig_knockout", "fig_decodability")   # nothing to draw without pairs
ALSO_NEEDS = {"fig3c_reads": "locality", "fig_sweeps": "layers"}   # a second record of the same scenario


def _select_models(results: Path, name: str, scenario: str, tag: str | None,
                   named: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The models a figure draws, and why each registered one it leaves out is left out (beyond 'no record')."""
    probe = SOURCES[name][0]
    models = named or models_with_record(results, probe, scenario, tag)
    why = {}
    if name in ALSO_NEEDS:
        other = ALSO_NEEDS[name]
        for m in models:
            if not record_path(results, other, m, scenario, tag).is_file():
                why[m] = (f"no {other} record {record_path(results, other, m, scenario, tag)} "
                          f"(run: {run_command(other, m, scenario, tag)})")
        models = [m for m in models if m not in why]
    if name in NEEDS_INCLUDED and not named and models:
        index = load_index(results, probe=probe, model=models, scenario=scenario, tag=tag).set_index("model")
        for m in models:
            if index.at[m, "n_included"] == 0:
                why[m] = "its record has no included pairs (the model never flips)"
        models = [m for m in models if m not in why]
    return models, why


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Fig. 3 (b-d) and the mechanism-probe figures from the records.")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--models", default=None, help="comma-separated; default: every model with the figure's record")
    p.add_argument("--only", default=None, help="comma-separated figure names: " + ", ".join([*FIGURES, "fig3"]))
    p.add_argument("--scenario", default=None,
                   help="scenario of every selected figure's records (default: each figure's own: "
                        + ", ".join(f"{k} {v[1]}" for k, v in SOURCES.items()) + f", fig3 {COMPOSITE_SCENARIO})")
    p.add_argument("--tag", default=None, help="read <scenario>-<tag>.json records (default: untagged)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    named = args.models.split(",") if args.models else None
    only = args.only.split(",") if args.only else None
    tag = args.tag or None
    written = []
    try:
        for name, fn in FIGURES.items():
            if only and name not in only:
                continue
            probe, default_scenario = SOURCES[name]
            scenario = args.scenario or default_scenario
            models, why = _select_models(args.results, name, scenario, tag, named)
            if not models:
                print(f"skipped {name}: no {probe} record with included pairs under {args.results / probe} "
                      f"(run: {run_command(probe, '<model>', scenario, tag).replace(' model=<model>', '')})")
                note_missing_models(name, args.results, probe, scenario, tag, [], why)
                continue
            note_missing_models(name, args.results, probe, scenario, tag, models, why)
            try:
                with matplotlib.rc_context(STYLE):
                    written.append(fn(args.results, args.out, models, scenario=scenario, tag=tag))
            except MissingRecord as e:
                print(f"skipped {name}: missing record {e}")
        if not only or "fig3" in only:
            written += _composites(args.results, args.out, named, args.scenario or COMPOSITE_SCENARIO, tag)
    except RecordError as err:   # a malformed record: stop with its message, as a command line does
        raise SystemExit(str(err)) from None
    return written


def _composites(results: Path, out: Path, models: list[str] | None, scenario: str = COMPOSITE_SCENARIO,
                tag: str | None = None) -> list[Path]:
    """One 1x4 Fig. 3 per model that has every record it needs (top-k with included pairs, knockout, wording,
    locality), all of `scenario` (and `tag`)."""
    need = ["topk", "knockout", "wording", "locality"]
    models = models or models_with_record(results, "topk", scenario, tag)
    written = []
    for model in models:
        name = output_stem(f"fig3_{model}", scenario, COMPOSITE_SCENARIO, tag)
        missing = [run_command(p, model, scenario, tag) for p in need
                   if not record_path(results, p, model, scenario, tag).is_file()]
        if missing:
            print(f"skipped {name}: missing record(s); run: " + "; ".join(missing))
            continue
        if summary(results, "topk", model, scenario, tag)["n_included"] == 0:
            print(f"skipped {name}: its top-k record has no included pairs (the model never flips)")
            continue
        with matplotlib.rc_context(STYLE):
            written.append(fig3_composite(results, out, model, scenario, tag))
    if not models:
        print(f"skipped fig3: no topk record of scenario {scenario} under {results / 'topk'} "
              f"(run: {run_command('topk', '<model>', scenario, tag).replace(' model=<model>', '')})")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
