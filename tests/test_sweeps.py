"""The position (P2) and layer (P3) sweep probes end to end on a tiny model: every position / layer is there, values
equal an independent materialised splice, and the sweeps' identities hold (sanity checks, labelled as such)."""
import pytest
import torch

import run as run_module
from kvnotes import kv
from kvnotes.models import load_model
from scenarios import make_instances
from scenarios.render import align
from test_run import _cfg
from conftest import N_DIVERSE

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


def _slow_margin_change(rec, row, **splice_kwargs) -> float:
    """m(spliced) - m(stale) by kv.splice + kv.decode, for the record's pair, under the record's readout."""
    lm = load_model("tiny-llama")
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    ro = next(g for g in rec["readout"]["per_group"]
              if (g["safe"], g["unsafe"], set(g["candidates"].values())) == (inst.safe, inst.unsafe,
                                                                             set(inst.candidates)))
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    d = pair.dpos
    stale, oracle = kv.prefill(lm.model, pair.old_ids[:d]), kv.prefill(lm.model, pair.new_ids[:d])
    logits = kv.decode(lm.model, [stale, kv.splice(stale, oracle, **splice_kwargs)], int(pair.old_ids[d]))
    m = logits[:, ro["safe_id"]] - logits[:, ro["unsafe_id"]]
    return float(m[1] - m[0])


def test_position_sweep_covers_every_position_and_matches_a_materialised_splice(tmp_path):
    rec = run_module.run(_cfg(tmp_path, "probe=positions", "model=tiny-llama", *RELAXED))
    assert rec["summary"]["n_included"] == N_DIVERSE
    for row in rec["instances"]:
        a, dpos = row["tokens"]["span"][0], row["tokens"]["dpos"]
        assert row["positions"] == list(range(a, dpos)) and len(row["recovery"]) == dpos - a
        rec_t = torch.tensor(row["recovery"])
        for name, mean in row["region_recovery"].items():
            lo, hi = row["tokens"]["regions"][name]
            assert mean == pytest.approx(float(rec_t[max(lo, a) - a:hi - a].mean()))
        assert row["top_recovery"] == pytest.approx(float(rec_t.max()))
    row = rec["instances"][0]
    # the position with the largest effect, so that the comparison is not between two near-zeros (a middle position
    # of a random tiny model can move the margin by ~1e-8); and one other, from the middle, checked the same way
    i_top = int(torch.tensor(row["recovery"]).abs().argmax())
    for i in (i_top, len(row["positions"]) // 2):
        want = _slow_margin_change(rec, row, positions=[row["positions"][i]])   # in logits: Δm may be tiny
        assert row["recovery"][i] * row["delta_m"] == pytest.approx(want, abs=2e-6)
    assert abs(_slow_margin_change(rec, row, positions=[row["positions"][i_top]])) > 1e-5
    assert sum(rec["aggregate"]["top_position_region_counts"].values()) == N_DIVERSE


def test_layer_sweep_single_layers_and_cumulative_identities(tmp_path):
    rec = run_module.run(_cfg(tmp_path, "probe=layers", "model=tiny-llama", *RELAXED))
    n = rec["summary"]["n_layers"]
    row = rec["instances"][0]
    assert len(row["single"]) == len(row["upto"]) == len(row["from"]) == n
    # sanity (true by construction): all layers = the full-downstream splice = the oracle
    lo, hi = rec["sanity"]["full_splice_recovery_range"]
    worst_dm = min(abs(r["delta_m"]) for r in rec["instances"])
    assert abs(lo - 1) * worst_dm < 1e-4 and abs(hi - 1) * worst_dm < 1e-4
    assert row["upto"][0] == pytest.approx(row["single"][0]) and row["from"][-1] == pytest.approx(row["single"][-1])
    a, dpos = row["tokens"]["span"][0], row["tokens"]["dpos"]
    want = _slow_margin_change(rec, row, positions=range(a, dpos), layers=[n - 1])
    assert row["single"][n - 1] * row["delta_m"] == pytest.approx(want, abs=2e-6)
    assert abs(want) > 1e-5
    assert len(rec["aggregate"]["single_by_layer"]) == n
