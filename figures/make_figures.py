"""Figures computed from the probe records, never from hand-typed numbers.

Currently: Fig. 3a, "field-KV vs downstream" (paper_spec.md §6.1, harness version), read from the locality probe's
records at ``results/locality/<model>/<scenario>[-<tag>].json``, one panel per scenario, with a CSV and a markdown
table of the numbers it shows (``fig3a_locality.csv|md``).

    python figures/make_figures.py [--results DIR] [--out DIR] [--models a,b,...] [--scenario s1,s2] [--tag T]

Defaults are ``results/`` and ``figures/`` under the repository root (the parent of this folder), not the current
directory; ``--scenario diverse,family_a`` (one panel each; the models are those with a record of the first) and no
tag. Other scenarios or a tag go into the file names (``fig3a_locality_family_a``, ``fig3a_locality-<tag>``), so
figures of different families do not overwrite each other. Every record read and every file written is printed; a
registered model left out is named with the command that makes its record; a missing or malformed record raises
``RecordError`` (an ordinary exception; the command line turns it into exit status 1 with the message).

This module also holds what every figure script shares: the style, the table writer, output names, the
registered-model note.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)

from kvnotes.records import (MissingRecord, RecordError, load_aggregates, load_index, read_record, _require,  # noqa: E402
                             plain_value, record_path, registered_models, run_command)

__all__ = ["RecordError", "MissingRecord", "fig3a", "main", "write_table", "output_stem", "note_missing_models"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO_ROOT / "results"
DEFAULT_OUT = REPO_ROOT / "figures"

# ---------------------------------------------------------------------------------------------------------------------
# Shared style (paper_spec.md §6.0)
# ---------------------------------------------------------------------------------------------------------------------
WONG = {
    "blue": "#0072B2",
    "orange": "#E69F00",
    "green": "#009E73",
    "red": "#D55E00",
    "purple": "#CC79A7",
    "sky": "#56B4E9",
    "yellow": "#F0E442",
    "grey": "#9a9a9a",
}
INK = "#3a3a3a"

STYLE = {
    "font.family": "serif",
    "font.serif": ["STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 4,
    "axes.labelsize": 8.5,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "axes.linewidth": 0.8,
    "axes.edgecolor": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "lines.linewidth": 1.9,
    "lines.markersize": 4.5,
    "figure.dpi": 150,
    "savefig.dpi": 150,
    "axes.grid": True,
    "grid.alpha": 0.16,
    "grid.linewidth": 0.6,
    "grid.color": "#8a8a8a",
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
}

VALUE_LABEL_SIZE = 5.8  # bar value labels, §6.0 ("5.8–6.6 pt with %.2f")

# ---------------------------------------------------------------------------------------------------------------------
# Shared by the figure scripts: tables, output names, the registered-model note
# ---------------------------------------------------------------------------------------------------------------------
def _md_cell(x) -> str:
    return "" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


LATEX_SYMBOLS = [("->", r"$\to$"), (">=", r"$\geq$"), ("<=", r"$\leq$"), ("≥", r"$\geq$"), ("≤", r"$\leq$"),
                 ("≈", r"$\approx$"), ("Δ", r"$\Delta$"), (" < ", " $<$ "), (" > ", " $>$ ")]


def latex_table(table, column_format: str | None = None) -> str:
    """A LaTeX tabular of a DataFrame that compiles under the default OT1 fonts: text escaped (_ % & ...), gaps
    empty, floats to 3 places, and the symbols our quantities use (->, >=, Δ, ≈, ...) written as math."""
    table = table.astype(object)
    text = table.where(table.notna(), None).to_latex(index=False, na_rep="", escape=True, float_format="%.3f",
                                                     column_format=column_format)
    for plain, latex in LATEX_SYMBOLS:
        text = text.replace(plain, latex)
    return text


def write_table(out: Path, stem: str, table, header: list[str] | None = None) -> None:
    """`<stem>.csv` (every digit, CRLF rows as the csv module writes them) and `<stem>.md` (floats to 3 places) of a
    DataFrame; `header` renames the columns (it may repeat a name, e.g. lo/hi for two curves). Gaps print empty."""
    table = table.astype(object)
    table = table.where(table.notna(), None)
    if header is not None:
        table.columns = header
    out = Path(out)
    table.to_csv(out / f"{stem}.csv", index=False, lineterminator="\r\n")
    cells = table.map(_md_cell)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False, name=None)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (stem + '.csv')} and .md")


def output_stem(base: str, scenario: str | None = None, default_scenario: str | None = None,
                tag: str | None = None) -> str:
    """`base`, plus `_<scenario>` when it is not the figure's default, plus `-<tag>` when there is one."""
    stem = base if not scenario or scenario == default_scenario else f"{base}_{scenario}"
    return f"{stem}-{tag}" if tag else stem


def _scenario_file_args(results: Path, probe: str, scenario: str, tag: str | None, shown: list[str]) -> str:
    """For a scenario read from a file (pairs), the ` scenario.path=...` (and ` results_dir=...` when not the
    default) the command needs, read from a shown model's record; "" otherwise."""
    for m in shown:
        path = record_path(results, probe, m, scenario, tag)
        if path.is_file():
            scen = (read_record(path).get("config") or {}).get("scenario") or {}
            if scen.get("family") == "pairs":
                out = f" scenario.path={scen['params']['path']}"
                return out if Path(results).resolve() == DEFAULT_RESULTS.resolve() else f"{out} results_dir={results}"
            return ""
    return ""


def note_missing_models(figure: str, results: Path, probe: str, scenario: str, tag: str | None,
                        shown: list[str], why: dict[str, str] | None = None) -> list[str]:
    """Print which registered models (configs/model/*.yaml, kind != tiny) `figure` leaves out, and why: no record
    (with the command that makes it), or the reason in `why` (e.g. no included pairs). Returns the left-out names."""
    why = why or {}
    extra = _scenario_file_args(results, probe, scenario, tag, shown)
    registered = registered_models()
    left_out = [m for m in registered if m not in shown]
    if not left_out:
        return []
    print(f"{figure} shows {len([m for m in shown if m in registered])} of {len(registered)} registered models; "
          f"not shown:")
    for m in left_out:
        path = record_path(results, probe, m, scenario, tag)
        if m in why:
            print(f"  {m}: {why[m]} ({path})")
        elif not path.is_file():
            print(f"  {m}: no record {path}  (run: {run_command(probe, m, scenario, tag)}{extra})")
        else:
            print(f"  {m}: not requested (--models)")
    return left_out


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 3a definition
# ---------------------------------------------------------------------------------------------------------------------
# (record key under "aggregate", legend label, colour); order = bar order within a model's group.
FIG3A_METRICS = [
    ("field_only_recovery", "field-only", WONG["red"]),
    ("field_line_recovery", "field + newline", WONG["orange"]),
    ("field_k_only_recovery", "field K-only", WONG["blue"]),
    ("field_v_only_recovery", "field V-only", WONG["sky"]),
    ("downstream_only_recovery", "downstream-only (field stale)", WONG["purple"]),
    ("full_downstream_recovery", "full downstream (sanity: =1 by construction)", WONG["green"]),
]
# Panel titles of the scenarios named so far; any other scenario is titled by its name.
PANEL_TITLES = {
    "diverse": "one-word gated decisions",
    "diverse_all": "every domain file",
    "family_a": "Family A tool-call template",
}
FIG3A_SCENARIOS = ["diverse", "family_a"]   # the default panels, left to right; models come from the first
FIG3A_PANELS = [(s, f"({chr(97 + i)}) {PANEL_TITLES[s]}") for i, s in enumerate(FIG3A_SCENARIOS)]
FIG3A_STEM = "fig3a_locality"
EXPERIMENT = "locality"
PRIMARY_SCENARIO = FIG3A_SCENARIOS[0]


ORDER_WORDS = {"R->F": "rule before field (R→F)", "F->R": "field before rule (F→R)"}


def panel_title(i: int, scenario: str, tag: str | None = None, orders: set | None = None) -> str:
    """'(a) <scenario title>[, <rule order>] [<tag>]': the rule order is said when every record of the panel has the
    same one (read from each record's own layout, see `record_order`)."""
    title = f"({chr(97 + i)}) {PANEL_TITLES.get(scenario, scenario)}"
    if orders and len(orders) == 1:
        title += f", {ORDER_WORDS[next(iter(orders))]}"
    return f"{title} [{tag}]" if tag else title


def record_order(rec: dict) -> str | None:
    """The rule order (R->F / F->R) of a record, from its config: the one-word family's layout (scenarios.diverse
    LAYOUTS), Family C's order (rule_first: R->F, the paper's; field_first: F->R); None for other families (the
    off-template tasks have no rule before or after a field)."""
    from scenarios.diverse import LAYOUTS
    scen = (rec.get("config") or {}).get("scenario") or rec.get("scenario") or {}
    params = scen.get("params") or {}
    if scen.get("family") == "diverse":
        return LAYOUTS.get(params.get("layout", "rule_first"))
    if scen.get("family") == "family_c":
        return {"rule_first": "R->F", "field_first": "F->R"}.get(params.get("order", "rule_first"))
    return None


def fig3a_stem(scenarios: list[str], tag: str | None = None) -> str:
    """fig3a_locality for the default panels; otherwise the scenarios ('+'-joined) and the tag are in the name."""
    scen = None if scenarios == FIG3A_SCENARIOS else "+".join(scenarios)
    return output_stem(FIG3A_STEM, scen, None, tag)


# ---------------------------------------------------------------------------------------------------------------------
# Record loading and validation
# ---------------------------------------------------------------------------------------------------------------------
def _get(rec: dict, path: Path, *keys: str):
    return _require(rec, path, *keys)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_metric(rec: dict, path: Path, key: str) -> None:
    """The shape every plotted aggregate metric must have: n >= 0; a number mean when n > 0; ci [lo <= hi] or null."""
    n = _get(rec, path, "aggregate", key, "n")
    mean = _get(rec, path, "aggregate", key, "mean")
    ci = _get(rec, path, "aggregate", key, "ci")
    where = f"aggregate.{key}"
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RecordError(f"malformed record {path}: '{where}.n' must be a non-negative integer, got {n!r}")
    if n == 0:
        return
    if not _is_number(mean):
        raise RecordError(f"malformed record {path}: '{where}.mean' must be a number when n={n}, got {mean!r}")
    if ci is None:
        return
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(c) for c in ci)):
        raise RecordError(f"malformed record {path}: '{where}.ci' must be [lo, hi] or null, got {ci!r}")
    if ci[0] > ci[1]:
        raise RecordError(f"malformed record {path}: '{where}.ci' has lo > hi: {ci!r}")


def load_locality_record(path: Path, metrics=FIG3A_METRICS) -> dict:
    """Read one locality record, check the shape of what Fig. 3a plots, and reduce it to {path, n_included, n_gated,
    metrics: {key: {mean, lo, hi, n}}}; the numbers come from `load_aggregates`. mean/lo/hi are None when n == 0,
    lo/hi when the record has no CI (e.g. a single cluster). Prints the path it read."""
    path = Path(path)
    rec = read_record(path)
    print(f"read {path}")
    experiment = _get(rec, path, "experiment")
    if experiment != EXPERIMENT:
        raise RecordError(f"malformed record {path}: 'experiment' is {experiment!r}, expected {EXPERIMENT!r}")
    n_included = _get(rec, path, "summary", "n_included")
    n_gated = _get(rec, path, "summary", "n_gated")   # the denominator: gated pairs (controls are reported apart)
    keys = [key for key, _, _ in metrics]
    for key in keys:
        _check_metric(rec, path, key)
    agg = load_aggregates(path, metric=keys)
    agg = agg[agg["key"] == ""].set_index("metric").reindex(columns=["mean", "ci_lo", "ci_hi", "n"])
    out = {}
    for key in keys:
        mean, lo, hi, n = (plain_value(agg.at[key, col]) for col in agg.columns)   # cell by cell: n stays an int
        out[key] = ({"mean": None, "lo": None, "hi": None, "n": 0} if n == 0
                    else {"mean": float(mean), "lo": lo, "hi": hi, "n": n})
    return {"path": path, "n_included": n_included, "n_gated": n_gated, "metrics": out, "order": record_order(rec)}


def models_with_record(results_dir: Path, probe: str, scenario: str, tag: str | None = None) -> list[str]:
    """Models that have a (probe, scenario, tag) record under results_dir, sorted."""
    index = load_index(results_dir, probe=probe, scenario=scenario, tag=tag) if Path(results_dir).is_dir() else None
    return [] if index is None or index.empty else sorted(index["model"].unique())


def discover_models(results_dir: Path, models: list[str] | None = None, scenario: str = PRIMARY_SCENARIO,
                    tag: str | None = None) -> list[str]:
    """The models Fig. 3a shows. Named models must each have a `scenario` record; otherwise every model that has one.
    Registered models left out are named, with the command that makes their record."""
    if models:
        missing = [m for m in models if not record_path(results_dir, EXPERIMENT, m, scenario, tag).is_file()]
        if missing:
            lines = [f"missing {scenario} locality record(s) for Fig. 3a:"]
            for m in missing:
                lines.append(f"  {record_path(results_dir, EXPERIMENT, m, scenario, tag)}")
                lines.append(f"    produce it with: {run_command(EXPERIMENT, m, scenario, tag)}")
            raise MissingRecord("\n".join(lines), run_command(EXPERIMENT, missing[0], scenario, tag))
        return list(models)
    found = models_with_record(results_dir, EXPERIMENT, scenario, tag)
    if not found:
        pattern = Path(results_dir) / EXPERIMENT / "*" / (record_path(".", EXPERIMENT, "m", scenario, tag).name)
        raise MissingRecord(f"no locality records found: nothing matches {pattern}\n"
                            f"  produce one with: {run_command(EXPERIMENT, '<model>', scenario, tag)}",
                            run_command(EXPERIMENT, "<model>", scenario, tag))
    note_missing_models("Fig. 3a", Path(results_dir), EXPERIMENT, scenario, tag, found)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 3a drawing
# ---------------------------------------------------------------------------------------------------------------------
def _bar_gid(model: str, key: str) -> str:
    """The gid set on each drawn bar, so tests (and anyone else) can find a bar by model and metric."""
    return f"{model}|{key}"


def locality_y_range(records: dict[str, dict[str, dict | None]]) -> tuple[float, float]:
    """Y range from the data (means and CI ends), with room above for the value labels; 0 and 1 always visible."""
    ends = [0.0, 1.0]
    for per_model in records.values():
        for rec in per_model.values():
            if rec is None:
                continue
            for m in rec["metrics"].values():
                ends += [v for v in (m["mean"], m["lo"], m["hi"]) if v is not None]
    return min(ends) - 0.12, max(ends) + 0.30


def draw_locality_panel(ax, per_model: dict[str, dict | None], models: list[str], y_range: tuple[float, float],
                        metrics=FIG3A_METRICS) -> None:
    """Grouped recovery bars (one group per model, one bar per metric, bootstrap CIs) on one axis."""
    group_w = 0.84
    bar_w = group_w / len(metrics)
    offsets = [(-group_w / 2) + bar_w * (i + 0.5) for i in range(len(metrics))]
    y_lo, y_hi = y_range
    ax.axhline(0.0, color=INK, lw=0.8, zorder=1)
    ax.axhline(1.0, color=INK, lw=0.8, ls="--", zorder=1)
    ticklabels = []
    for gi, model in enumerate(models):
        rec = per_model.get(model)
        if rec is None:
            ticklabels.append(f"{model}\nno record")
            ax.text(gi, 0.5 * (y_lo + y_hi), "no record", ha="center", va="center", rotation=90,
                    fontsize=7, style="italic", color=WONG["grey"])
            continue
        ticklabels.append(f"{model}\nn={rec['n_included']}/{rec['n_gated']} gated")
        for (key, label, color), off in zip(metrics, offsets):
            m = rec["metrics"][key]
            x = gi + off
            if m["n"] == 0:
                ax.text(x, 0.02, "n=0", ha="center", va="bottom", rotation=90, fontsize=VALUE_LABEL_SIZE,
                        color=INK)
                continue
            mean = m["mean"]
            yerr = None
            if m["lo"] is not None:
                yerr = [[max(0.0, mean - m["lo"])], [max(0.0, m["hi"] - mean)]]
            ax.bar(x, mean, width=bar_w, color=color, edgecolor="white", linewidth=0.5, yerr=yerr,
                   error_kw={"elinewidth": 0.8, "capsize": 1.6, "capthick": 0.8, "ecolor": INK},
                   gid=_bar_gid(model, key), zorder=2)
            top = max(mean, m["hi"] if m["hi"] is not None else mean, 0.0)
            ax.text(x, top + 0.02, f"{mean:.2f}", ha="center", va="bottom", rotation=90,
                    fontsize=VALUE_LABEL_SIZE, color=INK)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(ticklabels)
    ax.tick_params(axis="x", length=0)
    ax.grid(axis="x", visible=False)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylim(y_lo, y_hi)


def locality_legend(fig: Figure, metrics=FIG3A_METRICS, ncol: int = 3) -> None:
    """Legend from proxy patches (every metric listed even if no bar of it was drawn), outside the axes."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="white", label=lab) for _, lab, c in metrics]
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=7.5, handlelength=1.2,
               columnspacing=1.4)


def build_fig3a(records: dict[str, dict[str, dict | None]], models: list[str], scenarios: list[str] | None = None,
                tag: str | None = None) -> Figure:
    """Draw Fig. 3a from loaded records: records[scenario][model] is a `load_locality_record` result or None; one
    panel per scenario (default: the keys of `records`)."""
    scenarios = list(records) if scenarios is None else scenarios
    y_range = locality_y_range(records)
    panel_w = max(3.4, 0.7 + 1.05 * len(models))
    fig = Figure(figsize=(len(scenarios) * panel_w, 3.3), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.05, h_pad=0.04)
    axes = fig.subplots(1, len(scenarios), sharey=True, squeeze=False)[0]
    for i, (ax, scenario) in enumerate(zip(axes, scenarios)):
        orders = {r.get("order") for r in records[scenario].values() if r} - {None}
        ax.set_title(panel_title(i, scenario, tag, orders), loc="left", fontsize=8.5)
        draw_locality_panel(ax, records[scenario], models, y_range)
    axes[0].set_ylabel("decision recovery")
    locality_legend(fig)
    return fig


def load_fig3a_records(results_dir: Path, models: list[str] | None = None, scenarios: list[str] | None = None,
                       tag: str | None = None) -> tuple[list[str], dict]:
    """Resolve the model list and load every Fig. 3a record; report the records that are missing per panel."""
    scenarios = scenarios or FIG3A_SCENARIOS
    models = discover_models(results_dir, models, scenarios[0], tag)
    records: dict[str, dict] = {}
    for i, scenario in enumerate(scenarios):
        records[scenario] = {}
        missing = []
        for model in models:
            path = record_path(results_dir, EXPERIMENT, model, scenario, tag)
            if path.is_file():
                records[scenario][model] = load_locality_record(path)
            else:
                records[scenario][model] = None
                missing.append((model, path))
        if missing:
            print(f"Fig. 3a panel '{panel_title(i, scenario, tag)}': {len(missing)} record(s) missing, shown as "
                  f"'no record':")
            for model, path in missing:
                print(f"  {path}  (run: {run_command(EXPERIMENT, model, scenario, tag)})")
    return models, records


def fig3a_table(records: dict[str, dict[str, dict | None]], models: list[str], metrics=FIG3A_METRICS):
    """The numbers Fig. 3a shows, one row per (scenario, model, metric) with a record."""
    import pandas as pd

    rows = [{"scenario": scenario, "model": model, "metric": key, **rec["metrics"][key],
             "n_included": rec["n_included"], "n_gated": rec["n_gated"]}
            for scenario, per_model in records.items() for model in models
            if (rec := per_model.get(model)) is not None for key, _, _ in metrics]
    return pd.DataFrame(rows, columns=["scenario", "model", "metric", "mean", "lo", "hi", "n", "n_included",
                                       "n_gated"])


def fig3a(results_dir, out_dir, models=None, return_fig: bool = False, scenarios: list[str] | None = None,
          tag: str | None = None):
    """Write Fig. 3a (PNG at dpi 150, PDF) and its table into out_dir; return the PNG path (and the Figure if
    asked). One panel per scenario (default diverse, family_a); the file names carry non-default scenarios/tag."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    scenarios = list(scenarios or FIG3A_SCENARIOS)
    stem = fig3a_stem(scenarios, tag)
    with matplotlib.rc_context(STYLE):
        models, records = load_fig3a_records(results_dir, models, scenarios, tag)
        fig = build_fig3a(records, models, scenarios, tag)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / f"{stem}.png"
        pdf = out_dir / f"{stem}.pdf"
        fig.savefig(png, dpi=150, bbox_inches="tight")
        print(f"wrote {png}")
        fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None})   # byte-stable PDFs
        print(f"wrote {pdf}")
        write_table(out_dir, stem, fig3a_table(records, models))
    return (png, fig) if return_fig else png


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def _parse_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    items = [m.strip() for m in text.split(",") if m.strip()]
    if not items:
        raise SystemExit(f"{option} was given but names nothing (expected a comma-separated list)")
    return items


def _parse_models(text: str | None) -> list[str] | None:
    return _parse_list(text, "--models")


def main(argv=None) -> list[Path]:
    """Command line. A missing or malformed record exits with status 1 and the message (SystemExit), which is what
    run.py's `except SystemExit` around this call expects; library callers use `fig3a` and get RecordError."""
    parser = argparse.ArgumentParser(description="Make the figures from the probe records.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"records directory (default: {DEFAULT_RESULTS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every model with a record of the first scenario)")
    parser.add_argument("--scenario", default=",".join(FIG3A_SCENARIOS),
                        help="comma-separated scenarios, one panel each (default: %(default)s)")
    parser.add_argument("--tag", default=None, help="read <scenario>-<tag>.json records (default: untagged)")
    args = parser.parse_args(argv)
    try:
        png = fig3a(args.results, args.out, _parse_models(args.models),
                    scenarios=_parse_list(args.scenario, "--scenario"), tag=args.tag or None)
    except RecordError as err:
        raise SystemExit(str(err)) from None
    return [png, png.with_suffix(".pdf")]


if __name__ == "__main__":
    main(sys.argv[1:])
