"""The causal scrubbing probe (circuits/scrub.py) end to end on a tiny model: the donors conclude as the base arm
does and differ from it (another pair), the notes' interchange equals an independent kv.splice + decode, the null
has the declared size, drifts and coverages are in range; resampling from the base's own arm changes nothing."""
from __future__ import annotations

import pytest
import torch

import run as run_module
from kvnotes import kv
from kvnotes.models import load_model
from scenarios import make_instances
from scenarios.render import align
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("scrub"), "probe=scrub", "model=tiny-llama", "n_instances=2",
                               "probe.n_null=15", *RELAXED))


def test_scrub_record(record):
    insts = {i.id: i for i in make_instances("diverse", n_instances=2, seed=0)}
    rows = [r for r in record["instances"] if "interchange" in r]
    assert rows
    for r in rows:
        assert len(r["null_notes"]) <= 15 and r["null_notes"]
        for kind, d in r["donors"].items():
            assert d["donor"] is not None and d["donor"] != r["id"]
            donor, base = insts[d["donor"]], insts[r["id"]]
            assert (d["scenario"] == base.scenario) == (kind == "instance")
        assert all(v >= 0 for v in r["drift"].values())
        for kind, cov in r["coverage"].items():
            assert all(0 <= c <= 1 for c in cov.values())
    agg = record["aggregate"]
    assert agg["null_notes"]["B"] >= 2000 and "p_notes_ge_null" in agg["null_notes"]
    assert set(agg["drift"]) == {f"{k}:{p}" for k in ("instance", "domain") for p in ("notes", "rest", "all")}


def test_notes_interchange_is_an_independent_splice(record):
    row = max((r for r in record["instances"] if "interchange" in r), key=lambda r: abs(r["delta_m"]))
    lm = load_model("tiny-llama")
    inst = next(i for i in make_instances("diverse", n_instances=2, seed=0) if i.id == row["id"])
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    ro = next(g for g in record["readout"]["per_group"] if set(g["candidates"].values()) == set(inst.candidates))
    d = pair.dpos
    stale, oracle = kv.prefill(lm.model, pair.old_ids[:d]), kv.prefill(lm.model, pair.new_ids[:d])
    logits = kv.decode(lm.model, [kv.splice(stale, oracle, row["notes"])], int(pair.old_ids[d]))[0]
    rec = (float(logits[ro["safe_id"]] - logits[ro["unsafe_id"]]) - row["m_stale"]) / row["delta_m"]
    assert row["interchange"]["notes"] == pytest.approx(rec, abs=max(1e-4, 2e-5 / abs(row["delta_m"])))


def test_resampling_from_the_base_itself_changes_nothing():
    """Sanity (true by construction): a role-mapped splice of a cache into itself, keys repositioned onto their own
    positions, is the cache."""
    lm = load_model("tiny-llama")
    inst = make_instances("diverse", n_instances=1, seed=0)[0]
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    d = pair.dpos
    stale = kv.prefill(lm.model, pair.old_ids[:d])
    same = kv.splice_mapped(lm.model, stale, stale, [(p, p) for p in range(pair.span[1], d)])
    a, b = kv.decode(lm.model, [stale, same], int(pair.old_ids[d]))
    assert float((a - b).abs().max()) <= 1e-5
