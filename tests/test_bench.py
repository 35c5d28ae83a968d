"""The interventions benchmark runs end to end (on a tiny model, in seconds) and writes a record with the keys the
README and the closing notes quote; its three paths agree. The timings themselves are not tested."""
import json

import pytest

from benchmarks import splice_bench

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_writes_a_record_with_agreeing_paths(tmp_path):
    out = tmp_path / "bench.json"
    splice_bench.main(["--model", "tiny-qwen2", "--n-full-forward", "2", "--n-sequential", "4", "--repeats", "1",
                       "--out", str(out)])
    rec = json.loads(out.read_text())
    agg = rec["aggregate"]
    for key in ("batched_splices_per_s", "sequential_splices_per_s", "full_forward_splices_per_s", "max_abs_diff",
                "peak_rss_gib", "flop_bound_splices_per_s", "batched_over_sequential", "batched_over_full_forward"):
        assert key in agg and agg[key] > 0 or key == "max_abs_diff", key
    assert agg["max_abs_logit_diff"] <= 1e-5
    n = len(rec["instances"]["positions"])
    assert n == rec["config"]["dpos"] - rec["config"]["span"][0] and len(rec["instances"]["recovery_batched"]) == n
    assert len(rec["instances"]["recovery_sequential"]) == 4 and len(rec["instances"]["recovery_full_forward"]) == 2


def test_circuit_bench_writes_a_record_with_agreeing_paths(tmp_path):
    """benchmarks/circuit_bench.py on a tiny model: the three realisations of the head patches agree and the record
    has the ratios the closing notes quote (the timings themselves are not tested)."""
    from benchmarks import circuit_bench
    out = tmp_path / "circuit.json"
    circuit_bench.main(["--model", "tiny-qwen2", "--n-reference", "3", "--out", str(out)])
    rec = json.loads(out.read_text())
    for sweep in ("read", "write"):
        s = rec["sweeps"][sweep]
        assert s["n_patches"] == rec["config"]["heads"] and s["n_reference"] == 3
        assert max(s["max_abs_logit_diff"].values()) <= 1e-5
        assert s["max_abs_margin_diff_vs_full_vocab"] <= 1e-5
        assert all(v > 0 for v in s["patches_per_s"].values()) and s["ours_over_faster_reference"] > 0
        assert len(s["margins"]) == s["n_patches"]
    assert rec["sweeps"]["read"]["position"] == rec["config"]["dpos"] > rec["sweeps"]["write"]["position"]
