"""End to end on the smallest real model (smollm2-135m, ~93 MB of GGUF from PyPI) through the Hydra entry point."""
import json
import os
import subprocess
import sys

import pytest

from kvnotes.models import REPO_ROOT, WeightsNotInstalledError, model_spec, part_paths
from conftest import N_DIVERSE


def _installed():
    try:
        part_paths(model_spec("smollm2-135m"))
        return True
    except WeightsNotInstalledError:
        return False


@pytest.mark.slow
def test_locality_on_smollm2_from_the_entry_point(tmp_path):
    if not _installed():
        if os.environ.get("CI"):
            pytest.fail("smollm2-135m weights are not installed; `make test` installs them")
        pytest.skip("smollm2-135m weights not installed (run: make weights MODEL=smollm2-135m)")
    out = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), "model=smollm2-135m", "n_instances=1",
                          f"results_dir={tmp_path}", "make_figures=false", "stats.n_boot=1000"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "locality" / "smollm2-135m" / "diverse.json").read_text())
    assert rec["model"]["name"] == "smollm2-135m" and rec["model"]["n_layers"] == 30
    assert rec["model"]["sha256"].startswith("b179c952")
    assert rec["summary"]["n_gated"] == N_DIVERSE and rec["summary"]["n_controls"] == 1
    assert rec["sanity"]["decode_vs_forward_max_abs"] < 1e-3
    assert rec["sanity"]["full_equals_oracle_max_abs"] < 1e-3
    # the readout's candidate tokens carry most of the probability mass at the decision, or the record says not
    masses = [r["mass"]["stale"] for r in rec["instances"] + rec["excluded"]]
    assert all(0.0 <= m <= 1.0 for m in masses)
    assert "wall time" in out.stdout and "peak memory" in out.stdout
