"""figures/deep_controls.py (step 6: tab:deepmech, tab:xfamily and the D1-D6 figures) on real tiny-llama records made
once per module by `run.py` (the deep_d1 / deep_timing / deep_inject experiments, regime_long's top-k cells, the
off-template and Family C locality records): every table number is the record's aggregate, the paper's columns are
figures/paper_numbers.yaml's, sanity rows are labelled, the regime is the record's own rule order, a missing record
is named with its command, and every figure is written with its CSV / markdown."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_py
from figures import deep_controls as dc
from kvnotes.records import load_aggregates

MODEL = "tiny-llama"
RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
COMMON = (f"model={MODEL}", "make_figures=false", "stats.n_boot=200", *RELAXED)
TRIGGER_DOMAINS = "scenario.params.domains=[order_cancel,account_delete,loyalty_discount,batch_release]"
ONE_WORD_DOMAINS = "scenario.params.domains=[order_cancel,account_delete,password_reset]"
STEMS = ("fig_d1_dissociation", "fig_d2_timing", "fig_d3_specificity", "fig_d4_injection", "fig_d5_offtemplate",
         "fig_d6_xfamily")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Tiny step-6 records, one run.py call per experiment (about 80 s on one free thread)."""
    root = tmp_path_factory.mktemp("deep")
    res, hy = root / "results", root / "hydra"
    common = (*COMMON, f"results_dir={res}")
    run_py("experiment=deep_d1", TRIGGER_DOMAINS, *common, hydra_dir=hy / "d1", multirun=True)
    run_py("experiment=deep_timing", TRIGGER_DOMAINS, *common, hydra_dir=hy / "d2")
    run_py("experiment=deep_inject", ONE_WORD_DOMAINS, "probe.n_null=20", *common, hydra_dir=hy / "d4")
    # regime_long's top-k cells: two layouts (F->R, R->F) x two distances; D3 takes the F->R one at the longest D
    run_py("experiment=regime_long", "probe=topk", "pairs_from=null", "n_instances=1", ONE_WORD_DOMAINS,
           "scenario.params.layout=field_first_user,rule_first", "scenario.params.n_filler=2,4", "probe.n_null=20",
           "probe.n_uniform_null=10", *common, hydra_dir=hy / "d3", multirun=True)
    run_py("experiment=deep_offtemplate", "n_instances=1", *common, hydra_dir=hy / "d5", multirun=True)
    # Family C: 4 instances = two held values, two clusters (the cross-fitted top-k needs another one to rank on)
    run_py("experiment=deep_xfamily", "n_instances=4", *common, hydra_dir=hy / "d6", multirun=True)
    run_py("experiment=deep_xfamily", "probe=topk,injection", "scenario=family_c", "n_instances=4", *common,
           hydra_dir=hy / "d6si", multirun=True)
    return res


def _run(*argv) -> tuple[list[Path], str]:
    """figures.deep_controls.main(argv) with its printed output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        written = dc.main([str(a) for a in argv])
    return written, buf.getvalue()


@pytest.fixture(scope="module")
def made(results, tmp_path_factory):
    """The script run once on the tiny records, with an R->F top-k cell the map selection does not take given by
    --topk: (out directory, files written, printed output)."""
    out = tmp_path_factory.mktemp("deep_out")
    extra = results / "topk" / MODEL / "diverse_all-map-rule_first-D2-Qlast-K1.json"
    written, printed = _run("--results", results, "--out", out, "--topk", extra)
    return out, written, printed


def _table(out: Path, stem: str) -> pd.DataFrame:
    t = pd.read_csv(out / f"{stem}.csv", keep_default_na=False, na_values=[""])
    return t.astype(object).where(t.notna(), None)


def _same(got, want) -> bool:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None
    return got is not None and float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def _agg(path: str, metric: str, key: str) -> dict:
    a = load_aggregates(path)
    row = a[(a["metric"] == metric) & (a["key"] == key)]
    assert len(row) == 1, (path, metric, key)
    return {k: (None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v)
            for k, v in row.iloc[0].to_dict().items()}


def _expected_n_g(row: dict) -> tuple:
    """(n, G) the row must carry, read from its record's aggregates independently of the script."""
    path, metric, key, field = row["record"], row["source_metric"], row["source_key"] or "", row["value_field"]
    s = _agg(path, metric, key)
    if metric == "best_layer":
        return s["n"], _agg(path, "n_scenarios", "")["value"]
    if metric == "dissociation" and field == "n_samples":
        return _agg(path, "n_samples", "")["value"], s["n_scenarios"]
    if metric == "commit" and field in ("n_committed", "n_never"):
        return s["n_arms"], _agg(path, "commit", "included/rate")["n_clusters"]
    if metric == "write_depth":
        return _agg(path, "n_samples", "")["value"], _agg(path, "n_scenarios", "")["value"]
    if metric in ("null_uniform", "null_matched", "null_matched_frac"):
        return s["n"], _agg(path, "topk_in" + ("_frac" if metric.endswith("_frac") else ""), key)["n_clusters"]
    if metric == "dose" and "null_matched" in key:
        return s["n"], _agg(path, "dose", key.replace("null_matched", "topk_in") + "/recovery")["n_clusters"]
    return s["n"], s["n_clusters"]


# ---------------------------------------------------------------------------------------------- the tables
@pytest.mark.parametrize("stem", ("tab_deepmech", "tab_xfamily"))
def test_every_table_number_is_the_records_aggregate(made, stem):
    out, _, _ = made
    table = _table(out, stem)
    ours = [r for r in table.to_dict("records") if r["record"]]
    assert len(ours) >= 9
    checked = 0
    for r in ours:
        if r["value"] is None:        # a quantity the record does not have: said so, never a number
            assert r["note"], r
            continue
        field = r["value_field"]
        if field == "crossing":       # D2's causal crossing: the first block where the mean curve crosses half
            agg = json.loads(Path(r["record"]).read_text())["aggregate"]
            curve, li = [x["mean"] for x in agg[r["source_metric"]]], int(r["source_key"])
            half = agg["upto_by_layer"][-1]["mean"] / 2
            assert _same(r["value"], li / len(curve)), r
            before = curve[:li]
            if r["source_metric"] == "upto_by_layer":
                assert curve[li] >= half and all(v < half for v in before), r
            else:
                assert (li == len(curve) or curve[li] < half) and all(v >= half for v in before), r
            continue
        s = _agg(r["record"], r["source_metric"], r["source_key"] or "")
        assert _same(r["value"], s[field]), r
        lo, hi = {"mean": ("ci_lo", "ci_hi"), "accuracy": ("ci_lo", "ci_hi"),
                  "median": ("lo", "hi")}.get(field, (None, None))
        assert _same(r["ci_lo"], s[lo] if lo else None) and _same(r["ci_hi"], s[hi] if hi else None), r
        n, g = _expected_n_g(r)
        assert _same(r["n"], n) and _same(r["G"], g), r
        if field == "median":
            assert _same(r["p_value"], s["p_topk_cf_ge_null"]), r
        checked += 1
    assert checked >= 9


def test_table_rows_read_the_aggregates_they_name(results, made):
    """By hand from the JSON (not through load_aggregates): a row wired to the wrong aggregate fails here."""
    out, _, _ = made
    deep, xfam = _table(out, "tab_deepmech"), _table(out, "tab_xfamily")

    def agg(probe, scenario):
        return json.loads((results / probe / MODEL / f"{scenario}.json").read_text())["aggregate"]

    def one(table, quantity, record_name):
        rows = [r for r in table.to_dict("records") if r["quantity"] == quantity and r["record_name"] == record_name]
        assert len(rows) == 1, (quantity, record_name, len(rows))
        return rows[0]

    loc = agg("locality", "diverse_trigger")
    for quantity, key in (("trigger-only recovery (the changed trigger word's K/V)", "field_only_recovery"),
                          ("notes recovery (everything after the trigger)", "downstream_only_recovery")):
        r = one(deep, quantity, "diverse_trigger")
        assert (r["value"], r["ci_lo"], r["ci_hi"], r["n"], r["G"]) == pytest.approx(
            (loc[key]["mean"], *loc[key]["ci"], loc[key]["n"], loc[key]["n_clusters"]))
    dec = agg("decodability", "diverse_trigger")
    r = one(deep, "LOSO conclusion probe accuracy, decision anchor (n = arms)", "diverse_trigger")
    assert r["value"] == pytest.approx(dec["best_layer"]["decision"]["conclusion"]["accuracy"])
    r = one(deep, "logit-lens commit depth, decision token (mean over committed arms)", "diverse_trigger")
    assert r["value"] == pytest.approx(dec["commit"]["included"]["depth"]["mean"])
    assert one(deep, "arms that commit (value) of n arms", "diverse_trigger")["value"] == \
        dec["commit"]["included"]["n_committed"]
    inj = agg("injection", "diverse_all")
    r = one(deep, "full injection recovery, both (n = pairs x 2 directions)", "diverse_all")
    assert r["value"] == pytest.approx(inj["full"]["both"]["recovery"]["mean"])
    r = one(deep, "dose k = 8, cross-fitted top-k", "diverse_all")
    assert r["value"] == pytest.approx(inj["dose"]["both"]["topk_cf"]["k"]["8"]["recovery"]["mean"])
    topk = agg("topk", "diverse_all-map-field_first_user-D4-Qlast-K1")
    r = one(deep, "field_first_user: top-8 recovery, cross-fitted (ranked on the other domains)",
            "diverse_all-map-field_first_user-D4-Qlast-K1")
    assert r["value"] == pytest.approx(topk["topk_cf"]["8"]["mean"])
    r = one(deep, "field_first_user: random-8, matched null (median, 95 % band)",
            "diverse_all-map-field_first_user-D4-Qlast-K1")
    assert (r["value"], r["ci_lo"], r["ci_hi"]) == pytest.approx(
        (topk["null_matched"]["8"]["median"], topk["null_matched"]["8"]["lo"], topk["null_matched"]["8"]["hi"]))
    for scenario in dc.OFFTEMPLATE:
        r = one(deep, f"{scenario}: field-only recovery (the field's own K/V)", scenario)
        assert r["value"] == pytest.approx(agg("locality", scenario)["field_only_recovery"]["mean"])
    for scenario in dc.XFAMILY:
        r = one(xfam, "field-only recovery (the field's own K/V)", scenario)
        assert r["value"] == pytest.approx(agg("locality", scenario)["field_only_recovery"]["mean"])
    r = one(xfam, "trigger-only recovery (the changed trigger word's K/V)", "family_c_trigger")
    assert r["value"] == pytest.approx(agg("locality", "family_c_trigger")["field_only_recovery"]["mean"])
    r = one(xfam, "top-8 recovery, cross-fitted (ranked on the other domains)", "family_c")
    assert r["value"] == pytest.approx(agg("topk", "family_c")["topk_cf"]["8"]["mean"])
    r = one(xfam, "full injection follow rate", "family_c")
    assert r["value"] == pytest.approx(agg("injection", "family_c")["full"]["both"]["follows_injected_rate"]["mean"])


@pytest.mark.parametrize("stem,table", (("tab_deepmech", "deepmech"), ("tab_xfamily", "xfamily")))
def test_paper_columns_are_paper_numbers_yaml(made, stem, table):
    out, _, _ = made
    spec = yaml.safe_load(dc.PAPER_NUMBERS.read_text())[table]
    got = _table(out, stem)
    assert [c for c in got.columns if c.startswith("paper: ")] == [f"paper: {m}" for m in spec["models"]]
    rows = got.to_dict("records")
    for want in spec["rows"]:
        mine = [r for r in rows if r["paper_key"] == want["key"]]
        assert mine, f"paper row {want['key']} is in no table row"
        for r in mine:
            assert r["paper_section"] == want["section"] and _same(r["paper_n"], want.get("n"))
            for m, v in zip(spec["models"], want["values"]):
                assert _same(r[f"paper: {m}"], v), (want["key"], m)
    for r in rows:                     # a row without a paper key has no paper numbers
        if r["paper_key"] is None:
            assert all(r[f"paper: {m}"] is None for m in spec["models"])
    # a paper row nothing of ours matches is still shown, with the reason
    lets_check = [r for r in rows if r["paper_key"] == "d2_write_depth_lets_check"]
    if table == "deepmech":
        assert len(lets_check) == 1 and lets_check[0]["value"] is None and "paper only" in lets_check[0]["note"]


def test_sanity_rows_are_labelled_and_only_they(made):
    out, _, _ = made
    for stem in ("tab_deepmech", "tab_xfamily"):
        rows = _table(out, stem).to_dict("records")
        for r in rows:
            by_construction = r["source_metric"] == "full_downstream_recovery" or (
                r["source_metric"] == "full" and r["source_key"] == "both/recovery")
            assert (dc.SANITY in (r["note"] or "")) == by_construction, r
        assert sum(dc.SANITY in (r["note"] or "") for r in rows) >= 2
        tex = (out / f"{stem}.tex").read_text()
        assert dc.SANITY in tex
        assert tex.isascii(), "the LaTeX table must compile under OT1: Δ, ≥, -> written as math"


def test_the_regime_is_the_records_own_rule_order(made):
    out, _, _ = made
    rows = [r for stem in ("tab_deepmech", "tab_xfamily") for r in _table(out, stem).to_dict("records")
            if r["record"]]
    regime = {}
    for r in rows:
        regime.setdefault(r["record_name"], set()).add(r["regime"])
    assert regime["family_c"] == regime["family_c_trigger"] == {"R->F"}     # rule, notes, then the field
    assert regime["family_c_field_first"] == {"F->R"}
    assert regime["diverse_trigger"] == regime["diverse_all"] == {"F->R"}    # field_first_user
    assert regime["diverse_all-map-field_first_user-D4-Qlast-K1"] == {"F->R"}
    assert regime["diverse_all-map-rule_first-D2-Qlast-K1"] == {"R->F"}      # given with --topk
    assert regime["offtemplate_rag"] == {"n/a"}                             # no rule/field order
    # D3 takes the F->R map cell at the longest distance, plus what --topk names
    d3 = {r["record_name"] for r in rows if r["control"] == "D3"}
    assert d3 == {"diverse_all-map-field_first_user-D4-Qlast-K1", "diverse_all-map-rule_first-D2-Qlast-K1"}


# ---------------------------------------------------------------------------------------------- the figures
def test_each_figure_is_written_with_its_csv_and_markdown(made):
    out, written, _ = made
    for stem in STEMS:
        for ext in ("png", "pdf", "csv", "md"):
            assert (out / f"{stem}.{ext}").stat().st_size > 200, (stem, ext)
        assert (out / f"{stem}.png").stat().st_size > 10_000
        assert out / f"{stem}.png" in written and out / f"{stem}.pdf" in written
    for stem in ("tab_deepmech", "tab_xfamily"):
        for ext in ("csv", "md", "tex"):
            assert out / f"{stem}.{ext}" in written


def test_figure_tables_hold_the_plotted_record_numbers(results, made):
    out, _, _ = made

    def agg(probe, name):
        return json.loads((results / probe / MODEL / f"{name}.json").read_text())["aggregate"]

    lay = agg("layers", "diverse_trigger-downstream")
    d2 = _table(out, "fig_d2_timing").to_dict("records")
    upto = [r for r in d2 if r["series"] == "notes spliced in layers <= l"]
    assert len(upto) == len(lay["upto_by_layer"]) > 0
    for r in upto:
        assert r["value"] == pytest.approx(lay["upto_by_layer"][int(r["layer"])]["mean"])
    commit = [r for r in d2 if r["series"].startswith("commit depth")]
    assert commit[0]["depth"] == pytest.approx(agg("decodability", "diverse_trigger")["commit"]["included"]["depth"]
                                               ["mean"])
    topk = agg("topk", "diverse_all-map-field_first_user-D4-Qlast-K1")
    d3 = [r for r in _table(out, "fig_d3_specificity").to_dict("records")
          if r["record_name"] == "diverse_all-map-field_first_user-D4-Qlast-K1"]
    assert d3
    for r in d3:
        if r["share"] is not None:     # k as a share of each pair's downstream
            f = next(x for x in topk["topk_cf_frac"] if float(x) == r["share"])
            assert r["cross_fit"] == pytest.approx(topk["topk_cf_frac"][f]["mean"])
            assert r["matched_null_median"] == pytest.approx(topk["null_matched_frac"][f]["median"])
            continue
        k = str(int(r["k"]))
        assert r["cross_fit"] == pytest.approx(topk["topk_cf"][k]["mean"])
        assert r["matched_null_median"] == pytest.approx(topk["null_matched"][k]["median"])
        assert r["k_over_mean_n_down"] == pytest.approx(int(k) / topk["n_down"]["mean"])
    assert sum(r["share"] is not None for r in d3) == len(topk["topk_cf_frac"]) > 0
    inj = agg("injection", "diverse_all")
    d4 = _table(out, "fig_d4_injection").to_dict("records")
    for r in d4:
        if r["series"].startswith("cross-fitted"):
            x = str(int(r["x"])) if r["panel"] == "k" else str(r["x"])
            assert r["recovery"] == pytest.approx(inj["dose"]["both"]["topk_cf"][r["panel"]][x]["recovery"]["mean"])
    donor = [r for r in d4 if r["series"] == "notes from another domain"]
    assert donor[0]["recovery"] == pytest.approx(inj["donors"]["domain"]["both"]["recovery"]["mean"])
    for stem, names in (("fig_d5_offtemplate", dc.OFFTEMPLATE), ("fig_d6_xfamily", ("family_c", "family_c_trigger",
                                                                                      "family_c_field_first"))):
        rows = _table(out, stem).to_dict("records")
        assert {r["record_name"] for r in rows} == set(names)
        for r in rows:
            assert r["mean"] == pytest.approx(agg("locality", r["record_name"])[r["metric"]]["mean"])
    d1 = _table(out, "fig_d1_dissociation").to_dict("records")
    dec = agg("decodability", "diverse_trigger")
    for r in d1:
        if r["panel"] == "probe":
            assert r["value"] == pytest.approx(dec["best_layer"][r["anchor"]][r["series"]]["accuracy"])


# ---------------------------------------------------------------------------------------------- missing records
def test_a_missing_record_is_named_with_its_command_and_its_figure_skipped(results, tmp_path):
    partial = tmp_path / "results"                 # only the decodability record: D1 and D2 draw from it
    shutil.copytree(results / "decodability", partial / "decodability")
    written, printed = _run("--results", partial, "--out", tmp_path / "out")
    for missing, command in (
            (partial / "injection" / MODEL / "diverse_all.json", f"python run.py experiment=deep_inject model={MODEL}"),
            (partial / "locality" / MODEL / "diverse_trigger.json",
             f"python run.py -m experiment=deep_d1 model={MODEL}"),
            (partial / "layers" / MODEL / "diverse_trigger-downstream.json",
             f"python run.py experiment=deep_timing model={MODEL}")):
        assert f"missing {missing}  (run: {command})" in printed
    for stem in ("fig_d3_specificity", "fig_d4_injection", "fig_d5_offtemplate", "fig_d6_xfamily"):
        assert f"skipped {stem}" in printed and not (tmp_path / "out" / f"{stem}.png").exists()
    for stem in ("fig_d1_dissociation", "fig_d2_timing"):     # drawn from what is there
        assert (tmp_path / "out" / f"{stem}.png") in written
    d4 = [r for r in _table(tmp_path / "out", "tab_deepmech").to_dict("records") if r["control"] == "D4"]
    assert d4 and all(r["record"] is None and "paper only" in r["note"] for r in d4)   # the paper's rows stay


def test_a_named_model_without_records_names_every_command_and_skips_every_figure(results, tmp_path):
    written, printed = _run("--results", results, "--out", tmp_path, "--models", "qwen2.5-coder-0.5b")
    for cmd in ("python run.py -m experiment=deep_d1 model=qwen2.5-coder-0.5b",
                "python run.py experiment=deep_timing model=qwen2.5-coder-0.5b",
                "python run.py -m experiment=regime_long probe=topk model=qwen2.5-coder-0.5b",
                "python run.py experiment=deep_inject model=qwen2.5-coder-0.5b",
                "python run.py -m experiment=deep_offtemplate model=qwen2.5-coder-0.5b",
                "python run.py -m experiment=deep_xfamily model=qwen2.5-coder-0.5b",
                "python run.py -m experiment=deep_xfamily model=qwen2.5-coder-0.5b probe=topk,injection "
                "scenario=family_c"):
        assert cmd in printed, cmd
    for stem in STEMS:
        assert f"skipped {stem}" in printed
    assert sorted(p.name for p in written) == sorted(f"{s}.{e}" for s in ("tab_deepmech", "tab_xfamily")
                                                     for e in ("csv", "md", "tex"))


def test_a_malformed_paper_numbers_file_names_the_row_and_the_fix(tmp_path):
    doc = yaml.safe_load(dc.PAPER_NUMBERS.read_text())
    doc["xfamily"]["rows"][0]["values"] = [0.1]
    bad = tmp_path / "paper_numbers.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(dc.PaperNumbersError, match=r"xfamily.rows\[0\] \(field_only\) has 1 values for 2 models"):
        dc.load_paper_numbers(bad)


def test_a_malformed_record_stops_the_command_line_naming_the_file(tmp_path):
    bad = tmp_path / "results" / "locality" / MODEL / "diverse_trigger.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=f"malformed record {bad}"):
        dc.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--models", MODEL])


def test_the_readme_block_shows_the_tables_rows_and_names_a_missing_control(results, made):
    """figures/readme_numbers.py's `deep` block is tab:deepmech's rows of the named controls (our value, CI, n, G and
    the paper's columns), with the records it read in its footer; a control with no record of ours is an error that
    names the command, never a silently shorter block."""
    from figures import readme_numbers as rn
    out, _, _ = made
    table = _table(out, "tab_deepmech")
    spec = {"kind": "deep", "table": "deepmech", "models": [MODEL], "controls": ["D1", "D4"]}
    text = rn.render_block("deep-test", spec, results)
    rows = [ln for ln in text.splitlines() if ln.startswith("| D")]
    ours = table[(table["model"] == MODEL) & table["control"].isin(["D1", "D4"])]
    assert len(rows) == len(ours) and len(rows) > 4
    first = ours.iloc[0]
    assert rows[0].startswith(f"| {first['control']} | {MODEL} | {first['regime']} | {first['quantity']} | "
                              f"{first['value']:.2f}")
    assert "injection" in text and "decodability" in text and "deep_controls.py" in text
    gone = results.parent / "without_d4"
    shutil.copytree(results, gone)
    shutil.rmtree(gone / "injection")
    with pytest.raises(rn.MissingRecord, match="experiment=deep_inject model=tiny-llama"):
        rn.render_block("deep-test", spec, gone)


def test_the_r_to_f_contrast_records_add_rows_of_their_own_regime_without_paper_columns(results, tmp_path):
    """D1's and D4's R->F contrast (the same experiments with the rule first, tag rule_first) add rows to
    tab:deepmech beside the F->R ones: their regime is the records' own (R->F) and no paper number sits beside them
    (the paper's are F->R); a missing contrast record is named with its command."""
    res = tmp_path / "results"
    shutil.copytree(results, res)
    common = (*COMMON, f"results_dir={res}", "scenario.params.layout=rule_first", "tag=rule_first")
    run_py("experiment=deep_d1", TRIGGER_DOMAINS, *common, hydra_dir=tmp_path / "h1", multirun=True)
    paper = dc.load_paper_numbers()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        table = dc.deepmech_table(dc.Reader(res), [MODEL], paper)
    d1 = table[(table["control"] == "D1") & (table["model"] == MODEL)]
    contrast = d1[d1["record"].astype(str).str.contains("diverse_trigger-rule_first")]
    assert len(contrast) and (contrast["regime"] == "R->F").all() and (d1["regime"] == "F->R").any()
    assert contrast["paper_key"].isna().all()
    paper_cols = [c for c in table.columns if c.startswith("paper: ")]
    assert contrast[paper_cols].isna().all().all()
    assert f"python run.py experiment=deep_inject model={MODEL} scenario.params.layout=rule_first tag=rule_first" \
        in printed.getvalue()


def test_a_record_that_includes_no_pair_says_the_control_is_untestable_there(results, tmp_path):
    """A record in which no gated pair passes the inclusion rule (a model that does not follow the rule in that
    regime) gives rows with no value whose note says so, with the count of gated pairs, instead of a blank."""
    src = results / "locality" / MODEL / "family_c_field_first.json"
    rec = json.loads(src.read_text())
    n_gated = rec["summary"]["n_gated"]
    rec["summary"] = {**rec["summary"], "n_included": 0, "n_excluded": n_gated, "scenarios_included": []}
    rec["aggregate"]["field_only_recovery"] = {"mean": None, "ci": None, "n": 0, "n_clusters": 0}
    path = tmp_path / "locality" / MODEL / src.name
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = dc.Reader(tmp_path).load(path, "locality")
    row = dc.summary_row(loaded, "D6", "field-only", "field_only_recovery")
    assert row["value"] is None and row["n"] == 0
    (one,) = dc.locality_rows(loaded, "D6", dc.LOCALITY_ROWS, {})      # one row, not one empty row per quantity
    assert one["value"] is None and one["note"] == row["note"] and one["record"] == str(path)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert dc.Reader(tmp_path).testable("locality", MODEL, src.stem, None, "cmd", "fig") is None
    assert "left out: untestable here" in said.getvalue()
    assert row["note"].startswith(f"untestable here: 0 of {n_gated} gated pairs pass the inclusion rule")
    kept = dc.summary_row(dc.Reader(results).load(src, "locality"), "D6", "field-only", "field_only_recovery",
                          note="x")
    assert kept["note"].startswith("x") and "untestable" not in kept["note"]


def test_d3_of_a_model_without_f_to_r_flips_is_a_row_saying_so(results, tmp_path, monkeypatch):
    """A model with no F->R top-k record whose map locality cells include no pair gets D3 rows that say it cannot
    be tested there (one per cell), not a silent absence."""
    src = results / "locality" / MODEL / "family_c_field_first.json"
    rec = json.loads(src.read_text())
    rec["summary"] = {**rec["summary"], "n_included": 0, "n_excluded": rec["summary"]["n_gated"]}
    path = tmp_path / "locality" / MODEL / "cell.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    reader = dc.Reader(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        cell = reader.load(path, "locality")
    monkeypatch.setattr(dc, "d3_records", lambda *a, **k: [])
    monkeypatch.setattr(dc, "map_far_cells", lambda r, m, probe: [cell] if probe == "locality" else [])
    rows = dc.d3_rows(reader, [MODEL])
    assert len(rows) == 1 and rows[0]["control"] == "D3" and rows[0]["value"] is None
    assert rows[0]["note"].startswith("untestable here: 0 of") and "no top-k run" in rows[0]["note"]
    monkeypatch.setattr(dc, "map_far_cells", lambda r, m, probe: [reader.load(src, "locality")])
    assert dc.d3_rows(reader, [MODEL]) == []


def test_probe_rows_carry_their_permutation_test_and_d6_paper_numbers_sit_on_the_papers_order_only(made):
    """D1's best-layer probe accuracies are chosen in-sample, so each row carries the record's permutation test on
    the max over layers (its p, and 'NOT above chance' when p >= 0.05); the paper's Family C numbers (rule first)
    sit beside family_c's rows only, never beside the field-first rows."""
    out, _, _ = made
    deep = _table(out, "tab_deepmech").to_dict("records")
    probes = [r for r in deep if r["control"] == "D1" and r["quantity"].startswith("LOSO")]
    assert probes
    for r in probes:
        target = r["source_key"].split("/")[1]
        null = json.loads(Path(r["record"]).read_text())["aggregate"]["best_layer"]["decision"][target]
        assert _same(r["p_value"], null["null"]["p_value"]), r
        assert ("NOT above chance" in r["note"]) == (null["null"]["p_value"] >= 0.05)
    xf = _table(out, "tab_xfamily").to_dict("records")
    assert all(not isinstance(r["paper_key"], str) for r in xf if r["record_name"] == "family_c_field_first")
    assert any(isinstance(r["paper_key"], str) for r in xf if r["record_name"] == "family_c")


def test_d6_probes_with_nothing_to_run_on_are_rows_saying_so_not_missing_records(results, tmp_path):
    """Family C's top-k and injection run on the pairs its locality record included (pairs_from), so a model that
    includes none has no such record: tab:xfamily says why from the locality record instead of calling it missing."""
    rec = json.loads((results / "locality" / MODEL / "family_c.json").read_text())
    rec["summary"] = {**rec["summary"], "n_included": 0, "n_excluded": rec["summary"]["n_gated"]}
    path = tmp_path / "locality" / MODEL / "family_c.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    with contextlib.redirect_stdout(io.StringIO()) as said:
        rows = dc.d6_rows(dc.Reader(tmp_path), [MODEL])
    not_run = [r for r in rows if "not run: no included pair" in r["quantity"]]
    assert {r["quantity"].split()[1] for r in not_run} == {"topk", "injection"}
    assert all(r["note"].startswith("untestable here") and r["value"] is None for r in not_run)
    assert "topk/" + MODEL not in said.getvalue() and "injection/" + MODEL not in said.getvalue()
