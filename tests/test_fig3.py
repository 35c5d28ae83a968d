"""Fig. 3 b-d and the mechanism figures from real (tiny-model) records: files written, table numbers = record numbers,
missing records skipped with the command that makes them."""
import csv
import json

import pytest

import run as run_module
from figures import fig3
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig3")
    # decodability needs >= 3 instances per domain for inverted-polarity pairs (the minority arms) to exist
    for args in (("probe=topk", "probe.n_null=10", "probe.n_uniform_null=5"), ("probe=knockout", "probe.n_random=4"),
                 ("probe=locality",), ("probe=positions",), ("probe=layers",), ("probe=dose", "scenario=diverse_dose"),
                 ("probe=wording",)):
        run_module.run(_cfg(root, "model=tiny-llama", "n_instances=1", *args, *RELAXED))
    run_module.run(_cfg(root, "model=tiny-llama", "n_instances=3", "probe=decodability", "scenario=diverse_polarity",
                        *RELAXED))
    return root


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_figures_and_tables_show_the_record_numbers(results, tmp_path):
    written = fig3.main(["--results", str(results), "--out", str(tmp_path)])
    names = {p.stem for p in written}
    assert set(fig3.FIGURES) <= names
    for stem in names:
        assert (tmp_path / f"{stem}.png").stat().st_size > 10_000 and (tmp_path / f"{stem}.md").is_file()
    pos = json.loads((results / "positions" / "tiny-llama" / "diverse.json").read_text())["aggregate"]
    lay = json.loads((results / "layers" / "tiny-llama" / "diverse.json").read_text())["aggregate"]
    sweeps = _rows(tmp_path / "fig_sweeps.csv")
    assert {r["label_or_layer"] for r in sweeps if r["curve"] == "position_label"} == {
        k.split("/", 1)[1] for k in pos if k.startswith("label_recovery/")}
    for row in sweeps:
        if row["curve"] == "position_label":
            assert float(row["mean"]) == pytest.approx(pos[f"label_recovery/{row['label_or_layer']}"]["mean"])
        elif row["curve"] in ("single_by_layer", "upto_by_layer", "from_by_layer"):
            assert float(row["mean"]) == pytest.approx(lay[row["curve"]][int(row["label_or_layer"])]["mean"])
    assert sum(r["curve"] == "single_by_layer" for r in sweeps) == len(lay["single_by_layer"]) > 0
    topk = json.loads((results / "topk" / "tiny-llama" / "diverse.json").read_text())["aggregate"]
    for row in _rows(tmp_path / "fig3b_topk.csv"):
        if row["curve"] == "topk":
            assert float(row["in_sample_or_suffix"]) == pytest.approx(topk["topk_in"][row["k_or_frac"]]["mean"])
            assert float(row["null_median"]) == pytest.approx(topk["null_matched"][row["k_or_frac"]]["median"])
    loc = json.loads((results / "locality" / "tiny-llama" / "diverse.json").read_text())["aggregate"]
    ko = json.loads((results / "knockout" / "tiny-llama" / "diverse.json").read_text())["aggregate"]
    got = {r["quantity"]: float(r["mean"]) for r in _rows(tmp_path / "fig3c_reads.csv")}
    assert got["causal: field-only"] == pytest.approx(loc["field_only_recovery"]["mean"])
    assert got["attention: downstream"] == pytest.approx(ko["oracle"]["E4_attention_mass"]["downstream"]["mean"])
    wd = json.loads((results / "wording" / "tiny-llama" / "diverse.json").read_text())
    labels = {v: k for k, v in wd["wording"]["labels"].items()}
    for row in _rows(tmp_path / "fig3d_wording.csv"):
        want = wd["aggregate"]["p_decision_is_new_action"][row["setting"]][labels[row["variant"]]]
        assert float(row["p_new"]) == pytest.approx(want["mean"]) and int(row["n"]) == want["n"]
    minority = json.loads((results / "decodability" / "tiny-llama" / "diverse_polarity.json").read_text())[
        "aggregate"]["minority_arms"]
    shown = [r for r in _rows(tmp_path / "fig_decodability.csv") if r["target"].endswith(", minority arms")]
    assert len(shown) == sum(len(v) for v in minority["accuracy"].values()) > 0
    for row in shown:
        want = minority["accuracy"][row["anchor"]][row["target"].split(",")[0]]
        assert float(row["accuracy"]) == pytest.approx(want["mean"]) and int(row["n"]) == want["n"]


def test_composite_fig3_shows_the_record_numbers_of_every_panel(results, tmp_path):
    written = fig3.main(["--results", str(results), "--out", str(tmp_path), "--only", "fig3"])
    assert [p.name for p in written] == ["fig3_tiny-llama.png"]
    rows = _rows(tmp_path / "fig3_tiny-llama.csv")
    assert {r["panel"] for r in rows} == {"a", "b", "c", "d"}
    rec = lambda probe: json.loads((results / probe / "tiny-llama" / "diverse.json").read_text())   # noqa: E731
    loc, topk, wd = rec("locality")["aggregate"], rec("topk")["aggregate"], rec("wording")
    for r in rows:
        if r["panel"] == "a":
            assert float(r["mean"]) == pytest.approx(loc[r["quantity"]]["mean"])
            assert int(r["n"]) == loc[r["quantity"]]["n"]
        elif r["panel"] == "b" and r["quantity"].startswith("topk@"):
            assert float(r["mean"]) == pytest.approx(topk["topk_in"][r["quantity"][5:]]["mean"])
        elif r["panel"] == "d":
            setting, label = r["quantity"].split(": ")
            variant = {v: k for k, v in wd["wording"]["labels"].items()}[label]
            want = wd["aggregate"]["p_decision_is_new_action"][setting][variant]
            assert float(r["mean"]) == pytest.approx(want["mean"]) and int(r["n"]) == want["n"]
    assert {r["quantity"] for r in rows if r["panel"] == "a"} == {
        "field_only_recovery", "downstream_only_recovery", "full_downstream_recovery"}


def test_composite_names_the_missing_records(results, tmp_path, capsys):
    import shutil
    partial = tmp_path / "results"
    shutil.copytree(results, partial)
    shutil.rmtree(partial / "wording")
    assert fig3.main(["--results", str(partial), "--out", str(tmp_path / "out"), "--only", "fig3"]) == []
    assert "python run.py probe=wording model=tiny-llama scenario=diverse" in capsys.readouterr().out


def test_missing_records_are_skipped_with_the_command(tmp_path, capsys):
    assert fig3.main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == []
    out = capsys.readouterr().out
    assert "skipped fig3b_topk" in out and "python run.py probe=topk" in out


def _as_other_family(results, root, scenario="family_a", tag="t1"):
    """The fixture's tiny-llama records, renamed to another scenario and a tag (record content and file name)."""
    for p in results.glob("*/tiny-llama/diverse.json"):
        rec = json.loads(p.read_text())
        rec["scenario"]["name"], rec["config"]["tag"] = scenario, tag
        dst = root / p.parent.parent.name / "tiny-llama" / f"{scenario}-{tag}.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(rec))
    return root


def test_scenario_and_tag_select_the_records_and_name_the_outputs(results, tmp_path):
    other = _as_other_family(results, tmp_path / "results")
    out = tmp_path / "out"
    written = fig3.main(["--results", str(other), "--out", str(out), "--scenario", "family_a", "--tag", "t1",
                         "--only", "fig_sweeps,fig3b_topk,fig3c_reads,fig3d_wording,fig_knockout,fig3"])
    assert sorted(p.name for p in written) == sorted([
        "fig_sweeps_family_a-t1.png", "fig3b_topk_family_a-t1.png", "fig3c_reads_family_a-t1.png",
        "fig3d_wording_family_a-t1.png", "fig_knockout_family_a-t1.png", "fig3_tiny-llama_family_a-t1.png"])
    assert not list(out.glob("fig3b_topk.*")) and not list(out.glob("fig3_tiny-llama.*"))   # defaults untouched
    topk = json.loads((other / "topk" / "tiny-llama" / "family_a-t1.json").read_text())["aggregate"]
    for row in _rows(out / "fig3b_topk_family_a-t1.csv"):
        if row["curve"] == "topk":
            assert float(row["in_sample_or_suffix"]) == pytest.approx(topk["topk_in"][row["k_or_frac"]]["mean"])
    # untagged, or another tag: those records do not exist, so nothing is drawn and the command says so
    assert fig3.main(["--results", str(other), "--out", str(out), "--scenario", "family_a",
                      "--only", "fig3b_topk"]) == []


def test_missing_scenario_names_the_commands_for_every_registered_model(results, tmp_path, capsys):
    from kvnotes.records import registered_models

    assert fig3.main(["--results", str(results), "--out", str(tmp_path), "--scenario", "family_b",
                      "--only", "fig3b_topk,fig3"]) == []
    out = capsys.readouterr().out
    assert "skipped fig3b_topk" in out and "python run.py probe=topk scenario=family_b" in out
    for m in registered_models():
        assert f"python run.py probe=topk model={m} scenario=family_b" in out
    assert "skipped fig3: no topk record of scenario family_b" in out


def test_a_figure_with_a_subset_of_registered_models_names_the_rest(results, tmp_path, capsys):
    from kvnotes.records import registered_models

    fig3.main(["--results", str(results), "--out", str(tmp_path), "--only", "fig3d_wording"])
    out = capsys.readouterr().out
    assert f"fig3d_wording shows 0 of {len(registered_models())} registered models" in out
    for m in registered_models():
        assert f"python run.py probe=wording model={m} scenario=diverse" in out


def test_figure_functions_raise_ordinary_exceptions(tmp_path):
    with pytest.raises(fig3.MissingRecord) as exc:   # a missing record: not SystemExit, and it carries the command
        fig3.fig3b(tmp_path, tmp_path, ["ghost"], scenario="family_a", tag="t2")
    assert not isinstance(exc.value, SystemExit)
    assert exc.value.command == "python run.py probe=topk model=ghost scenario=family_a tag=t2"
