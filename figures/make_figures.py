"""Figures computed from the probe records, never from hand-typed numbers.

Currently: Fig. 3a, "field-KV vs downstream" (paper_spec.md §6.1, harness version), read from the locality probe's
records at ``results/locality/<model>/<scenario>.json``.

    python figures/make_figures.py [--results DIR] [--out DIR] [--models a,b,...]

Defaults are ``results/`` and ``figures/`` under the repository root (the parent of this folder), not the current
directory. Every record read and every file written is printed; a missing or malformed record fails loudly.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)

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
# (scenario file stem, panel title); left to right.
FIG3A_PANELS = [
    ("diverse", "(a) one-word gated decisions"),
    ("family_a", "(b) Family A tool-call template"),
]
FIG3A_STEM = "fig3a_locality"
EXPERIMENT = "locality"
PRIMARY_SCENARIO = "diverse"


def run_command(model: str, scenario: str) -> str:
    return f"python run.py probe={EXPERIMENT} model={model} scenario={scenario}"


def record_path(results_dir: Path, model: str, scenario: str) -> Path:
    return Path(results_dir) / EXPERIMENT / model / f"{scenario}.json"


# ---------------------------------------------------------------------------------------------------------------------
# Record loading and validation
# ---------------------------------------------------------------------------------------------------------------------
class RecordError(SystemExit):
    """A missing or malformed record: exits non-zero with a message naming the file."""

    # The message is SystemExit's `code`: Python prints it to stderr and exits with status 1.


def _get(rec: dict, path: Path, *keys: str):
    node = rec
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise RecordError(f"malformed record {path}: missing key '{'.'.join(keys[: i + 1])}'")
        node = node[key]
    return node


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _metric(rec: dict, path: Path, key: str) -> dict:
    """Return {'mean', 'lo', 'hi', 'n'} for one aggregate metric, checking its shape; mean/lo/hi are None if n == 0."""
    n = _get(rec, path, "aggregate", key, "n")
    mean = _get(rec, path, "aggregate", key, "mean")
    ci = _get(rec, path, "aggregate", key, "ci")
    where = f"aggregate.{key}"
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RecordError(f"malformed record {path}: '{where}.n' must be a non-negative integer, got {n!r}")
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    if not _is_number(mean):
        raise RecordError(f"malformed record {path}: '{where}.mean' must be a number when n={n}, got {mean!r}")
    if ci is None:  # a CI that could not be computed (e.g. a single cluster): bar without an error bar
        return {"mean": float(mean), "lo": None, "hi": None, "n": n}
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(c) for c in ci)):
        raise RecordError(f"malformed record {path}: '{where}.ci' must be [lo, hi] or null, got {ci!r}")
    lo, hi = float(ci[0]), float(ci[1])
    if lo > hi:
        raise RecordError(f"malformed record {path}: '{where}.ci' has lo > hi: {ci!r}")
    return {"mean": float(mean), "lo": lo, "hi": hi, "n": n}


def load_locality_record(path: Path) -> dict:
    """Read one locality record and reduce it to what Fig. 3a plots. Prints the path it read."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"missing record {path}") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"malformed record {path}: not valid JSON ({err})") from None
    if not isinstance(rec, dict):
        raise RecordError(f"malformed record {path}: top level is not a JSON object")
    print(f"read {path}")
    experiment = _get(rec, path, "experiment")
    if experiment != EXPERIMENT:
        raise RecordError(f"malformed record {path}: 'experiment' is {experiment!r}, expected {EXPERIMENT!r}")
    n_included = _get(rec, path, "summary", "n_included")
    n_gated = _get(rec, path, "summary", "n_gated")   # the denominator: gated pairs (controls are reported apart)
    return {
        "path": path,
        "n_included": n_included,
        "n_gated": n_gated,
        "metrics": {key: _metric(rec, path, key) for key, _, _ in FIG3A_METRICS},
    }


def discover_models(results_dir: Path, models: list[str] | None = None) -> list[str]:
    """The models Fig. 3a shows. Named models must each have a `diverse` record; otherwise every model that has one."""
    base = Path(results_dir) / EXPERIMENT
    if models:
        missing = [m for m in models if not record_path(results_dir, m, PRIMARY_SCENARIO).is_file()]
        if missing:
            lines = [f"missing {PRIMARY_SCENARIO} locality record(s) for Fig. 3a:"]
            for m in missing:
                lines.append(f"  {record_path(results_dir, m, PRIMARY_SCENARIO)}")
                lines.append(f"    produce it with: {run_command(m, PRIMARY_SCENARIO)}")
            raise RecordError("\n".join(lines))
        return list(models)
    found = sorted(p.parent.name for p in base.glob(f"*/{PRIMARY_SCENARIO}.json") if p.is_file())
    if not found:
        raise RecordError(
            f"no locality records found: nothing matches {base / '*' / (PRIMARY_SCENARIO + '.json')}\n"
            f"  produce one with: {run_command('<model>', PRIMARY_SCENARIO)}"
        )
    # Say which model folders are left out, rather than dropping them silently.
    if base.is_dir():
        for d in sorted(p for p in base.iterdir() if p.is_dir() and p.name not in found):
            print(f"note: {d} has no {PRIMARY_SCENARIO}.json, so model '{d.name}' is not in Fig. 3a "
                  f"(run: {run_command(d.name, PRIMARY_SCENARIO)})")
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


def build_fig3a(records: dict[str, dict[str, dict | None]], models: list[str]) -> Figure:
    """Draw Fig. 3a from loaded records: records[scenario][model] is a `load_locality_record` result or None."""
    y_range = locality_y_range(records)
    panel_w = max(3.4, 0.7 + 1.05 * len(models))
    fig = Figure(figsize=(2 * panel_w, 3.3), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.05, h_pad=0.04)
    axes = fig.subplots(1, len(FIG3A_PANELS), sharey=True)
    for ax, (scenario, title) in zip(axes, FIG3A_PANELS):
        ax.set_title(title, loc="left", fontsize=8.5)
        draw_locality_panel(ax, records[scenario], models, y_range)
    axes[0].set_ylabel("decision recovery")
    locality_legend(fig)
    return fig


def load_fig3a_records(results_dir: Path, models: list[str] | None = None) -> tuple[list[str], dict]:
    """Resolve the model list and load every Fig. 3a record; report the records that are missing per panel."""
    models = discover_models(results_dir, models)
    records: dict[str, dict] = {}
    for scenario, title in FIG3A_PANELS:
        records[scenario] = {}
        missing = []
        for model in models:
            path = record_path(results_dir, model, scenario)
            if path.is_file():
                records[scenario][model] = load_locality_record(path)
            else:
                records[scenario][model] = None
                missing.append((model, path))
        if missing:
            print(f"Fig. 3a panel '{title}': {len(missing)} record(s) missing, shown as 'no record':")
            for model, path in missing:
                print(f"  {path}  (run: {run_command(model, scenario)})")
    return models, records


def fig3a(results_dir, out_dir, models=None, return_fig: bool = False):
    """Write fig3a_locality.png (dpi 150) and .pdf into out_dir; return the PNG path (and the Figure if asked)."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    with matplotlib.rc_context(STYLE):
        models, records = load_fig3a_records(results_dir, models)
        fig = build_fig3a(records, models)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / f"{FIG3A_STEM}.png"
        pdf = out_dir / f"{FIG3A_STEM}.pdf"
        fig.savefig(png, dpi=150, bbox_inches="tight")
        print(f"wrote {png}")
        fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None})   # byte-stable PDFs
        print(f"wrote {pdf}")
    return (png, fig) if return_fig else png


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def _parse_models(text: str | None) -> list[str] | None:
    if text is None:
        return None
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise SystemExit("--models was given but names no model (expected a comma-separated list)")
    return models


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Make the figures from the probe records.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"records directory (default: {DEFAULT_RESULTS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every model with a diverse locality record)")
    args = parser.parse_args(argv)
    png = fig3a(args.results, args.out, _parse_models(args.models))
    return [png, png.with_suffix(".pdf")]


if __name__ == "__main__":
    main(sys.argv[1:])
