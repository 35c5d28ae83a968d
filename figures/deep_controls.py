"""Step 6, the deep controls D1-D6 (paper_spec §1.3-§1.5, §3.10-§3.15, §7.3, §7.4, §8 W7-W9, W13): the tables
`tab:deepmech` and `tab:xfamily` and one figure per control, made from records only, with the paper's numbers beside
ours (read from figures/paper_numbers.yaml, never typed here).

    python -m figures.deep_controls [--results DIR] [--out DIR] [--models a,b] [--topk PATH,PATH]

Reads (under --results, default results/; every record through kvnotes.records.load_aggregates / load_index):

  D1  locality/<m>/diverse_trigger.json          trigger-only (its field-only splice), notes (its downstream-only
      decodability/<m>/diverse_trigger.json      splice), full (sanity); LOSO probe accuracies per anchor, the
                                                 samples where the conclusion disagrees with the trigger / field
                                                 value, the logit-lens commit depth (never-committing arms counted),
                                                 the write depth (python run.py -m experiment=deep_d1 model=<m>)
  D2  layers/<m>/diverse_trigger-downstream.json the notes spliced in layers <= l / >= l, beside D1's write and commit
                                                 depths (python run.py experiment=deep_timing model=<m>)
  D3  topk/<m>/diverse_all-map-<layout>-D<D>-Q<q>-K<k>.json, the F->R layouts at the longest D present (and any record
      given with --topk): cross-fitted top-k (primary), in-sample top-k, the matched and the uniform random-k nulls
                                                 (python run.py -m experiment=regime_long probe=topk model=<m>)
  D4  injection/<m>/diverse_all.json             full same-pair injection (sanity), flip / follow rates, the dose over
                                                 k and over fractions of the downstream (cross-fitted, in-sample,
                                                 matched null), notes from another instance / domain
                                                 (python run.py experiment=deep_inject model=<m>)
  D5  locality/<m>/offtemplate_{multihop,rag,natural}.json   field-only / downstream-only / full per task
                                                 (python run.py -m experiment=deep_offtemplate model=<m>)
  D6  locality/<m>/family_c.json, family_c_field_first.json (field-only, full), family_c_trigger.json (trigger-only,
      notes)                                     (python run.py -m experiment=deep_xfamily model=<m>); topk/ and
      injection/<m>/family_c.json (top-8 vs random-8, injection; the same experiment with probe=topk,injection
      scenario=family_c), and top-k, injection or decodability records of the three scenarios where present

Writes (under --out, default figures/): tab_deepmech.{csv,md,tex}, tab_xfamily.{csv,md,tex} (one row per control x
quantity x model x record; the regime R->F / F->R from the record's own layout; the paper's numbers in one column
per paper model; rows true by construction labelled "sanity check (by construction)"; paper rows no record of ours
matches are kept, with the reason), and fig_d1_dissociation, fig_d2_timing, fig_d3_specificity, fig_d4_injection,
fig_d5_offtemplate, fig_d6_xfamily, each .png, .pdf and a .csv / .md of exactly the numbers it plots.

Models: those named with --models, else every model with any step-6 record (a registered model without one is
named with the commands that make its records). A missing record is printed with its path and the command that
makes it, never dropped silently; a figure with no record at all is skipped with a message. A malformed record raises
RecordError (the command line exits with its message).
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from figures.circuit import layout_of  # noqa: E402
from figures.fig3 import _band, _draw_topk, _save, keys_under, rows_of, topk_table  # noqa: E402
from figures.make_figures import (DEFAULT_OUT, DEFAULT_RESULTS, INK, STYLE, WONG, _parse_list,  # noqa: E402
                                  draw_locality_panel, latex_table, load_locality_record, locality_legend,
                                  locality_y_range, record_order, write_table)
from kvnotes.records import (RecordError, load_aggregates, load_index, read_record, record_path,  # noqa: E402
                             plain_value, registered_models, repo_relative, run_command)

PAPER_NUMBERS = Path(__file__).resolve().parent / "paper_numbers.yaml"
SANITY = "sanity check (by construction)"

# -- where the records are and the commands that make them -------------------------------------------------------
TRIGGER = "diverse_trigger"                  # configs/experiment/deep_d1.yaml, deep_timing.yaml
TIMING_TAG = "downstream"                    # deep_timing.yaml's tag
INJECT = "diverse_all"                       # deep_inject.yaml
MAP_SCENARIO, MAP_PREFIX = "diverse_all", "map-"   # regime_long.yaml: tag map-<layout>-D<n>-Q<q>-K<k>
OFFTEMPLATE = {"offtemplate_multihop": "d5_multihop_field_only", "offtemplate_rag": "d5_rag_field_only",
               "offtemplate_natural": "d5_natural_field_only"}   # scenario -> its paper row
XFAMILY = ("family_c", "family_c_field_first")   # Family C field pairs, in the paper's order and field first
XFAMILY_TRIGGER = "family_c_trigger"            # its trigger (dissociation) pairs; all three: experiment=deep_xfamily
XFAMILY_EXTRA = "family_c"                      # where deep_xfamily.yaml runs top-k and injection (S, I)

COMMANDS = {
    "D1": "python run.py -m experiment=deep_d1 model={model}",
    "D2": "python run.py experiment=deep_timing model={model}",
    "D3": "python run.py -m experiment=regime_long probe=topk model={model}",
    "D4": "python run.py experiment=deep_inject model={model}",
    "D5": "python run.py -m experiment=deep_offtemplate model={model}",
    "D6": "python run.py -m experiment=deep_xfamily model={model}",
    "D6 S, I": "python run.py -m experiment=deep_xfamily model={model} probe=topk,injection scenario={scenario}",
}
D3_NEEDS = "python run.py -m experiment=regime_map model={model}"   # the map cells regime_long takes its pairs from
CONTRAST = "rule_first"   # tag of D1's and D4's R->F contrast records (the same experiment, the rule first); their
                          # rows carry the record's own regime and no paper column (the paper's numbers are F->R)


def _command(control: str, model: str, tag: str | None) -> str:
    """The command that makes `control`'s record of `model`: the contrast (tag CONTRAST) adds the rule-first layout."""
    cmd = COMMANDS[control].format(model=model)
    return cmd if tag is None else f"{cmd} scenario.params.layout=rule_first tag={tag}"


STEP6_RECORDS = [   # (probe, scenario, tag) of the fixed-name step-6 records; D3's map cells are found by name
    ("locality", TRIGGER, None), ("decodability", TRIGGER, None), ("layers", TRIGGER, TIMING_TAG),
    ("injection", INJECT, None), ("locality", TRIGGER, CONTRAST), ("decodability", TRIGGER, CONTRAST),
    ("injection", INJECT, CONTRAST), *(("locality", s, None) for s in OFFTEMPLATE),
    *((probe, s, None) for s in (*XFAMILY, XFAMILY_TRIGGER) for probe in ("locality", "topk", "injection",
                                                                         "decodability"))]


# -- reading ----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Loaded:
    """One record: its path, JSON, aggregates frame (load_aggregates), index row (load_index) and rule order."""
    path: Path
    rec: dict
    agg: pd.DataFrame
    info: dict
    regime: str | None

    @property
    def model(self) -> str:
        return self.info["model"]

    @property
    def name(self) -> str:
        return self.path.stem


class Reader:
    """Loads each record once (printing the path it read) and reports a missing one, printing its path and the
    command that makes it, every time a table or figure asks for it."""

    def __init__(self, results: Path):
        self.results = Path(results)
        self._cache: dict[Path, Loaded] = {}

    def get(self, probe: str, model: str, scenario: str, tag: str | None, command: str, who: str) -> Loaded | None:
        """The (probe, model, scenario, tag) record, or None after printing '<who>: missing <path> (run: ...)'."""
        path = record_path(self.results, probe, model, scenario, tag)
        if not path.is_file():
            print(f"{who}: missing {path}  (run: {command})")
            return None
        return self.load(path, probe)

    def testable(self, probe: str, model: str, scenario: str, tag: str | None, command: str, who: str) -> Loaded | None:
        """`get`, but None (after saying so) also for a record in which no gated pair is included: a figure has
        nothing of it to draw, and the tables carry its `none_included` row."""
        src = self.get(probe, model, scenario, tag, command, who)
        untestable = none_included(src) if src is not None else None
        if untestable:
            print(f"{who}: {src.path} left out: {untestable}")
            return None
        return src

    @property
    def loaded(self) -> list[Loaded]:
        """The records read so far, in reading order."""
        return list(self._cache.values())

    def load(self, path: Path, probe: str | None = None) -> Loaded:
        """A record by path. Raises RecordError when it is malformed or not a `probe` record."""
        path = Path(path)
        if path not in self._cache:
            rec = read_record(path)
            if probe is not None and rec["experiment"] != probe:
                raise RecordError(f"malformed record {path}: 'experiment' is {rec['experiment']!r}, expected "
                                  f"{probe!r}")
            info = rows_of(load_index(path))[0]
            self._cache[path] = Loaded(path, rec, load_aggregates(path), info, record_order(rec))
            print(f"read {path}")
        return self._cache[path]


def node(agg: pd.DataFrame, metric: str, key: str = "") -> dict | None:
    """One summary node of a record's aggregates (a load_aggregates row) as plain values; None when absent."""
    sub = agg[(agg["metric"] == metric) & (agg["key"] == key)]
    return rows_of(sub)[0] if len(sub) else None


def d3_records(reader: Reader, model: str, extra: list[Path] = ()) -> list[Loaded]:
    """D3's top-k records of `model`: the regime map's F->R cells at the longest filler distance D present
    (topk/<model>/diverse_all-map-*.json, regime_long), one per layout, then the records given in `extra` of this
    model. Prints the command that makes them when there is none (paper_spec §3.12, §8 W8, W9)."""
    chosen = map_far_cells(reader, model, "topk")
    chosen += [r for r in (reader.load(p, "topk") for p in extra)
               if r.model == model and r.path not in {c.path for c in chosen}]
    if not chosen:
        pattern = reader.results / "topk" / model / f"{MAP_SCENARIO}-{MAP_PREFIX}*.json"
        print(f"D3: missing: no F->R top-k record matches {pattern}  (run: {COMMANDS['D3'].format(model=model)}; "
              f"it runs the pairs the regime map's cells included: {D3_NEEDS.format(model=model)})")
    return chosen


def map_far_cells(reader: Reader, model: str, probe: str) -> list[Loaded]:
    """The regime map's F->R cells of `model` at the longest filler distance D present among them
    (<probe>/<model>/diverse_all-map-*.json), sorted by name; [] when there is none."""
    index = load_index(reader.results, probe=probe, model=model, scenario=MAP_SCENARIO) \
        if (reader.results / probe / model).is_dir() else pd.DataFrame()
    found = [reader.load(Path(p), probe) for p, t in zip(index.get("path", []), index.get("tag", []))
             if isinstance(t, str) and t.startswith(MAP_PREFIX)]
    far = [r for r in found if r.regime == "F->R"]
    longest = max((_n_filler(r.rec) for r in far), default=None)
    return sorted((r for r in far if _n_filler(r.rec) == longest), key=lambda r: r.name)


def _n_filler(rec: dict) -> int:
    """The largest filler distance D of a map cell's scenario params (a count or a [lo, hi] range)."""
    d = ((rec.get("config") or {}).get("scenario") or {}).get("params", {}).get("n_filler", 0)
    return max(d) if isinstance(d, list) else int(d or 0)


def discover_models(results: Path) -> list[str]:
    """Every model with any step-6 record under `results` (D1-D6's fixed names and D3's map top-k records), sorted."""
    results = Path(results)
    if not results.is_dir():
        return []
    found = set()
    for probe in ("locality", "decodability", "layers", "injection", "topk"):
        index = load_index(results, probe=probe)
        for _, r in index.iterrows():
            tag = r["tag"] if isinstance(r["tag"], str) else None
            if (probe, r["scenario"], tag) in STEP6_RECORDS or (
                    probe == "topk" and r["scenario"] == MAP_SCENARIO and (tag or "").startswith(MAP_PREFIX)):
                found.add(r["model"])
    return sorted(found)


def note_models_without_records(results: Path, shown: list[str], named: bool) -> None:
    """Print the registered models (configs/model, kind != tiny) left out, with the commands that make their
    step-6 records (or 'not requested' when --models chose others)."""
    left = [m for m in registered_models() if m not in shown]
    if not left:
        return
    print(f"deep controls show {len(shown)} model(s); registered models not shown:")
    for m in left:
        if named:
            print(f"  {m}: not requested (--models)")
            continue
        cmds = [COMMANDS[c].format(model=m) for c in ("D1", "D2", "D3", "D4", "D5", "D6")]
        print(f"  {m}: no step-6 record under {results} (run: " + "; ".join(cmds) + ")")


# -- the paper's numbers ----------------------------------------------------------------------------------------
class PaperNumbersError(ValueError):
    """figures/paper_numbers.yaml is missing, malformed, or lacks a row this script compares with."""


def load_paper_numbers(path: Path = PAPER_NUMBERS) -> dict:
    """figures/paper_numbers.yaml as {table: {"models": [names], "rows": {key: {label, section, n, values:
    {model: value}}}}} for the tables `deepmech` (paper_spec §7.3) and `xfamily` (§7.4). Raises PaperNumbersError
    naming the file, the table and the row when a row lacks key / label / section / values or has a value count
    other than the table's model count."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PaperNumbersError(f"cannot read the paper's numbers {path}: {err}") from None
    out = {}
    for table in ("deepmech", "xfamily"):
        spec = (doc or {}).get(table)
        if not isinstance(spec, dict) or not isinstance(spec.get("models"), list) or not isinstance(
                spec.get("rows"), list):
            raise PaperNumbersError(f"{path}: '{table}' must be a mapping with a 'models' list and a 'rows' list")
        rows = {}
        for i, row in enumerate(spec["rows"]):
            missing = [k for k in ("key", "label", "section", "values") if not isinstance(row, dict) or k not in row]
            if missing:
                raise PaperNumbersError(f"{path}: {table}.rows[{i}] lacks {missing}")
            if len(row["values"]) != len(spec["models"]):
                raise PaperNumbersError(f"{path}: {table}.rows[{i}] ({row['key']}) has {len(row['values'])} values "
                                        f"for {len(spec['models'])} models {spec['models']}: one per model, null "
                                        f"where the spec gives none")
            if row["key"] in rows:
                raise PaperNumbersError(f"{path}: {table} has the key {row['key']!r} twice")
            rows[row["key"]] = {"label": row["label"], "section": row["section"], "n": row.get("n"),
                                "values": dict(zip(spec["models"], row["values"]))}
        out[table] = {"models": list(spec["models"]), "rows": rows}
    return out


def paper_column(name: str) -> str:
    return f"paper: {name}"


# -- table rows -------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ["control", "quantity", "model", "regime", "record_name", "value", "ci_lo", "ci_hi", "n", "G",
                 "p_value", "note", "source_metric", "source_key", "value_field", "record"]


def summary_row(src: Loaded, control: str, quantity: str, metric: str, key: str = "", *, value: str = "mean",
                lo: str | None = "ci_lo", hi: str | None = "ci_hi", n="n", g="n_clusters", p: str | None = None,
                note: str = "", paper: str | None = None) -> dict:
    """One table row read from the summary node (metric, key) of a record's aggregates: value / lo / hi / p are
    fields of that node; n and g are a field of it or (metric, key, field) of another node (e.g. a probe's G is the
    aggregate's n_scenarios). A record without that node gives the row with no value and a note saying so."""
    s = node(src.agg, metric, key)
    untestable = none_included(src)
    if s is None:
        where = metric + (f"/{key}" if key else "")
        return {"control": control, "quantity": quantity, "model": src.model, "regime": src.regime or "n/a",
                "record_name": src.name, "note": untestable or f"not in the record (no aggregate {where})",
                "source_metric": metric, "source_key": key, "record": repo_relative(src.path), "paper_key": paper}

    def field(spec):
        if spec is None:
            return None
        if isinstance(spec, tuple):
            other = node(src.agg, *spec[:2])
            return None if other is None else other.get(spec[2])
        return s.get(spec)

    return {"control": control, "quantity": quantity, "model": src.model, "regime": src.regime or "n/a",
            "record_name": src.name, "value": s.get(value), "ci_lo": field(lo), "ci_hi": field(hi), "n": field(n),
            "G": field(g), "p_value": field(p),
            "note": untestable if s.get(value) is None and untestable else caveats(note, s),
            "source_metric": metric, "source_key": key,
            "value_field": value, "record": repo_relative(src.path), "paper_key": paper}


def caveats(note: str, s: dict) -> str:
    """`note` with what a reader of one summary node must know: a random-draw null's resolution (B null means, each
    of one draw per pair from n_draws per pair) and the record's small-G warning (fewer than 5 clusters)."""
    extra = []
    if s.get("n_draws") and s.get("B"):
        extra.append(f"B = {int(s['B'])} null means, one draw per pair from {int(s['n_draws'])} per pair")
        if s.get("lo") is not None and s.get("lo") == s.get("hi"):
            extra.append("degenerate null (no spread: every draw is the same set): this row tests nothing")
    if s.get("warning") and "fewer than 5" in str(s["warning"]):
        extra.append(f"G = {s.get('n_clusters')} < 5 clusters: interval coverage not guaranteed")
    return "; ".join([note, *extra] if note else extra)


def none_included(src: Loaded) -> str | None:
    """The note of a record in which no gated pair passes the inclusion rule (its summary's n_included is 0): the
    model does not follow the rule there, so the control cannot be measured on it; None otherwise."""
    summary = src.rec.get("summary") or {}
    if summary.get("n_included") != 0 or not summary.get("n_gated"):
        return None
    rule = (src.rec.get("readout") or {}).get("exclusion_rule") or {}
    tau = rule.get("min_abs_delta_m")
    return (f"untestable here: 0 of {summary['n_gated']} gated pairs pass the inclusion rule (decision flips"
            + (f", correctly, abs. Δm ≥ {tau:g}" if tau is not None else "") + ")")


LOCALITY_ROWS = {   # aggregate key -> (quantity, note) for the primary (field-change) pairs
    "field_only_recovery": ("field-only recovery (the field's own K/V)", ""),
    "downstream_only_recovery": ("downstream-only recovery (field stale)", ""),
    "full_downstream_recovery": ("full recovery (field + downstream)", SANITY + ": = the oracle cache"),
}
TRIGGER_ROWS = {    # the same splices on trigger pairs (Family B, Family C's): paper_spec §3.10, §3.15 (D)
    "field_only_recovery": ("trigger-only recovery (the changed trigger word's K/V)", ""),
    "downstream_only_recovery": ("notes recovery (everything after the trigger)", ""),
    "full_downstream_recovery": ("full recovery (trigger + notes)", SANITY + ": = the oracle cache"),
}
TARGETS = ("conclusion", "field_value", "trigger")
CONTROL_KINDS = {   # locality's control scenarios (§1.3) as the tables name them
    "control_same_conclusion": "same-conclusion value swaps",
    "control_channel": "an ungated field changed",
}


def negative_control_rows(src: Loaded, control: str) -> list[dict]:
    """The negative controls of a locality record on trigger pairs (paper_spec §1.3: a value change that keeps the
    conclusion, and a field the rule does not read) beside the gated pairs: abs. Δm (logit-difference units) and the
    rate at which the decision changes, per control kind clustered by domain (the record's control_by_kind; an
    older record has only the pooled control aggregates, clustered by kind, which are shown with a note)."""
    rows = [summary_row(src, control, "abs. Δm of the gated pairs (stale vs oracle: the effect the controls are set "
                                      "against)", "gated_abs_delta_m")]
    kinds = (src.rec.get("aggregate") or {}).get("control_by_kind")
    if kinds is None:
        old = "pooled over the control kinds (G = kinds); re-analyse the record for per-kind rows clustered by domain"
        return rows + [summary_row(src, control, "abs. Δm of the negative controls", "control_abs_delta_m", note=old),
                       summary_row(src, control, "decision change rate of the negative controls",
                                   "control_decision_change_rate", note=old)]
    for kind in kinds:
        words = CONTROL_KINDS.get(kind, kind)
        rows += [summary_row(src, control, f"abs. Δm of the negative controls: {words}", "control_by_kind",
                             f"{kind}/abs_delta_m"),
                 summary_row(src, control, f"decision change rate of the negative controls: {words} (≈ 0 expected; "
                                           f"can fail)", "control_by_kind", f"{kind}/decision_change_rate")]
    return rows


def d1_rows(reader: Reader, models: list[str]) -> list[dict]:
    """tab:deepmech D1 (paper_spec §3.10, §7.3 (i)): trigger-only / notes / full splices (locality on
    diverse_trigger), the LOSO probe accuracies at the decision anchor (best layer, in-sample) and the samples on
    which a reader of the trigger or of the field value gets the conclusion wrong (decodability); then the same from
    the R->F contrast records (tag rule_first) where present, without paper columns."""
    rows = []
    paper = {"field_only_recovery": "d1_trigger_only", "downstream_only_recovery": "d1_notes",
             "full_downstream_recovery": "d1_full"}
    for model, tag in ((m, t) for m in models for t in (None, CONTRAST)):
        cmd = _command("D1", model, tag)
        who = "tab_deepmech D1" + ("" if tag is None else " (R->F contrast)")
        primary = tag is None                                  # paper columns: F->R only
        loc = reader.get("locality", model, TRIGGER, tag, cmd, who)
        if loc is not None:
            rows += locality_rows(loc, "D1", TRIGGER_ROWS, paper if primary else {})
            rows += negative_control_rows(loc, "D1")
        dec = reader.get("decodability", model, TRIGGER, tag, cmd, who)
        if dec is not None:
            rows += d1_probe_rows(dec, "D1", primary)
    return rows


def one_row_if_untestable(what: str):
    """Decorates a rows(src, control, ...) function: a record in which no gated pair is included gives one row
    (`what`, no value, the `none_included` note) in place of a row per quantity, all of them empty."""
    def wrap(fn):
        @functools.wraps(fn)
        def rows(src: Loaded, control: str, *args, **kwargs) -> list[dict]:
            return [untestable_row(src, control, what)] if none_included(src) else fn(src, control, *args, **kwargs)
        return rows
    return wrap


def untestable_row(src: Loaded, control: str, what: str) -> dict:
    """The one row standing for `what` of a record (`src`) in which no gated pair is included: no value, n = G = 0,
    the `none_included` note."""
    return {"control": control, "quantity": f"{what}, {src.name}", "model": src.model, "regime": src.regime or "n/a",
            "record_name": src.name, "value": None, "n": 0, "G": 0, "note": none_included(src),
            "source_metric": "summary", "source_key": "n_included", "value_field": "n_included",
            "record": repo_relative(src.path), "paper_key": None}


@one_row_if_untestable("every probe accuracy and dissociation count (decodability)")
def d1_probe_rows(dec: Loaded, control: str, primary: bool) -> list[dict]:
    """D1's decodability rows: the best-layer LOSO accuracy of each target at the decision anchor with its
    permutation test, and the samples on which a reader of the trigger or of the field value gets the conclusion
    wrong with the conclusion probe's accuracy on them; paper keys only when `primary` (F->R)."""
    rows = []
    g = ("n_scenarios", "", "value")
    not_probed = node(dec.agg, "not_probed") or {}
    for target, key in zip(TARGETS, ("d1_probe_conclusion", "d1_probe_field", None)):
        row = summary_row(dec, control, f"LOSO {target.replace('_', ' ')} probe accuracy, decision anchor (n = arms)",
                          "best_layer", f"decision/{target}", value="accuracy", g=g,
                          paper=key if primary else None)
        best = node(dec.agg, "best_layer", f"decision/{target}")
        row["note"] = (f"best layer {best['layer']} (depth {best['depth']:.2f}), chosen in-sample: descriptive"
                       if best else not_probed.get(target) or row["note"])
        test = probe_null(dec, "decision", target, row["note"])
        if test:
            row.update(p_value=test["p_value"],
                       note=test["note"] + ("" if test["above_chance"] else "; NOT above chance (p >= 0.05)"))
        rows.append(row)
    for other in ("trigger", "field_value"):
        base, words = f"decision/{other}", other.replace("_", " ")
        count = summary_row(dec, control, f"samples on which a {words} reader gets the conclusion wrong (decision "
                            f"anchor)", "dissociation", base, value="n_samples", lo=None, hi=None,
                            n=("n_samples", "", "value"), g="n_scenarios")
        count["note"] = (node(dec.agg, "dissociation", base) or {}).get("relation") or count["note"]
        rows += [count, summary_row(dec, control, f"conclusion probe accuracy on those samples ({words})",
                                    "dissociation", f"{base}/accuracy/conclusion",
                                    note="held out (LOSO) at the probe's best layer")]
    return rows


ANCHOR_LABELS = {   # decodability's anchors (probes/decodability.py) as the tables and figures name them
    "field_line_end": "changed line's end (field_line_end: on trigger pairs the rule line holding the trigger)",
    "downstream_mean": "downstream mean",
    "pre_decision": "token before the decision",
    "decision": "decision token",
}


def anchor_label(anchor: str, short: bool = False) -> str:
    """An anchor's name for a table row (short: for a figure tick): field_line_end is the end of the changing
    span's line, which on trigger pairs is the rule line, not the field's."""
    label = ANCHOR_LABELS.get(anchor, anchor.replace("_", " "))
    return label.split(" (")[0] if short else f"{label} anchor"


def probe_null(dec: Loaded, anchor: str, target: str, note: str) -> dict:
    """The p-value and note of a best-layer probe accuracy against its permutation null (decodability's
    best_layer/<anchor>/<target>/null: the maximum over layers of the LOSO accuracy with the labels permuted within
    scenario, so the in-sample choice of layer is inside the test) and whether it is above chance (p < 0.05); {} when
    the record has no null."""
    null = (((dec.rec.get("aggregate") or {}).get("best_layer") or {}).get(anchor) or {}).get(target, {}).get("null")
    if not null or null.get("p_value") is None:
        return {}
    return {"p_value": null["p_value"], "above_chance": null["p_value"] < 0.05,
            "note": f"{note}; test: the max over layers {','.join(map(str, null['layers']))} = "
                    f"{null['observed']:.2f} vs {null['n_perm']} label permutations within scenario (mean "
                    f"{null['mean']:.2f}, 95th pct {null['p95']:.2f})"}


@one_row_if_untestable("every write / commit depth (decodability)")
def timing_rows(dec: Loaded, control: str, paper: dict, anchors=None) -> list[dict]:
    """The write depth per anchor (first layer whose LOSO conclusion accuracy reaches the record's threshold; all
    anchors, or `anchors`) and the logit-lens commit depth at the decision token with the arms that commit and that
    never commit counted (none dropped) of one decodability record (paper_spec §3.11, §8 W13). `paper` maps "write"
    (the decision anchor's row), "commit" and "commit_n" to paper keys."""
    rows = []
    n, g = ("n_samples", "", "value"), ("n_scenarios", "", "value")
    for anchor in anchors or keys_under(dec.agg, "write_depth"):
        w = node(dec.agg, "write_depth", anchor) or {}
        row = summary_row(dec, control, f"write depth, {anchor_label(anchor)} (LOSO conclusion accuracy >= "
                          f"{w.get('threshold')})", "write_depth", anchor, value="depth", lo=None, hi=None, n=n, g=g,
                          paper=paper.get("write") if anchor == "decision" else None)
        if w:
            row["note"] = ("never reaches the threshold at this anchor" if w.get("depth") is None
                           else f"layer {w['layer']}, accuracy {w['accuracy']:.2f}")
            test = probe_null(dec, anchor, "conclusion", "")
            if test and w.get("depth") is not None:   # the crossing is only as good as the probe behind it
                row["p_value"] = test["p_value"]
                row["note"] += (f"; p = {test['p_value']:.2g}: the best-layer conclusion probe here vs its "
                                f"permutation null" + ("" if test["above_chance"] else ", NOT above chance"))
        if row["paper_key"]:
            row["note"] += (f"; ours: the first layer at >= {w.get('threshold')}, the paper's: where its probe "
                            f"reaches 0.99 (figures/paper_numbers.yaml)")
        rows.append(row)
    arms = {"lo": None, "hi": None, "n": "n_arms", "g": ("commit", "included/rate", "n_clusters")}
    return rows + [
        summary_row(dec, control, "logit-lens commit depth, decision token (mean over committed arms)", "commit",
                    "included/depth", paper=paper.get("commit"), note="arms that never commit are counted, not "
                                                                      "dropped"),
        summary_row(dec, control, "arms that commit (value) of n arms", "commit", "included", value="n_committed",
                    paper=paper.get("commit_n"), **arms),
        summary_row(dec, control, "commit rate", "commit", "included/rate"),
        summary_row(dec, control, "arms that never commit (value) of n arms", "commit", "included", value="n_never",
                    **arms)]


def d2_rows(reader: Reader, models: list[str]) -> list[dict]:
    """tab:deepmech D2 (paper_spec §3.11, §7.3 (ii), §8 W13): `timing_rows` of decodability on diverse_trigger."""
    rows = []
    paper = {"write": "d2_decision_probe_depth", "commit": "d2_commit_depth", "commit_n": "d2_commit_n"}
    for model in models:
        dec = reader.get("decodability", model, TRIGGER, None, COMMANDS["D1"].format(model=model), "tab_deepmech D2")
        if dec is not None:
            rows += timing_rows(dec, "D2", paper)
        lay = reader.get("layers", model, TRIGGER, TIMING_TAG, COMMANDS["D2"].format(model=model), "tab_deepmech D2")
        if lay is not None:
            rows += causal_timing_rows(lay, "D2")
    return rows


@one_row_if_untestable("notes spliced by layer, upto / from (layers)")
def causal_timing_rows(lay: Loaded, control: str) -> list[dict]:
    """D2's causal test (paper_spec §3.11, §8 W13) from a layers record with positions=downstream: the recovery
    when only the notes [b, dpos) are spliced in blocks <= l (upto) and in blocks >= l (from), at l = 0, L/4, L/2,
    3L/4 and L - 1 of L blocks. Notes written early and read late show upto rising only at late l while from stays
    high until late l; upto[L - 1] = from[0] = locality's notes-only splice."""
    n_layers = lay.info.get("n_layers") or (lay.rec.get("summary") or {}).get("n_layers")
    if not n_layers:
        return [summary_row(lay, control, "notes spliced by layer", "upto_by_layer", "0")]   # says it is absent
    layers = sorted({0, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
    rows = [summary_row(lay, control, f"notes spliced in blocks {op} {li} (depth {li / n_layers:.2f}): recovery",
                        curve, str(li)) for curve, op in (("upto_by_layer", "<="), ("from_by_layer", ">="))
            for li in layers]
    agg = lay.rec.get("aggregate") or {}
    upto = [s.get("mean") for s in agg.get("upto_by_layer") or []]
    frm = [s.get("mean") for s in agg.get("from_by_layer") or []]
    if upto and frm and None not in upto + frm and upto[-1] > 0:
        half = upto[-1] / 2      # half of the all-layer notes splice (upto[L - 1] = from[0])
        rise = next(li for li, v in enumerate(upto) if v >= half)
        fall = next((li for li, v in enumerate(frm) if v < half), n_layers)
        n, g = agg["upto_by_layer"][rise]["n"], agg["upto_by_layer"][rise]["n_clusters"]
        for quantity, li in ((f"first block l with upto[l] >= half the all-layer notes splice ({half:.2f})", rise),
                             (f"first block l with from[l] < that half", fall)):
            rows.append({"control": control, "quantity": quantity + " (depth of l)", "model": lay.model,
                         "regime": lay.regime or "n/a", "record_name": lay.name, "value": li / n_layers,
                         "n": n, "G": g, "note": f"block {li}; descriptive, read off the mean curves (no interval)",
                         "source_metric": "upto_by_layer" if li == rise else "from_by_layer", "source_key": str(li),
                         "value_field": "crossing", "record": repo_relative(lay.path), "paper_key": None})
    return rows


D3_KS = ("8", "16")   # the k of tab:deepmech (iii)
D3_FRACS = ("0.02", "0.05")   # k as a share of each pair's downstream (probes/topk.py TOPK_FRACS)


@one_row_if_untestable("every top-k quantity (topk)")
def topk_rows(src: Loaded, control: str, ks=D3_KS, paper: dict | None = None, fracs=()) -> list[dict]:
    """Top-k rows of one topk record (paper_spec §3.12, §8 W8, W9): cross-fitted top-k (primary), in-sample top-k
    (the paper's ranking), the uniform random-k null (the paper's kind of null) and the matched one (median and 95 %
    band; p = P(null >= cross-fitted top-k)), and the downstream length; then the same with k the share f of each
    pair's downstream for f in `fracs` (topk_*_frac). `paper` maps (kind, k) to paper keys."""
    paper = paper or {}
    rows = [summary_row(src, control, "downstream tokens (mean)", "n_down")]
    for k in ks:
        g = ("topk_in", k, "n_clusters")   # the pairs every set of this k is drawn on
        rows += [summary_row(src, control, f"top-{k} recovery, cross-fitted (ranked on the other domains)", "topk_cf",
                             k, note="primary", paper=paper.get(("cf", k))),
                 summary_row(src, control, f"top-{k} recovery, ranked in-sample", "topk_in", k,
                             note="the paper's ranking", paper=paper.get(("in", k))),
                 summary_row(src, control, f"random-{k}, uniform null (median, 95 % band)", "null_uniform", k,
                             value="median", lo="lo", hi="hi", g=g, p="p_topk_cf_ge_null",
                             note="unmatched draws, the paper's kind of null; p: null >= cross-fitted top-k",
                             paper=paper.get(("uniform", k))),
                 summary_row(src, control, f"random-{k}, matched null (median, 95 % band)", "null_matched", k,
                             value="median", lo="lo", hi="hi", g=g, p="p_topk_cf_ge_null",
                             note="matched on the fine-label mix; p: null >= cross-fitted top-k",
                             paper=paper.get(("matched", k)))]
    if not fracs:
        return rows
    if "topk_cf_frac" not in (src.rec.get("aggregate") or {}):
        return rows + [{**summary_row(src, control, "top-k as a share of the downstream", "topk_cf_frac"),
                        "note": "not in this record (made before probes/topk.py measured shares): re-run it"}]
    for f in fracs:
        share = f"{float(f):.0%} of the downstream"
        g = ("topk_in_frac", f, "n_clusters")
        rows += [summary_row(src, control, f"top {share}, cross-fitted", "topk_cf_frac", f, note="primary"),
                 summary_row(src, control, f"top {share}, ranked in-sample", "topk_in_frac", f),
                 summary_row(src, control, f"random {share}, matched null (median, 95 % band)", "null_matched_frac",
                             f, value="median", lo="lo", hi="hi", g=g, p="p_topk_cf_ge_null",
                             note="matched on the fine-label mix; p: null >= cross-fitted top share")]
    return rows


def d3_rows(reader: Reader, models: list[str], extra: list[Path] = ()) -> list[dict]:
    """tab:deepmech D3 (paper_spec §3.12, §7.3 (iii)) from each model's D3 top-k records (`d3_records`)."""
    paper = {("in", "8"): "d3_top8", ("uniform", "8"): "d3_rand8", ("in", "16"): "d3_top16",
             ("uniform", "16"): "d3_rand16"}
    rows = []
    for m in models:
        found = d3_records(reader, m, extra)
        for src in found:   # a map cell's rows name its layout (the README shows no record column)
            tag = src.info.get("tag")
            layout = layout_of(tag) if isinstance(tag, str) and tag.startswith(MAP_PREFIX) else src.name
            rows += [{**r, "quantity": f"{layout}: {r['quantity']}"}
                     for r in topk_rows(src, "D3", paper=paper, fracs=D3_FRACS)]
        if not found:   # a model that follows no F->R rule: the map's locality cells say so, and D3 cannot run
            rows += [{**(row := untestable_row(cell, "D3", "every top-k quantity (no topk record)")),
                      "note": f"{row['note']}: the map's locality cell; no top-k run"}
                     for cell in map_far_cells(reader, m, "locality") if none_included(cell)]
    return rows


D4_KS = ("1", "4", "8", "32")   # the dose points of tab:deepmech (iv)
DONORS = {"instance": "another instance of the same domain", "domain": "another domain"}


@one_row_if_untestable("every injection quantity (injection)")
def injection_rows(src: Loaded, control: str, paper: dict, ks=D4_KS) -> list[dict]:
    """Rows of one injection record (paper_spec §3.13, §8 W7, W8), both directions pooled (n counts each pair
    twice): full same-pair injection (sanity: = 1 - the mirrored field-only recovery), its flip and follow rates,
    the dose at `ks` (cross-fitted primary, in-sample as the paper, the matched null), and notes from other donors.
    `paper` maps row names to paper keys."""
    both = "both (n = pairs x 2 directions)"
    rows = [summary_row(src, control, f"full injection recovery, {both}", "full", "both/recovery",
                        note=SANITY + ": = 1 - the mirrored field-only recovery", paper=paper.get("full")),
            summary_row(src, control, "full injection flip rate", "full", "both/flip_rate", paper=paper.get("flip")),
            summary_row(src, control, "full injection follow rate", "full", "both/follows_injected_rate",
                        paper=paper.get("follow"), note="with a two-way readout the same event as a flip: not "
                                                        "separate evidence")]
    for k in ks:
        rows += [summary_row(src, control, f"dose k = {k}, cross-fitted top-k", "dose", f"both/topk_cf/k/{k}/recovery",
                             note="primary"),
                 summary_row(src, control, f"dose k = {k}, in-sample top-k", "dose", f"both/topk_in/k/{k}/recovery",
                             note="the paper's ranking", paper=paper.get(f"dose_{k}")),
                 summary_row(src, control, f"dose k = {k}, matched random-k null (median, 95 % band)", "dose",
                             f"both/null_matched/k/{k}", value="median", lo="lo", hi="hi",
                             g=("dose", f"both/topk_in/k/{k}/recovery", "n_clusters"), p="p_topk_cf_ge_null",
                             note="p: null >= cross-fitted top-k")]
    for kind, words in DONORS.items():
        rows += [summary_row(src, control, f"notes from {words}: recovery", "donors", f"{kind}/both/recovery",
                             note="keys RoPE-repositioned"),
                 summary_row(src, control, f"notes from {words}: follow rate", "donors",
                             f"{kind}/both/follows_injected_rate")]
    return rows


def d4_rows(reader: Reader, models: list[str]) -> list[dict]:
    """tab:deepmech D4 (paper_spec §3.13, §7.3 (iv)) from injection/<model>/diverse_all.json (F->R) and, where
    present, its R->F contrast diverse_all-rule_first.json (no paper column)."""
    paper = {"full": "d4_full_injection", "flip": "d4_flip_rate", "follow": "d4_follow_rate",
             **{f"dose_{k}": f"d4_dose_k{k}" for k in D4_KS}}
    rows = []
    for model, tag in ((m, t) for m in models for t in (None, CONTRAST)):
        cmd = _command("D4", model, tag)
        src = reader.get("injection", model, INJECT, tag, cmd, "tab_deepmech D4" + (" (R->F contrast)" if tag else ""))
        if src is not None:
            rows += injection_rows(src, "D4", paper if tag is None else {})   # paper columns: F->R only
    return rows


@one_row_if_untestable("every splice recovery (locality)")
def locality_rows(src: Loaded, control: str, quantities: dict, paper: dict) -> list[dict]:
    """The field-only / downstream-only / full rows of one locality record (`quantities`: aggregate key ->
    (quantity, note)); `paper` maps aggregate keys to paper keys."""
    rows = [summary_row(src, control, q, m, note=nt, paper=paper.get(m)) for m, (q, nt) in quantities.items()]
    return rows


def d5_rows(reader: Reader, models: list[str]) -> list[dict]:
    """tab:deepmech D5 (paper_spec §3.14, §7.3): the locality splices per off-template task."""
    rows = []
    for scenario, key in OFFTEMPLATE.items():
        for model in models:
            src = reader.get("locality", model, scenario, None, COMMANDS["D5"].format(model=model),
                             "tab_deepmech D5")
            if src is not None:
                quantities = {m: (f"{scenario}: {q}", nt) for m, (q, nt) in LOCALITY_ROWS.items()}
                rows += locality_rows(src, "D5", quantities, {"field_only_recovery": key})
    return rows


def d6_rows(reader: Reader, models: list[str]) -> list[dict]:
    """tab:xfamily (paper_spec §3.15, §7.4) from experiment=deep_xfamily's records: Family C's field pairs in both
    rule orders (P: field-only, downstream-only, full), its trigger pairs (D: trigger-only, notes, full), the top-k
    and injection records of family_c (S, I) and, where present, top-k, injection and decodability (T: write depth
    at the decision anchor, commit depth) records of the three scenarios."""
    rows, who = [], "tab_xfamily"
    for model in models:
        cmd = COMMANDS["D6"].format(model=model)
        for scenario in XFAMILY:   # the paper's numbers beside its own order only (family_c: the rule first)
            src = reader.get("locality", model, scenario, None, cmd, who)
            if src is not None:
                rows += locality_rows(src, "D6", LOCALITY_ROWS, {"field_only_recovery": "field_only",
                                                                 "full_downstream_recovery": "full"}
                                      if scenario == XFAMILY_EXTRA else {})
        src = reader.get("locality", model, XFAMILY_TRIGGER, None, cmd, who)
        if src is not None:
            rows += locality_rows(src, "D6", TRIGGER_ROWS, {"field_only_recovery": "trigger_only",
                                                            "downstream_only_recovery": "notes"})
        for scenario in (*XFAMILY, XFAMILY_TRIGGER):
            extra = COMMANDS["D6 S, I"].format(model=model, scenario=scenario)
            loc_path = record_path(reader.results, "locality", model, scenario)
            loc = reader.load(loc_path, "locality") if loc_path.is_file() else None   # read above: cached
            for probe, command in (("topk", extra), ("injection", extra),
                                   ("decodability", run_command("decodability", model, scenario))):
                expected = scenario == (XFAMILY_TRIGGER if probe == "decodability" else XFAMILY_EXTRA)
                present = record_path(reader.results, probe, model, scenario).is_file()
                if expected and not present and loc is not None and none_included(loc):
                    # nothing for the probe to run on (pairs_from writes no record): the locality record says why
                    rows.append(untestable_row(loc, "D6", f"every {probe} quantity (not run: no included pair)"))
                elif expected or present:
                    src = reader.get(probe, model, scenario, None, command, who)   # reports family_c's if missing
                    if src is not None:
                        rows += XFAMILY_PROBE_ROWS[probe](src)
    return rows


XFAMILY_PROBE_ROWS = {   # probe -> the tab:xfamily rows of one record of it
    "topk": lambda src: topk_rows(src, "D6", ks=("8",), paper={("in", "8"): "top8", ("uniform", "8"): "rand8"}),
    "injection": lambda src: injection_rows(src, "D6", {"full": "inject_recovery", "follow": "inject_follow"},
                                            ks=("8",)),
    "decodability": lambda src: timing_rows(src, "D6", {"write": "write_depth", "commit": "commit_depth"},
                                            anchors=("decision",)),
}


UNMATCHED = {   # paper rows no record of ours can match, and why
    "d2_write_depth_lets_check": "the paper's aggregator anchor (end of 'before acting.'); our records' anchors are "
                                 "the changed line's end, the downstream mean, the token before the decision and the "
                                 "decision token",
    "d2_write_depth_task_hdr": "the paper's aggregator anchor (end of 'Next action:'); our records' anchors are "
                               "the changed line's end, the downstream mean, the token before the decision and the "
                               "decision token",
}


def with_paper(rows: list[dict], paper: dict, control_of, order: list[str]) -> pd.DataFrame:
    """The table: our rows, then for each control the paper rows none of ours matched (value empty, the reason in
    the note), with the paper's section, n and one column per paper model. `control_of(key)` is a paper key's
    control; `order` the controls' order. Raises PaperNumbersError for a paper key the yaml does not have."""
    used = {r["paper_key"] for r in rows if r.get("paper_key")}
    unknown = sorted(used - set(paper["rows"]))
    if unknown:
        raise PaperNumbersError(f"{PAPER_NUMBERS} has no row {unknown}: add it (key, label, section, n, values) or "
                                f"drop its use in figures/deep_controls.py")
    out = []
    for control in order:
        out += [r for r in rows if r["control"] == control]
        for key, spec in paper["rows"].items():
            if control_of(key) == control and key not in used:
                why = UNMATCHED.get(key, "no record of ours under the results directory (see the missing records "
                                         "printed above)")
                out.append({"control": control, "quantity": spec["label"], "model": "", "regime": "",
                            "note": f"paper only: {why}", "paper_key": key})
    table = pd.DataFrame(out, columns=[*TABLE_COLUMNS, "paper_key"], dtype=object)   # object: counts stay ints
    keys = table["paper_key"]
    table["paper_section"] = [paper["rows"][k]["section"] if isinstance(k, str) else None for k in keys]
    table["paper_n"] = [paper["rows"][k]["n"] if isinstance(k, str) else None for k in keys]
    for name in paper["models"]:
        table[paper_column(name)] = [paper["rows"][k]["values"][name] if isinstance(k, str) else None for k in keys]
    return table


def deepmech_table(reader: Reader, models: list[str], paper: dict, extra_topk: list[Path] = ()) -> pd.DataFrame:
    """tab:deepmech (paper_spec §7.3, §6.6): D1-D5 rows of every model, paper columns from paper_numbers.yaml."""
    rows = (d1_rows(reader, models) + d2_rows(reader, models) + d3_rows(reader, models, extra_topk)
            + d4_rows(reader, models) + d5_rows(reader, models))
    return with_paper(rows, paper["deepmech"], lambda key: key[:2].upper(), ["D1", "D2", "D3", "D4", "D5"])


def xfamily_table(reader: Reader, models: list[str], paper: dict) -> pd.DataFrame:
    """tab:xfamily (paper_spec §7.4, §6.6): D6 rows of every model, paper columns from paper_numbers.yaml."""
    return with_paper(d6_rows(reader, models), paper["xfamily"], lambda key: "D6", ["D6"])


def tex_view(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a paper table shows: ours as 'value [lo, hi]', n, G, and the paper's columns."""
    def fmt(r):
        v = r["value"]
        if v is None or v != v:
            return ""
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        lo, hi = r["ci_lo"], r["ci_hi"]
        return text if lo is None or lo != lo else f"{text} [{lo:.3f}, {hi:.3f}]"
    paper_cols = [c for c in table.columns if c.startswith("paper: ")]
    view = table[["control", "quantity", "model", "regime", "record_name"]].copy()
    view["ours [95% CI]"] = [fmt(r) for r in table.to_dict("records")]
    view["n"], view["G"], view["note"] = table["n"], table["G"], table["note"]
    for c in paper_cols:
        view[c] = table[c]
    return view


def write_tex(out: Path, stem: str, table: pd.DataFrame) -> Path:
    """`<stem>.tex` (a LaTeX tabular via pandas) of `tex_view(table)`."""
    path = Path(out) / f"{stem}.tex"
    view = tex_view(table)
    wide = {"quantity": "p{5cm}", "note": "p{5.5cm}", "record_name": "p{3cm}"}
    path.write_text(latex_table(view, "".join(wide.get(c, "l") for c in view.columns)))
    print(f"wrote {path}")
    return path


def write_tables(reader: Reader, out: Path, models: list[str], paper: dict, extra_topk: list[Path] = ()) -> list[Path]:
    """tab_deepmech and tab_xfamily as .csv, .md (figures.make_figures.write_table) and .tex."""
    written = []
    for stem, table in (("tab_deepmech", deepmech_table(reader, models, paper, extra_topk)),
                        ("tab_xfamily", xfamily_table(reader, models, paper))):
        write_table(out, stem, table)
        written += [out / f"{stem}.csv", out / f"{stem}.md", write_tex(out, stem, table)]
    return written


# -- figures ----------------------------------------------------------------------------------------------------
PRIMARY_BARS = [("field_only_recovery", "field-only", WONG["red"]),
                ("downstream_only_recovery", "downstream-only (field stale)", WONG["purple"]),
                ("full_downstream_recovery", "full (sanity: =1 by construction)", WONG["green"])]
TRIGGER_BARS = [("field_only_recovery", "trigger-only (the changed trigger word)", WONG["orange"]),
                ("downstream_only_recovery", "notes (everything after the trigger)", WONG["blue"]),
                ("full_downstream_recovery", "full (sanity: =1 by construction)", WONG["green"])]
LOCALITY_HEADER = ["model", "regime", "record_name", "panel", "metric", "label", "mean", "lo", "hi", "n", "G",
                   "n_included", "n_gated"]


def _locality_panel_rows(path: Path, bars, panel: str) -> tuple[dict, list[dict]]:
    """A locality record for draw_locality_panel (figures.make_figures.load_locality_record) and its table rows
    (with G = n_clusters and the regime, from the record)."""
    loaded = load_locality_record(path, bars)
    agg = load_aggregates(path, metric=[k for k, _, _ in bars])
    agg = agg[agg["key"] == ""].set_index("metric")
    regime = record_order(read_record(path)) or "n/a"
    rows = [{"model": agg["model"].iloc[0], "regime": regime, "record_name": Path(path).stem, "panel": panel,
             "metric": key, "label": label, **loaded["metrics"][key], "G": rows_of(agg.loc[[key]])[0]["n_clusters"],
             "n_included": loaded["n_included"], "n_gated": loaded["n_gated"]} for key, label, _ in bars]
    return loaded, rows


def locality_figure(results: Path, out: Path, models: list[str], panels: list[tuple], stem: str,
                    who: str) -> Path | None:
    """Grouped locality bars (figures.make_figures.draw_locality_panel), one panel per (scenario, tag, bars,
    command(model)) in `panels`, one group per model. Missing records are printed with their command; a panel no
    model has is left out, and a figure no panel has is skipped (None)."""
    drawn, table = [], []
    for scenario, tag, bars, command in panels:
        per_model = {}
        for model in models:
            path = record_path(results, "locality", model, scenario, tag)
            if not path.is_file():
                print(f"{who}: missing {path}  (run: {command(model)})")
                continue
            name = path.stem
            per_model[model], rows = _locality_panel_rows(path, bars, name)
            table += rows
        if per_model:
            drawn.append((scenario, tag, bars, per_model))
    if not drawn:
        print(f"skipped {stem}: no record to draw (the missing records and their commands are listed above)")
        return None
    shown = [m for m in models if any(m in pm for *_, pm in drawn)]
    y_range = locality_y_range({i: pm for i, (*_, pm) in enumerate(drawn)})
    width = max(3.2, 0.7 + 1.0 * len(shown))
    fig = Figure(figsize=(width * len(drawn), 3.3), layout="constrained")
    axes = fig.subplots(1, len(drawn), sharey=True, squeeze=False)[0]
    for i, (ax, (scenario, tag, bars, per_model)) in enumerate(zip(axes, drawn)):
        regimes = sorted({r["regime"] for r in table if r["record_name"] == (f"{scenario}-{tag}" if tag else scenario)})
        ax.set_title(f"({chr(97 + i)}) {scenario}{f' [{tag}]' if tag else ''}, {'/'.join(regimes)}", fontsize=8)
        draw_locality_panel(ax, per_model, shown, y_range, bars)
    axes[0].set_ylabel("decision recovery")
    seen, legend = set(), []
    for *_, bars, _ in drawn:
        legend += [b for b in bars if b[1] not in seen and not seen.add(b[1])]
    locality_legend(fig, legend, ncol=min(3, len(legend)))
    write_table(out, stem, pd.DataFrame(table, columns=LOCALITY_HEADER))
    return _save(fig, out, stem)


D1_HEADER = ["model", "regime", "panel", "anchor", "series", "layer", "depth", "value", "lo", "hi", "n", "G"]


def d1_probe_table(model: str, dec: Loaded) -> pd.DataFrame:
    """D1's probe numbers: per anchor, each probed target's best-layer LOSO accuracy (n = arms, G = scenarios), and
    per other target the disagreeing samples (count) and the conclusion probe's accuracy on them."""
    rows = []
    g = node(dec.agg, "n_scenarios")["value"]
    for anchor in keys_under(dec.agg, "best_layer"):
        for target in TARGETS:
            s = node(dec.agg, "best_layer", f"{anchor}/{target}")
            if s is not None:
                rows.append([model, dec.regime, "probe", anchor, target, s["layer"], s["depth"], s["accuracy"],
                             s["ci_lo"], s["ci_hi"], s["n"], g])
        for other in ("trigger", "field_value"):
            d = node(dec.agg, "dissociation", f"{anchor}/{other}")
            if d is None:
                continue
            rows.append([model, dec.regime, "dissociation", anchor, f"samples a {other} reader gets wrong", None,
                         None, d["n_samples"], None, None, node(dec.agg, "n_samples")["value"], d["n_scenarios"]])
            a = node(dec.agg, "dissociation", f"{anchor}/{other}/accuracy/conclusion")
            if a is not None:
                rows.append([model, dec.regime, "dissociation", anchor, f"conclusion accuracy | {other} reader wrong",
                             a.get("layer"), None, a["mean"], a["ci_lo"], a["ci_hi"], a["n"], a["n_clusters"]])
    return pd.DataFrame(rows, columns=D1_HEADER)


def _yerr(means, los, his):
    """Error-bar lengths [[below], [above]] of means with intervals (0 where an interval is missing)."""
    means, los, his = (list(map(plain_value, v)) for v in (means, los, his))
    return [[m - lo if lo is not None else 0.0 for m, lo in zip(means, los)],
            [hi - m if hi is not None else 0.0 for m, hi in zip(means, his)]]


def _draw_probes(ax, table: pd.DataFrame) -> None:
    """Best-layer accuracy bars per anchor and target, with the conclusion accuracy on the disagreeing samples as
    hollow markers (n beside them)."""
    anchors = list(pd.unique(table["anchor"]))
    colors = {"conclusion": WONG["blue"], "field_value": WONG["orange"], "trigger": WONG["purple"]}
    probe = table[table["panel"] == "probe"]
    targets = [t for t in TARGETS if t in set(probe["series"])]
    width = 0.8 / max(1, len(targets))
    for ti, target in enumerate(targets):
        sub = probe[probe["series"] == target].set_index("anchor").reindex(anchors)
        x = [i - 0.4 + width * (ti + 0.5) for i in range(len(anchors))]
        ax.bar(x, sub["value"].tolist(), width=width, color=colors[target], edgecolor="white",
               label=target.replace("_", " "), yerr=_yerr(sub["value"], sub["lo"], sub["hi"]), capsize=1.5,
               ecolor=INK)
    for oi, (other, marker) in enumerate((("trigger", "D"), ("field_value", "s"))):
        sub = table[table["series"] == f"conclusion accuracy | {other} reader wrong"]
        for r in rows_of(sub):
            x = anchors.index(r["anchor"]) + 0.42 + 0.08 * oi
            ax.errorbar([x], [r["value"]], yerr=_yerr([r["value"]], [r["lo"]], [r["hi"]]), fmt=marker,
                        mfc="white", mec=INK, ecolor=INK, ms=3.5, capsize=1.5,
                        label=f"conclusion acc. where a {other.replace('_', ' ')} reader is wrong"
                        if r["anchor"] == anchors[0] else None)
            ax.text(x, (r["hi"] if r["hi"] is not None else r["value"]) + 0.02, f"n={r['n']}", fontsize=5,
                    ha="center", rotation=90)
    ax.axhline(0.5, color=INK, lw=0.7, ls=":")
    ax.set_xticks(range(len(anchors)))
    ax.set_xticklabels([anchor_label(a, short=True) for a in anchors], fontsize=6.5)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("LOSO accuracy, best layer")
    ax.legend(fontsize=5.5, loc="upper left", ncol=2)


def fig_d1(reader: Reader, out: Path, models: list[str]) -> Path | None:
    """fig_d1_dissociation (paper_spec §3.10, §7.3 (i), §8 W7): per model, the trigger-only / notes / full splices
    (locality on diverse_trigger) and the probe accuracies per anchor with the disagreeing samples
    (decodability on diverse_trigger). None (skipped, with a message) when no model has either record."""
    stem, rows, panels = "fig_d1_dissociation", [], []
    for model in models:
        cmd = COMMANDS["D1"].format(model=model)
        loc = reader.testable("locality", model, TRIGGER, None, cmd, stem)
        dec = reader.testable("decodability", model, TRIGGER, None, cmd, stem)
        if loc is None and dec is None:
            continue
        splices = None
        if loc is not None:
            splices, loc_rows = _locality_panel_rows(loc.path, TRIGGER_BARS, "splices")
            rows += [[model, r["regime"], "splices", "", r["label"], None, None, r["mean"], r["lo"], r["hi"], r["n"],
                      r["G"]] for r in loc_rows]
        probes = d1_probe_table(model, dec) if dec is not None else None
        if probes is not None:
            rows += probes.values.tolist()
        panels.append((model, splices, probes, dec))
    if not panels:
        print(f"skipped {stem}: no D1 record (run: {COMMANDS['D1'].format(model='<model>')})")
        return None
    fig = Figure(figsize=(7.2, 2.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False, width_ratios=[1, 2.2])
    for (ax_s, ax_p), (model, splices, probes, dec) in zip(axes, panels):
        per_model = {model: splices}
        draw_locality_panel(ax_s, per_model, [model], locality_y_range({0: per_model}), TRIGGER_BARS)
        ax_s.set_title(f"(a) splices on trigger pairs, {model}", fontsize=7.5)
        ax_s.set_ylabel("decision recovery")
        if probes is None:
            ax_p.text(0.5, 0.5, "no decodability record", ha="center", va="center", transform=ax_p.transAxes,
                      style="italic", color=WONG["grey"])
            continue
        _draw_probes(ax_p, probes)
        n, g = node(dec.agg, "n_samples")["value"], node(dec.agg, "n_scenarios")["value"]
        ax_p.set_title(f"(b) what the residuals encode, {model}, {dec.regime} ({n} arms, G={g}; best layer "
                       f"chosen in-sample)", fontsize=7.5)
    locality_legend(fig, TRIGGER_BARS, ncol=3)
    write_table(out, stem, pd.DataFrame(rows, columns=D1_HEADER))
    return _save(fig, out, stem)


D2_HEADER = ["model", "regime", "series", "layer", "depth", "depth_lo", "depth_hi", "value", "lo", "hi", "n", "G"]


def d2_table(model: str, lay: Loaded | None, dec: Loaded | None) -> pd.DataFrame:
    """D2's plotted numbers: the notes-only layer curves (upto / from: recovery per block l, at depth l / n_layers,
    block l's K/V being computed from hidden_states[l]) and the decodability write depths per anchor and the mean
    commit depth (with its CI) on the same depth axis."""
    rows = []
    if lay is not None:
        n_layers = lay.info["n_layers"]
        for curve, label in (("upto_by_layer", "notes spliced in layers <= l"),
                             ("from_by_layer", "notes spliced in layers >= l")):
            for layer in keys_under(lay.agg, curve):
                s = node(lay.agg, curve, layer)
                rows.append([model, lay.regime, label, int(layer), int(layer) / n_layers, None, None, s["mean"],
                             s["ci_lo"], s["ci_hi"], s["n"], s["n_clusters"]])
    if dec is not None:
        n, g = node(dec.agg, "n_samples")["value"], node(dec.agg, "n_scenarios")["value"]
        for anchor in keys_under(dec.agg, "write_depth"):
            w = node(dec.agg, "write_depth", anchor)
            rows.append([model, dec.regime, f"write depth, {anchor}", w.get("layer"), w.get("depth"), None, None,
                         w.get("accuracy"), w.get("ci_lo"), w.get("ci_hi"), n, g])
        c = node(dec.agg, "commit", "included/depth")
        if c is not None:
            layer = node(dec.agg, "commit", "included/layer")
            rows.append([model, dec.regime, "commit depth (mean over committed arms)", layer["mean"], c["mean"],
                         c["ci_lo"], c["ci_hi"], None, None, None, c["n"], c["n_clusters"]])
    return pd.DataFrame(rows, columns=D2_HEADER)


def fig_d2(reader: Reader, out: Path, models: list[str]) -> Path | None:
    """fig_d2_timing (paper_spec §3.11, §7.3 (ii), §8 W13): per model, the notes spliced in layers <= l and >= l
    (layers, diverse_trigger-downstream) with the write depths per anchor and the commit depth (decodability,
    diverse_trigger) on one depth axis. None (skipped, with a message) when no model has either record."""
    stem, tables = "fig_d2_timing", []
    for model in models:
        lay = reader.testable("layers", model, TRIGGER, TIMING_TAG, COMMANDS["D2"].format(model=model), stem)
        dec = reader.testable("decodability", model, TRIGGER, None, COMMANDS["D1"].format(model=model), stem)
        if lay is not None or dec is not None:
            tables.append(d2_table(model, lay, dec))
    if not tables:
        print(f"skipped {stem}: no D2 record (run: {COMMANDS['D2'].format(model='<model>')}; "
              f"{COMMANDS['D1'].format(model='<model>')})")
        return None
    fig = Figure(figsize=(3.8 * len(tables), 3.0), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    anchor_style = {"field_line_end": ":", "downstream_mean": "-.", "pre_decision": "--", "decision": "-"}
    for ax, table in zip(axes, tables):
        model = table["model"].iloc[0]
        for series, color in (("notes spliced in layers <= l", WONG["green"]),
                              ("notes spliced in layers >= l", WONG["red"])):
            t = table[table["series"] == series]
            if len(t):
                _band(ax, t["depth"].tolist(), t["lo"].tolist(), t["hi"].tolist(), color)
                ax.plot(t["depth"].tolist(), t["value"].tolist(), "-o", ms=2.5, color=color, label=series)
        for r in rows_of(table[table["series"].str.startswith("write depth")]):
            anchor = r["series"].split(", ", 1)[1]
            if r["depth"] is None:
                ax.plot([], [], color=WONG["blue"], ls=anchor_style.get(anchor, "-"), lw=1,
                        label=f"write depth, {anchor_label(anchor, short=True)}: never >= threshold")
            else:
                ax.axvline(r["depth"], color=WONG["blue"], ls=anchor_style.get(anchor, "-"), lw=1,
                           label=f"write depth, {anchor_label(anchor, short=True)} ({r['depth']:.2f})")
        for r in rows_of(table[table["series"].str.startswith("commit depth")]):
            if r["depth_lo"] is not None:
                ax.axvspan(r["depth_lo"], r["depth_hi"], color=WONG["orange"], alpha=0.15, lw=0)
            ax.axvline(r["depth"], color=WONG["orange"], lw=1.4, label=f"commit depth ({r['depth']:.2f}, n={r['n']})")
        ax.axhline(0, color=INK, lw=0.7)
        ax.axhline(1, color=INK, lw=0.7, ls=":")
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("relative depth (block l's K/V read hidden_states[l])")
        ax.set_ylabel("recovery, notes [b, dpos) spliced")
        regimes = "/".join(sorted({x for x in table["regime"] if isinstance(x, str)}))
        notes = rows_of(table[table["series"].str.startswith("notes spliced")])
        size = f" (notes: n={notes[0]['n']} pairs, G={notes[0]['G']})" if notes else ""
        ax.set_title(f"D2 write before read, {model}, {regimes}{size}", fontsize=8)
        ax.legend(fontsize=5.5, loc="best")
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


D3_HEADER = ["model", "regime", "record_name", "k", "k_over_mean_n_down", "in_sample", "in_lo", "in_hi",
             "cross_fit", "cf_lo", "cf_hi", "matched_null_median", "matched_null_lo", "matched_null_hi",
             "p_in_vs_matched", "p_cf_vs_matched", "uniform_null_median", "n", "G"]


def d3_table(src: Loaded) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One D3 record's top-k rows: (the table written, D3_HEADER: figures.fig3.topk_table's top-k rows with k as a
    fraction of the mean downstream length (aggregate n_down, when the record has it) and G; the topk_table rows
    figures.fig3's _draw_topk draws)."""
    t = topk_table(src.model, src.agg, src.info)
    t = t[t["curve"] == "topk"]
    n_down = node(src.agg, "n_down")
    g = [node(src.agg, "topk_cf", k)["n_clusters"] for k in t["k_or_frac"]]
    return pd.DataFrame({"model": src.model, "regime": src.regime, "record_name": src.name, "k": t["k_or_frac"],
                         "k_over_mean_n_down": [int(k) / n_down["mean"] if n_down else None for k in t["k_or_frac"]],
                         "in_sample": t["a"], "in_lo": t["a_lo"], "in_hi": t["a_hi"], "cross_fit": t["b"],
                         "cf_lo": t["b_lo"], "cf_hi": t["b_hi"], "matched_null_median": t["null_median"],
                         "matched_null_lo": t["null_lo"], "matched_null_hi": t["null_hi"],
                         "p_in_vs_matched": t["p_in_vs_null"], "p_cf_vs_matched": t["p_cf_vs_null"],
                         "uniform_null_median": t["uniform_null_median"], "n": t["n"], "G": g},
                        columns=D3_HEADER), t


def d3_share_table(src: Loaded) -> pd.DataFrame:
    """One D3 record's top-k with k the share f of each pair's own downstream (topk_cf_frac, topk_in_frac,
    null_matched_frac; probes/topk.py TOPK_FRACS), one row per f with the mean k over the pairs; empty for a record
    made before shares were measured."""
    agg = src.rec.get("aggregate") or {}
    if "topk_cf_frac" not in agg:
        return pd.DataFrame(columns=D3_HEADER + ["share", "mean_k"])
    rows = []
    for f, cf in agg["topk_cf_frac"].items():
        ins, null = agg["topk_in_frac"].get(f, {}), agg["null_matched_frac"].get(f, {})
        ks = [r["plan"]["frac_sizes"][f] for r in src.rec["instances"] if f in r.get("plan", {}).get("frac_sizes", {})]
        rows.append({"model": src.model, "regime": src.regime, "record_name": src.name, "k": None,
                     "in_sample": ins.get("mean"), "in_lo": (ins.get("ci") or [None, None])[0],
                     "in_hi": (ins.get("ci") or [None, None])[1], "cross_fit": cf["mean"], "cf_lo": cf["ci"][0],
                     "cf_hi": cf["ci"][1], "matched_null_median": null.get("median"), "matched_null_lo": null.get("lo"),
                     "matched_null_hi": null.get("hi"), "p_in_vs_matched": null.get("p_topk_in_ge_null"),
                     "p_cf_vs_matched": null.get("p_topk_cf_ge_null"), "n": cf["n"], "G": cf["n_clusters"],
                     "share": float(f), "mean_k": sum(ks) / len(ks) if ks else None})
    return pd.DataFrame(rows, columns=D3_HEADER + ["share", "mean_k"])


def fig_d3(reader: Reader, out: Path, models: list[str], extra: list[Path] = ()) -> Path | None:
    """fig_d3_specificity (paper_spec §3.12, §7.3 (iii), §8 W8, W9): per D3 top-k record, cross-fitted and
    in-sample top-k against the matched and uniform random-k nulls (figures.fig3's drawing), with k as a fraction
    of the mean downstream length on the top axis. None (skipped, with a message) when there is no record."""
    stem = "fig_d3_specificity"
    recs = [src for m in models for src in d3_records(reader, m, extra)]
    if not recs:
        print(f"skipped {stem}: no D3 top-k record (run: {COMMANDS['D3'].format(model='<model>')})")
        return None
    fig = Figure(figsize=(3.6 * len(recs), 3.0), layout="constrained")
    axes = fig.subplots(1, len(recs), squeeze=False)[0]
    tables = []
    for ax, src in zip(axes, recs):
        table, drawn = d3_table(src)
        _draw_topk(ax, src.agg, drawn, legend_size=5.5)
        n_down = node(src.agg, "n_down")
        if n_down:
            nd = n_down["mean"]
            top = ax.secondary_xaxis("top", functions=(lambda k, nd=nd: k / nd, lambda f, nd=nd: f * nd))
            top.set_xlabel(f"k / mean downstream length ({nd:.0f} tokens)", fontsize=6.5)
        shares = d3_share_table(src)
        if len(shares):   # k as a share of each pair's own downstream, drawn at the mean k of that share
            ax.errorbar(shares["mean_k"], shares["cross_fit"], yerr=_yerr(shares["cross_fit"], shares["cf_lo"],
                                                                           shares["cf_hi"]),
                        fmt="D", ms=3, color=WONG["red"], capsize=1.5, lw=0.8,
                        label="top share of each pair's downstream, cross-fitted (at its mean k)")
            ax.plot(shares["mean_k"], shares["matched_null_median"], "x", color=WONG["red"], ms=4,
                    label="its matched random null (median)")
            ax.legend(fontsize=5.5, loc="lower right")
        ax.set_title(f"{src.model}, {src.name}, {src.regime}\n(n={src.info['n_included']}, "
                     f"G={table['G'].iloc[0] if len(table) else 0})", fontsize=7)
        tables.append(pd.concat([table, shares], ignore_index=True))
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


D4_HEADER = ["model", "regime", "panel", "series", "x", "recovery", "lo", "hi", "follow_rate", "p_cf_vs_null", "n",
             "G"]
DOSE_KINDS = (("topk_cf", "cross-fitted top-k (primary)", WONG["orange"]),
              ("topk_in", "in-sample top-k (the paper's)", WONG["blue"]))


def d4_table(src: Loaded) -> pd.DataFrame:
    """D4's plotted numbers: the dose over k and over fractions of the downstream (both directions pooled) for the
    cross-fitted and in-sample top-k sets with their follow rates, the matched null (median, band), and the full
    injections by donor kind (the same pair: a sanity check; another instance; another domain)."""
    rows = []
    for axis in ("k", "frac"):
        for kind, label, _ in DOSE_KINDS:
            for x in keys_under(src.agg, "dose", f"both/{kind}/{axis}/"):
                base = f"both/{kind}/{axis}/{x}"
                s, f = node(src.agg, "dose", f"{base}/recovery"), node(src.agg, "dose", f"{base}/follows_injected_rate")
                rows.append([src.model, src.regime, axis, label, float(x), s["mean"], s["ci_lo"], s["ci_hi"],
                             f["mean"] if f else None, None, s["n"], s["n_clusters"]])
        for x in keys_under(src.agg, "dose", f"both/null_matched/{axis}/"):
            s = node(src.agg, "dose", f"both/null_matched/{axis}/{x}")
            cf = node(src.agg, "dose", f"both/topk_cf/{axis}/{x}/recovery")
            rows.append([src.model, src.regime, axis, "matched random null (median, 95 % band)", float(x),
                         s["median"], s["lo"], s["hi"], None, s.get("p_topk_cf_ge_null"), s["n"],
                         cf["n_clusters"] if cf else None])
    donors = [("full", "both", "same pair, all positions (sanity: = 1 - mirrored field-only)")]
    donors += [("donors", f"{kind}/both", f"notes from {words}") for kind, words in DONORS.items()]
    for metric, key, label in donors:
        s, f = node(src.agg, metric, f"{key}/recovery"), node(src.agg, metric, f"{key}/follows_injected_rate")
        if s is not None:
            rows.append([src.model, src.regime, "frac", label, 1.0, s["mean"], s["ci_lo"], s["ci_hi"],
                         f["mean"] if f else None, None, s["n"], s["n_clusters"]])
    return pd.DataFrame(rows, columns=D4_HEADER)


def fig_d4(reader: Reader, out: Path, models: list[str]) -> Path | None:
    """fig_d4_injection (paper_spec §3.13, §7.3 (iv), §8 W7, W8): per model, the injection dose over k and over
    fractions of the downstream (cross-fitted, in-sample, matched null band), and at fraction 1 the full injection
    by donor kind. None (skipped, with a message) when no model has an injection record."""
    stem, tables = "fig_d4_injection", []
    for model in models:
        src = reader.testable("injection", model, INJECT, None, COMMANDS["D4"].format(model=model), stem)
        if src is not None:
            tables.append(d4_table(src))
    if not tables:
        print(f"skipped {stem}: no injection record (run: {COMMANDS['D4'].format(model='<model>')})")
        return None
    fig = Figure(figsize=(7.2, 2.8 * len(tables)), layout="constrained")
    axes = fig.subplots(len(tables), 2, squeeze=False)
    donor_colors = [WONG["green"], WONG["purple"], WONG["red"]]
    for (ax_k, ax_f), table in zip(axes, tables):
        model, regime = table["model"].iloc[0], table["regime"].iloc[0]
        for ax, axis in ((ax_k, "k"), (ax_f, "frac")):
            t = table[table["panel"] == axis]
            null = t[t["series"].str.startswith("matched random null")]
            if len(null):
                _band(ax, null["x"].tolist(), null["lo"].tolist(), null["hi"].tolist(), WONG["grey"],
                      "matched random null, 95 %")
                ax.plot(null["x"].tolist(), null["recovery"].tolist(), color=WONG["grey"], ls="--", lw=1)
            for _, label, color in DOSE_KINDS:
                c = t[t["series"] == label]
                _band(ax, c["x"].tolist(), c["lo"].tolist(), c["hi"].tolist(), color)
                ax.plot(c["x"].tolist(), c["recovery"].tolist(), "-o", ms=2.5, color=color, label=label)
            ax.axhline(0, color=INK, lw=0.7)
            ax.axhline(1, color=INK, lw=0.7, ls=":")
            ax.set_ylabel("recovery toward the donor's decision")
        donors = table[(table["panel"] == "frac") & (table["series"].str.startswith(("same pair", "notes from")))]
        for i, (r, color) in enumerate(zip(rows_of(donors), donor_colors)):
            x = 1.0 + 0.03 * (i - 1)
            ax_f.errorbar([x], [r["recovery"]], yerr=_yerr([r["recovery"]], [r["lo"]], [r["hi"]]),
                          fmt="D", ms=3.5, color=color, capsize=1.5, label=f"{r['series']} (n={r['n']}, G={r['G']})")
        ax_k.set_xscale("log", base=2)
        ax_k.set_xlabel("positions injected (k)")
        ax_f.set_xlabel("fraction of the downstream injected")
        ax_k.set_title(f"D4 injection dose over k, {model}, {regime}", fontsize=7.5)
        ax_f.set_title(f"over fractions; full injection by donor kind at 1, {model}", fontsize=7.5)
        ax_k.legend(fontsize=5.5, loc="upper left")
        ax_f.legend(fontsize=5.5, loc="upper left")
    write_table(out, stem, pd.concat(tables, ignore_index=True))
    return _save(fig, out, stem)


def fig_d5(reader: Reader, out: Path, models: list[str]) -> Path | None:
    """fig_d5_offtemplate (paper_spec §3.14, §7.3): field-only / downstream-only / full per off-template task."""
    panels = [(s, None, PRIMARY_BARS, lambda m: COMMANDS["D5"].format(model=m)) for s in OFFTEMPLATE]
    return locality_figure(reader.results, out, models, panels, "fig_d5_offtemplate", "fig_d5_offtemplate")


def fig_d6(reader: Reader, out: Path, models: list[str]) -> Path | None:
    """fig_d6_xfamily (paper_spec §3.15, §7.4): Family C locality: the field pairs in both rule orders (field-only,
    downstream-only, full) and the trigger pairs (trigger-only, notes, full)."""
    command = lambda m: COMMANDS["D6"].format(model=m)   # noqa: E731
    panels = [(s, None, PRIMARY_BARS, command) for s in XFAMILY] + [(XFAMILY_TRIGGER, None, TRIGGER_BARS, command)]
    return locality_figure(reader.results, out, models, panels, "fig_d6_xfamily", "fig_d6_xfamily")


# -- entry points -----------------------------------------------------------------------------------------------
def deep_controls(results: Path = DEFAULT_RESULTS, out: Path = DEFAULT_OUT, models: list[str] | None = None,
                  topk: list[Path] | None = None, paper_path: Path = PAPER_NUMBERS) -> list[Path]:
    """Write tab_deepmech, tab_xfamily and the six D1-D6 figures (paper_spec §6.6, §7.3, §7.4, §9.7) from the
    records under `results` into `out`; return the paths written. `models`: named models (default: every model
    with a step-6 record); `topk`: more top-k records to show in D3. Raises RecordError (a malformed record) or
    PaperNumbersError (a malformed paper_numbers.yaml)."""
    results, out = Path(results), Path(out)
    paper = load_paper_numbers(paper_path)
    topk = [Path(p) for p in topk or []]
    for p in topk:
        if not p.is_file():
            raise RecordError(f"no top-k record at {p} (--topk names record files)")
    reader = Reader(results)
    named = bool(models)
    if not models:
        models = discover_models(results)
        models += sorted({reader.load(p, "topk").model for p in topk} - set(models))
    if not models:
        print(f"no step-6 record under {results}: the tables hold the paper's rows only")
    note_models_without_records(results, models, named)
    out.mkdir(parents=True, exist_ok=True)
    written = write_tables(reader, out, models, paper, topk)
    with matplotlib.rc_context(STYLE):
        for fn in (fig_d1, fig_d2, lambda *a: fig_d3(*a, extra=topk), fig_d4, fig_d5, fig_d6):
            png = fn(reader, out, models)
            written += [png, png.with_suffix(".pdf")] if png else []
    return written


def main(argv=None) -> list[Path]:
    """Command line; a malformed record or paper_numbers.yaml exits with status 1 and the message."""
    p = argparse.ArgumentParser(description="Step 6 deep controls: tab:deepmech, tab:xfamily and the D1-D6 figures "
                                            "from the records.")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"records directory (default: "
                                                                         f"{DEFAULT_RESULTS})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--models", default=None, help="comma-separated model names (default: every model with a "
                                                  "step-6 record)")
    p.add_argument("--topk", default=None, help="comma-separated top-k record files to show in D3 beside the "
                                                "regime map's longest F->R cells")
    args = p.parse_args(argv)
    try:
        return deep_controls(args.results, args.out, _parse_list(args.models, "--models"),
                             _parse_list(args.topk, "--topk"))
    except (RecordError, PaperNumbersError) as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
