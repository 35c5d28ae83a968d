"""`run.py --multirun` smoke sweeps on the tiny models, as a user runs them (subprocesses into a temp directory): one
record per cell with the basic launcher, the joblib launcher running cells in parallel processes, an experiment
preset's sweep, and a sweep preset refused without -m. Cells are read off the configs, never hard-coded."""
import json
import os
import subprocess
import sys

import yaml

from kvnotes.models import REPO_ROOT

FAST = ("n_instances=1", "make_figures=false", "stats.n_boot=200")


def tiny_models() -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "configs" / "model").glob("*.yaml")
                  if yaml.safe_load(p.read_text())["kind"] == "tiny")


def sweep(tmp_path, *args, expect_ok=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), "-m", *args, *FAST,
                          f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def record(tmp_path, probe, model, scenario) -> dict:
    return json.loads((tmp_path / probe / model / f"{scenario}.json").read_text())


def test_multirun_writes_one_record_per_cell(tmp_path):
    models = tiny_models()
    assert len(models) >= 2
    sweep(tmp_path, "model=" + ",".join(models))
    for model in models:
        rec = record(tmp_path, "locality", model, "diverse")
        assert rec["config"]["model"]["name"] == model and rec["summary"]["n_gated"] > 0
    assert len(list(tmp_path.glob("locality/*/*.json"))) == len(models)
    assert len(list((tmp_path / "sweep").glob("*/.hydra/config.yaml"))) == len(models)   # one job dir per cell
    assert not list(tmp_path.rglob("*.partial.jsonl"))


def test_joblib_launcher_runs_the_cells_in_parallel_processes(tmp_path):
    models = tiny_models()[:2]
    out = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=" + ",".join(models))
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    threads = []
    for model in models:
        rec = record(tmp_path, "locality", model, "diverse")
        assert rec["config"]["model"]["name"] == model
        threads.append(rec["provenance"]["torch_threads"])
    # joblib's workers share the cores out instead of each taking all of them
    assert all(t <= max(1, (os.cpu_count() or 1) // 2) for t in threads), threads


def test_an_experiment_sweep_runs_every_cell_of_the_preset(tmp_path):
    preset = yaml.safe_load((REPO_ROOT / "configs" / "experiment" / "fig3a.yaml").read_text())
    scenarios = [s.strip() for s in preset["hydra"]["sweeper"]["params"]["scenario"].split(",")]
    sweep(tmp_path, "experiment=fig3a", "model=tiny-llama")
    for scenario in scenarios:
        assert record(tmp_path, "locality", "tiny-llama", scenario)["config"]["scenario"]["name"] == scenario


def test_a_sweep_preset_without_multirun_is_refused(tmp_path):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), "experiment=fig3a", "model=tiny-llama", *FAST,
                          f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode != 0 and "--multirun" in out.stderr
    assert not list(tmp_path.rglob("*.json"))

