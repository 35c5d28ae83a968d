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
