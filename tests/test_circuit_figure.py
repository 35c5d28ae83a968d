"""figures/circuit.py: Fig. 15 and tab:circuit from the circuit probes' records only. On tiny-model records of all
three probes, the plotted table's numbers are the records' aggregates, tab:circuit carries the paper's numbers
from figures/paper_numbers.yaml in their own columns, and a missing probe is named, not dropped."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import run as run_module
from figures import circuit
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("circuit")
    for probe, extra in (("heads", ("probe.n_null=20", "probe.n_null_write=10")),
                         ("components", ()),
                         ("direction", ("probe.n_random=5", "probe.n_random_necessity=3", "probe.n_notes=3")),
                         ("scrub", ("probe.n_null=10", "n_instances=2"))):
        run_module.run(_cfg(root, f"probe={probe}", "model=tiny-llama", "tag=map-field_first_user-D0-Qlast-K1",
                            "scenario.params.layout=field_first_user", *extra, *RELAXED))
    return root


def test_figure_and_table_come_from_the_records(results, tmp_path, capsys):
    written = circuit.main(["--results", str(results), "--out", str(tmp_path)])
    assert (tmp_path / "fig15_circuit_tiny-llama.png").is_file() and (tmp_path / "tab_circuit.tex").is_file()
    plotted = pd.read_csv(tmp_path / "fig15_circuit_tiny-llama.csv", dtype={"x": str})   # x: k, layer, T or a part
    heads = json.loads(next((results / "heads" / "tiny-llama").glob("*.json")).read_text())
    row = plotted[(plotted["panel"] == "a") & (plotted["series"] == "read cross-fitted") & (plotted["x"] == "2")]
    assert row["mean"].iloc[0] == pytest.approx(heads["aggregate"]["read"]["cum_cf"]["2"]["mean"])
    band = plotted[(plotted["series"] == "read random-k null") & (plotted["x"] == "2")]
    assert band["lo"].iloc[0] == pytest.approx(heads["aggregate"]["read"]["null"]["2"]["lo"])
    comp = json.loads(next((results / "components" / "tiny-llama").glob("*.json")).read_text())
    T = max(comp["aggregate"], key=int)
    row = plotted[(plotted["panel"] == "c") & (plotted["series"] == "attn_share") & (plotted["x"] == T)]
    assert row["mean"].iloc[0] == pytest.approx(comp["aggregate"][T]["attn_share"]["mean"])
    assert set(plotted["layout"]) == {"field_first_user"}
    scrub = json.loads(next((results / "scrub" / "tiny-llama").glob("*.json")).read_text())
    d = plotted[plotted["panel"] == "d"]
    row = d[(d["series"] == "drift, instance donor") & (d["x"] == "notes")]
    assert row["mean"].iloc[0] == pytest.approx(scrub["aggregate"]["drift"]["instance:notes"]["mean"])
    band = plotted[(plotted["panel"] == "d") & (plotted["series"] == "random note sets (matched null)")]
    assert band["hi"].iloc[0] == pytest.approx(scrub["aggregate"]["null_notes"]["hi"])
    tab = pd.read_csv(tmp_path / "tab_circuit.csv")
    paper_models, paper = circuit.paper_rows()
    k2 = tab[tab["quantity"] == "read heads, joint top-2, cross-fitted"]
    assert k2["value"].iloc[0] == pytest.approx(heads["aggregate"]["read"]["cum_cf"]["2"]["mean"])
    assert k2[f"paper {paper_models[0]}"].iloc[0] == paper["read_cum_2"]["values"][0]
    assert (tab["order"] == "F->R").all()
    assert len(written) == 3   # Fig. 15, tab:circuit and tab_circuit_coverage
    cover = pd.read_csv(tmp_path / "tab_circuit_coverage.csv", keep_default_na=False)
    assert list(cover["model"]) == ["tiny-llama"] and "no locality record" in cover["status"].iloc[0]
    assert [cover[p].iloc[0] for p in circuit.PROBES] == ["yes"] * 4


def test_a_missing_probe_is_named(results, tmp_path, capsys):
    import shutil
    part = tmp_path / "res"
    shutil.copytree(results / "heads", part / "heads")
    circuit.main(["--results", str(part), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "no direction record" in out and "no components record" in out and "no scrub record" in out


def test_the_coverage_table_names_cells_without_a_flip_and_missing_records(results, tmp_path):
    """tab_circuit_coverage: a map cell whose locality record included pairs lists the circuit records made on it;
    a model that flips on no pair (strict inclusion rule on a random tiny model) gets a row saying no circuit record
    can be made, with the record it read that from."""
    import shutil
    root = tmp_path / "res"
    shutil.copytree(results, root)
    cell = ("tag=map-field_first_user-D0-Qlast-K1", "scenario.params.layout=field_first_user")
    run_module.run(_cfg(root, "probe=locality", "model=tiny-llama", *cell, *RELAXED))
    run_module.run(_cfg(root, "probe=locality", "model=tiny-qwen2", *cell))
    circuit.main(["--results", str(root), "--out", str(tmp_path / "out")])
    cover = pd.read_csv(tmp_path / "out" / "tab_circuit_coverage.csv", keep_default_na=False)
    llama = cover[cover["model"] == "tiny-llama"].iloc[0]
    assert llama["layout"] == "field_first_user" and llama["order"] == "F->R" and int(llama["included pairs"]) >= 1
    assert [llama[p] for p in circuit.PROBES] == ["yes"] * 4
    assert llama["status"].startswith("every circuit probe has a record")
    n_scrub = json.loads(next((root / "scrub" / "tiny-llama").glob("*.json")).read_text())["summary"]["n_included"]
    assert (f"scrub measured {n_scrub} pairs" in llama["status"]) == (n_scrub != int(llama["included pairs"]))
    qwen = cover[cover["model"] == "tiny-qwen2"].iloc[0]
    assert int(qwen["included pairs"]) == 0 and "no circuit record can be made" in qwen["status"]
    src = root / "locality" / "tiny-qwen2" / "diverse-map-field_first_user-D0-Qlast-K1.json"
    assert Path(qwen["source"]).resolve() == src.resolve()
    alone = tmp_path / "alone"   # no circuit record at all: the coverage table is what says why
    (alone / "locality" / "tiny-qwen2").mkdir(parents=True)
    shutil.copy(src, alone / "locality" / "tiny-qwen2")
    assert circuit.main(["--results", str(alone), "--out", str(tmp_path / "out3")]) == [
        tmp_path / "out3" / "tab_circuit_coverage.csv"]
    only = pd.read_csv(tmp_path / "out3" / "tab_circuit_coverage.csv", keep_default_na=False)
    assert list(only["model"]) == ["tiny-qwen2"] and "no circuit record can be made" in only["status"].iloc[0]
    (root / "heads" / "tiny-llama").rename(root / "heads_aside")
    circuit.main(["--results", str(root), "--out", str(tmp_path / "out2")])
    cover = pd.read_csv(tmp_path / "out2" / "tab_circuit_coverage.csv", keep_default_na=False)
    llama = cover[cover["model"] == "tiny-llama"].iloc[0]
    assert llama["heads"] == "" and llama["status"].startswith("missing: heads (run: ")


def test_run_py_says_why_a_cell_has_nothing_to_measure_and_remakes_fig15(tmp_path):
    """From the command line: a circuit probe whose pairs_from record included no pair says why and writes no record;
    a circuit probe's run remakes Fig. 15 and tab:circuit (not the locality figures)."""
    from conftest import run_py
    res = tmp_path / "res"
    cell = ("tag=map-field_first_user-D0-Qlast-K1", "scenario.params.layout=field_first_user", "n_instances=1")
    run_module.run(_cfg(res, "probe=locality", "model=tiny-qwen2", *cell))      # strict rule: no pair included
    src = res / "locality" / "tiny-qwen2" / "diverse-map-field_first_user-D0-Qlast-K1.json"
    assert json.loads(src.read_text())["summary"]["n_included"] == 0
    done = run_py("probe=components", "model=tiny-qwen2", *cell, f"results_dir={res}", f"pairs_from={src}",
                  hydra_dir=tmp_path / "h1")
    assert "included none of these" in done.stdout and "tab_circuit_coverage" in done.stdout
    assert not (res / "components").exists()
    done = run_py("probe=components", "model=tiny-llama", *cell, *RELAXED, f"results_dir={res}",
                  "make_figures=true", hydra_dir=tmp_path / "h2")
    assert "fig15_circuit_tiny-llama.png" in done.stdout and "tab_circuit.tex" in done.stdout
    assert "fig3" not in done.stdout
