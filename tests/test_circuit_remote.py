"""The circuit probes off the engine: every forward through one intervention library, which is what a remote (NDIF)
model allows. The note search written as full-forward K/V patches (kvnotes.interventions.kv_splice) gives the
splice engine's numbers on the three tiny architectures, through nnsight and through the TransformerLens bridge; a
circuit probe run with `+model.remote=local` (nnsight's serverless dry run: each trace serialised as for NDIF,
deserialised with this project's modules hidden, run here) sends its traces down the remote path and gives the
engine's record; a remote model refuses the backends that need local weights; the NDIF model config says what it
needs instead of touching the network."""
from __future__ import annotations

import pytest
import torch

import run as run_module
from circuits.common import check_backend, pair_notes
from kvnotes.models import load_model
from kvnotes.readout import candidate_tokens
from test_run import _cfg

pytestmark = pytest.mark.usefixtures("single_thread")

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
TOL = 1e-4


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_the_note_search_through_a_library_is_the_engines(tiny, get_pair, backend):
    pair = get_pair(tiny, "diverse")
    cands = candidate_tokens(tiny.tokenizer, list(pair.instance.candidates))
    token_ids = sorted({int(t) for lst in cands.values() for _, t, _ in lst})
    eng = pair_notes(tiny, pair, token_ids, 3, "engine")
    lib = pair_notes(tiny, pair, token_ids, 3, backend)
    for s in ("stale", "oracle"):
        assert lib[0][s]["lse"] == pytest.approx(eng[0][s]["lse"], abs=TOL)
        assert lib[0][s]["logits"] == pytest.approx(eng[0][s]["logits"], abs=TOL)
    rows_e, rows_l = torch.tensor(eng[2]), torch.tensor(lib[2])
    assert rows_l.shape == rows_e.shape == (pair.dpos - pair.span[1], len(token_ids))
    assert float((rows_l - rows_e).abs().max()) <= TOL
    # (a single downstream position moves a random tiny model's logits little: the field splice below is the check
    # that the patched K/V do move them)
    assert lib[3] == eng[3]
    # the notes are the same positions unless two scores tie within the tolerance
    assert lib[1] == eng[1] or torch.allclose(rows_e[[p - pair.span[1] for p in lib[1]]],
                                              rows_e[[p - pair.span[1] for p in eng[1]]], atol=TOL)


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_kv_splice_of_the_field_is_the_engines_splice(tiny, get_pair, backend):
    """The field's K/V spliced from the new prompt into the old one's cache: the engine's decode and one patched
    full forward agree, and the splice moves the logits (so the agreement is not vacuous)."""
    from circuits.common import library_backend
    from kvnotes.engine import Splice, SpliceEngine
    from kvnotes.interventions import Capture, kv_splice
    from probes.common import prefill_pair
    pair = get_pair(tiny, "diverse")
    (a, b), d = pair.span, pair.dpos
    stale, oracle, last = prefill_pair(tiny.model, pair)
    eng = SpliceEngine(tiny.model, stale, oracle, last).run([Splice(tuple(range(a, b)))])[0]
    be = library_backend(tiny, backend)
    caps = [Capture(s, li) for li in range(be.n_layers) for s in ("k", "v")]
    old, new = pair.old_ids[:d + 1], pair.new_ids[:d + 1]
    run_old, run_new = be.run(old, captures=caps), be.run(new, captures=caps)
    lib = be.run(old, kv_splice(run_new.acts, run_old.acts, be.n_layers, range(a, b), d)).logits[-1]
    assert float((lib - eng).abs().max()) <= TOL
    assert float((lib - run_old.logits[-1]).abs().max()) > 1e-3, "the field splice does not move the logits"
    with pytest.raises(ValueError, match="must be non-empty"):
        kv_splice(run_new.acts, run_old.acts, be.n_layers, [d], d)


def _spy(monkeypatch) -> list:
    from nnsight.intervention.backends.local import LocalSimulationBackend
    shipped, real_call = [], LocalSimulationBackend.__call__

    def spy(self, tracer):
        shipped.append(1)
        return real_call(self, tracer)
    monkeypatch.setattr(LocalSimulationBackend, "__call__", spy)
    return shipped


def test_a_circuit_probe_runs_down_the_remote_path_and_gives_the_engines_record(tmp_path, monkeypatch):
    args = ("probe=components", "model=tiny-llama", *RELAXED)
    local = run_module.run(_cfg(tmp_path / "engine", *args))
    shipped = _spy(monkeypatch)
    remote = run_module.run(_cfg(tmp_path / "remote", *args, "+model.remote=local", "probe.backend=nnsight"))
    assert remote["config"]["model"]["remote"] == "local"
    assert len(shipped) >= 2 * len(remote["instances"]), "the traces did not go through nnsight's remote path"
    assert [r["id"] for r in remote["instances"]] == [r["id"] for r in local["instances"]]
    for a, b in zip(local["instances"], remote["instances"]):
        assert b["m_stale"] == pytest.approx(a["m_stale"], abs=TOL) and b["delta_m"] == pytest.approx(a["delta_m"],
                                                                                                         abs=TOL)
        assert b["note"] == a["note"]
        for T, got in b["by_T"].items():
            assert got.get("attn_share") == pytest.approx(a["by_T"][T].get("attn_share"), abs=1e-3)


def test_a_remote_model_runs_only_through_nnsight(tmp_path):
    lm = load_model("tiny-llama")
    remote = type(lm)(lm.model, lm.tokenizer, {**lm.spec, "remote": "local"}, lm.info)
    assert check_backend(remote.spec, "nnsight") == "nnsight" and check_backend(lm.spec, "engine") == "engine"
    for backend in ("engine", "transformer_lens"):
        with pytest.raises(ValueError, match="add probe.backend=nnsight"):
            check_backend(remote.spec, backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend(lm.spec, "pyvene")
    with pytest.raises(ValueError, match="add probe.backend=nnsight"):
        run_module.run(_cfg(tmp_path, "probe=components", "model=tiny-llama", "+model.remote=local", *RELAXED))
    for probe in ("scrub", "locality"):       # no library path: refused before the model loads
        with pytest.raises(ValueError, match="has no such path; the circuit probes heads"):
            run_module.run(_cfg(tmp_path / probe, f"probe={probe}", "model=tiny-llama", "+model.remote=local",
                                *RELAXED))


def test_the_ndif_model_says_what_it_needs_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=0"):
        load_model("llama3.1-8b-ndif")
    spec = {"name": "x-ndif", "kind": "ndif", "hf_name": "org/x", "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="remote: true"):
        load_model(spec)


def test_an_ndif_model_loads_with_meta_weights(tmp_path, monkeypatch):
    """kind ndif builds nnsight's model with meta weights from the repo's config and tokenizer (here a tiny model
    saved to a directory stands in for the Hub repo): the loader's record fields and the backend's shapes come from
    the config, and no weight is materialised."""
    from circuits.common import library_backend
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path / "repo")
    tiny.tokenizer.save_pretrained(tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    spec = {"name": "tiny-ndif", "kind": "ndif", "hf_name": str(tmp_path / "repo"), "remote": True,
            "dtype": "float32", "prepend_bos": False, "plain_prompt": None}
    lm = load_model(spec)
    assert lm.info["kind"] == "ndif" and lm.info["n_layers"] == tiny.info["n_layers"]
    assert lm.info["n_params"] == tiny.info["n_params"]
    assert all(p.device.type == "meta" for p in lm.model._module.parameters())
    be = library_backend(lm, "nnsight")
    assert (be.n_layers, be.n_heads, be.d_head) == (tiny.info["n_layers"], tiny.info["n_heads"],
                                                    tiny.info["d_model"] // tiny.info["n_heads"])
    assert be.remote is True
    with pytest.raises(ValueError, match="add probe.backend=nnsight"):
        check_backend(lm.spec, "engine")


def test_the_heads_probe_on_a_hosted_model_leaves_out_what_needs_local_weights(tmp_path, monkeypatch):
    """remote=true (an NDIF model) takes the branches a dry run does not: no DLA, no attention patterns, each said
    in the record. Here nnsight's dry run stands in for NDIF (NNsightBackend's remote=True becomes 'local'), so the
    same traces run and every exact patch is still measured."""
    import circuits.common as common
    from kvnotes.interventions import NNsightBackend

    class DryRunForNDIF(NNsightBackend):
        def __init__(self, model, tokenizer=None, remote=False):
            super().__init__(model, tokenizer, remote="local" if remote is True else remote)
    monkeypatch.setattr(common, "NNsightBackend", DryRunForNDIF)
    shipped = _spy(monkeypatch)
    rec = run_module.run(_cfg(tmp_path, "probe=heads", "model=tiny-llama", "+model.remote=true", "probe.backend=nnsight",
                              "probe.n_null=5", "probe.n_null_write=3", *RELAXED))
    assert shipped, "the traces did not go through nnsight's remote path"
    agg = rec["aggregate"]
    assert "not_computed" in agg["read"]["dla_vs_exact"] and "attention_not_computed" in agg
    assert all("dla_read" not in r and r["dla_exact_path"] is None for r in rec["instances"])
    assert all(e["attn_mean"] is None and "dla_mean" not in e for e in agg["read"]["heads_ranked"])
    assert all(len(r["single_read"]) == r["n_layers"] * r["n_heads"] for r in rec["instances"] if "single_read" in r)
