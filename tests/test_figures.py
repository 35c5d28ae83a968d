"""Fig. 3a from synthetic locality records: files written, loud failures, n == 0, bar heights from the records,
--scenario / --tag and the file names they give, the registered models a figure leaves out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from figures import make_figures as mf

METRIC_KEYS = [
    "field_only_recovery",
    "field_line_recovery",
    "field_k_only_recovery",
    "field_v_only_recovery",
    "downstream_only_recovery",
    "full_downstream_recovery",
    "field_only_new_decision_rate",
    "control_abs_delta_m",
]


def _metric(mean, half=0.05, n=30):
    if n == 0:
        return {"mean": None, "ci": None, "ci_method": "cluster_bootstrap", "n": 0, "n_clusters": 0,
                "per_scenario": {}}
    return {"mean": mean, "ci": [mean - half, mean + half], "ci_method": "cluster_bootstrap", "n": n,
            "n_clusters": 6, "per_scenario": {"s0": mean}}


def write_record(results: Path, model: str, scenario: str, means: dict | None = None, zero_n=(),
                 n_included=30, n_total=48, drop=None, tag: str | None = None) -> Path:
    """Write a synthetic locality record; `means` overrides per-metric means, `zero_n` metrics get n == 0."""
    means = means or {}
    base = {k: 0.1 + 0.1 * i for i, k in enumerate(METRIC_KEYS)}
    base["full_downstream_recovery"] = 1.0
    base.update(means)
    agg = {k: _metric(base[k], n=0 if k in zero_n else 30) for k in METRIC_KEYS}
    rec = {
        "schema_version": 1,
        "experiment": "locality",
        "model": {"name": model, "dtype": "float32", "n_layers": 2},
        "scenario": {"name": scenario, "family": scenario},
        "config": {"tag": tag, "seed": 0},
        "summary": {"n_total": n_total + 4, "n_gated": n_total, "n_controls": 4, "n_included": n_included, "n_excluded": n_total - n_included,
                    "n_controls": 8},
        "aggregate": agg,
    }
    if drop is not None:  # e.g. ("aggregate", "field_v_only_recovery", "ci")
        node = rec
        for key in drop[:-1]:
            node = node[key]
        del node[drop[-1]]
    path = results / "locality" / model / (f"{scenario}-{tag}.json" if tag else f"{scenario}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def _bars(fig, panel: int) -> dict[str, float]:
    ax = fig.axes[panel]
    return {p.get_gid(): p.get_height() for p in ax.patches if p.get_gid()}


def test_fig3a_writes_png_and_pdf_and_prints_records(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "out"
    paths = [write_record(results, "model-a", "diverse"), write_record(results, "model-a", "family_a"),
             write_record(results, "model-b", "diverse")]
    png = mf.fig3a(results, out)
    assert png == out / "fig3a_locality.png"
    pdf = out / "fig3a_locality.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    printed = capsys.readouterr().out
    for p in paths:
        assert f"read {p}" in printed
    assert f"wrote {png}" in printed and f"wrote {pdf}" in printed
    # model-b has no family_a record: reported, not silently dropped
    assert str(results / "locality" / "model-b" / "family_a.json") in printed
    assert "python run.py probe=locality model=model-b scenario=family_a" in printed


def test_main_returns_written_files(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write_record(results, "model-a", "diverse")
    written = mf.main(["--results", str(results), "--out", str(out), "--models", "model-a"])
    assert sorted(p.name for p in written) == ["fig3a_locality.pdf", "fig3a_locality.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)


def test_bar_heights_and_errorbars_come_from_records(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write_record(results, "model-a", "diverse", means={"field_only_recovery": 0.137})
    write_record(results, "model-b", "diverse", means={"field_only_recovery": 0.611})
    write_record(results, "model-a", "family_a", means={"field_only_recovery": 0.042})
    _, fig = mf.fig3a(results, out, return_fig=True)
    left, right = _bars(fig, 0), _bars(fig, 1)
    assert left["model-a|field_only_recovery"] == pytest.approx(0.137)
    assert left["model-b|field_only_recovery"] == pytest.approx(0.611)
    assert right["model-a|field_only_recovery"] == pytest.approx(0.042)
    assert "model-b|field_only_recovery" not in right  # no family_a record for model-b: no bar
    assert len(left) == 2 * 6 and len(right) == 6
    # the field-only bar is red, the full-downstream bar green (§6.0 convention)
    ax = fig.axes[0]
    colours = {p.get_gid(): p.get_facecolor() for p in ax.patches if p.get_gid()}
    from matplotlib.colors import to_rgba
    assert colours["model-a|field_only_recovery"] == pytest.approx(to_rgba("#D55E00"))
    assert colours["model-a|full_downstream_recovery"] == pytest.approx(to_rgba("#009E73"))
    # n annotations and 'no record' come from the records
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["model-a\nn=30/48 gated", "model-b\nn=30/48 gated"]
    assert "model-b\nno record" in [t.get_text() for t in fig.axes[1].get_xticklabels()]
    # the CI whiskers end at the record's CI (0.137 ± 0.05)
    segs = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert any(seg[0][1] == pytest.approx(0.087) and seg[1][1] == pytest.approx(0.187) for seg in segs)
    assert fig.axes[0].get_ylabel() == "decision recovery"


def test_named_model_missing_record_exits_with_path_and_command(tmp_path):
    results = tmp_path / "results"
    write_record(results, "model-a", "diverse")
    with pytest.raises(SystemExit) as exc:
        mf.main(["--results", str(results), "--out", str(tmp_path / "out"), "--models", "model-a,ghost"])
    msg = str(exc.value.code)
    assert str(results / "locality" / "ghost" / "diverse.json") in msg
    assert "python run.py probe=locality model=ghost scenario=diverse" in msg
    assert not (tmp_path / "out" / "fig3a_locality.png").exists()


def test_no_records_at_all_raises_clearly(tmp_path):
    with pytest.raises(mf.RecordError) as exc:   # an ordinary exception for library callers, not SystemExit
        mf.fig3a(tmp_path / "results", tmp_path / "out")
    assert not isinstance(exc.value, SystemExit)
    msg = str(exc.value)
    assert "no locality records found" in msg
    assert "python run.py probe=locality" in msg


def test_metric_with_n_zero_draws_no_bar(tmp_path):
    results = tmp_path / "results"
    write_record(results, "model-a", "diverse", zero_n={"field_k_only_recovery", "field_v_only_recovery"})
    write_record(results, "model-a", "family_a", zero_n=set(METRIC_KEYS))
    png, fig = mf.fig3a(results, tmp_path / "out", return_fig=True)
    assert png.is_file()
    left, right = _bars(fig, 0), _bars(fig, 1)
    assert "model-a|field_k_only_recovery" not in left and "model-a|field_only_recovery" in left
    assert right == {}
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("n=0") == 2
    assert [t.get_text() for t in fig.axes[1].texts].count("n=0") == 6


def test_malformed_record_names_file_and_key(tmp_path):
    results = tmp_path / "results"
    path = write_record(results, "model-a", "diverse", drop=("aggregate", "field_v_only_recovery", "ci"))
    with pytest.raises(mf.RecordError) as exc:
        mf.fig3a(results, tmp_path / "out")
    msg = str(exc.value)
    assert str(path) in msg and "aggregate.field_v_only_recovery.ci" in msg


def test_cli_runs_as_script_with_repo_relative_defaults(tmp_path):
    results = tmp_path / "results"
    write_record(results, "model-a", "diverse")
    script = Path(mf.__file__)
    # run from an unrelated cwd with explicit paths; and the defaults point at the repository, not the cwd
    proc = subprocess.run([sys.executable, str(script), "--results", str(results), "--out", str(tmp_path / "o")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "fig3a_locality.png").is_file()
    assert mf.DEFAULT_RESULTS == script.resolve().parent.parent / "results"
    assert mf.DEFAULT_OUT == script.resolve().parent
    bad = subprocess.run([sys.executable, str(script), "--results", str(tmp_path / "none"), "--out",
                          str(tmp_path / "o2")], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "no locality records found" in bad.stderr


def test_fig3a_table_shows_the_record_numbers(tmp_path):
    import csv

    results, out = tmp_path / "results", tmp_path / "out"
    write_record(results, "model-a", "diverse", means={"field_only_recovery": 0.137}, zero_n={"field_k_only_recovery"})
    mf.fig3a(results, out)
    with open(out / "fig3a_locality.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 + 0   # one scenario with a record (no family_a record) x 6 metrics
    got = {r["metric"]: r for r in rows}
    assert float(got["field_only_recovery"]["mean"]) == pytest.approx(0.137)
    assert float(got["field_only_recovery"]["lo"]) == pytest.approx(0.087) and got["field_only_recovery"]["n"] == "30"
    assert got["field_k_only_recovery"]["mean"] == "" and got["field_k_only_recovery"]["n"] == "0"
    assert (out / "fig3a_locality.md").read_text().splitlines()[0].startswith("| scenario | model | metric | mean")


def test_scenario_and_tag_options_name_the_outputs(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "out"
    write_record(results, "model-a", "family_a", tag="t1", means={"field_only_recovery": 0.25})
    write_record(results, "model-a", "diverse", means={"field_only_recovery": 0.9})   # untagged: not read
    written = mf.main(["--results", str(results), "--out", str(out), "--scenario", "family_a", "--tag", "t1"])
    assert [p.name for p in written] == ["fig3a_locality_family_a-t1.png", "fig3a_locality_family_a-t1.pdf"]
    assert not (out / "fig3a_locality.png").exists()   # the default figure is not overwritten
    table = (out / "fig3a_locality_family_a-t1.csv").read_text()
    assert "family_a,model-a,field_only_recovery,0.25," in table and "diverse" not in table
    _, fig = mf.fig3a(results, out, scenarios=["family_a"], tag="t1", return_fig=True)
    assert len(fig.axes) == 1 and fig.axes[0].get_title(loc="left") == "(a) Family A tool-call template [t1]"
    # a scenario nobody named gets its name as the title; the default pair keeps the default file name
    write_record(results, "model-a", "diverse_long")
    _, fig = mf.fig3a(results, out, scenarios=["diverse_long"], return_fig=True)
    assert fig.axes[0].get_title(loc="left") == "(a) diverse_long"
    assert (out / "fig3a_locality_diverse_long.png").is_file()
    assert mf.fig3a_stem(["diverse", "family_a"]) == "fig3a_locality"
    assert mf.fig3a_stem(["diverse", "family_a"], "x") == "fig3a_locality-x"
    assert mf.output_stem("fig3b_topk", "diverse", "diverse") == "fig3b_topk"
    assert mf.output_stem("fig3b_topk", "family_a", "diverse", "t") == "fig3b_topk_family_a-t"


def test_missing_tagged_record_names_the_command_with_the_tag(tmp_path):
    results = tmp_path / "results"
    write_record(results, "model-a", "family_a")
    with pytest.raises(mf.RecordError) as exc:
        mf.fig3a(results, tmp_path / "out", scenarios=["family_a"], tag="t9")
    assert "python run.py probe=locality model=<model> scenario=family_a tag=t9" in str(exc.value)
    with pytest.raises(mf.RecordError) as exc:
        mf.fig3a(results, tmp_path / "out", models=["model-a"], scenarios=["family_a"], tag="t9")
    assert str(results / "locality" / "model-a" / "family_a-t9.json") in str(exc.value)
    assert exc.value.command == "python run.py probe=locality model=model-a scenario=family_a tag=t9"


def test_cli_error_is_a_system_exit_that_run_py_catches(tmp_path):
    """run.py wraps make_figures.main in `except SystemExit`: the command line still exits that way."""
    caught = None
    try:
        mf.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    except SystemExit as e:   # exactly what run.py does
        caught = e
    assert caught is not None and "no locality records found" in str(caught.code)


def test_registered_models_left_out_are_named_with_their_command(tmp_path, capsys):
    registered = mf.registered_models()
    assert registered and not any(m.startswith("tiny-") for m in registered)
    results = tmp_path / "results"
    shown = registered[0]
    write_record(results, shown, "diverse")
    mf.fig3a(results, tmp_path / "out")
    printed = capsys.readouterr().out
    assert f"Fig. 3a shows 1 of {len(registered)} registered models" in printed
    for m in registered[1:]:
        assert f"python run.py probe=locality model={m} scenario=diverse" in printed
    assert f"model={shown} scenario=diverse" not in printed


def test_panel_titles_say_the_rule_order_the_records_were_made_in(tmp_path):
    """The one-word family's panel says R->F or F->R from its records' own layout; mixed orders or another family
    say none (a tagged F->R run of diverse_all must not be titled 'rule before field')."""
    results = tmp_path / "results"
    ff = write_record(results, "model-a", "diverse_all", tag="f_r")
    rec = json.loads(ff.read_text())
    rec["config"]["scenario"] = {"name": "diverse_all", "family": "diverse", "params": {"layout": "field_first_user"}}
    ff.write_text(json.dumps(rec))
    _, records = mf.load_fig3a_records(results, scenarios=["diverse_all"], tag="f_r")
    fig = mf.build_fig3a(records, ["model-a"], tag="f_r")
    assert fig.axes[0].get_title(loc="left") == "(a) every domain file, field before rule (F→R) [f_r]"
    write_record(results, "model-a", "diverse")      # no layout in the config: the default, rule_first
    write_record(results, "model-a", "family_a")
    _, records = mf.load_fig3a_records(results, scenarios=["diverse", "family_a"])
    fig = mf.build_fig3a(records, ["model-a"])
    assert [ax.get_title(loc="left") for ax in fig.axes[:2]] == [
        "(a) one-word gated decisions, rule before field (R→F)", "(b) Family A tool-call template"]
    assert mf.panel_title(0, "diverse", orders={"R->F", "F->R"}) == "(a) one-word gated decisions"
