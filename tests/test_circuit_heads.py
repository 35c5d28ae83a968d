"""The read / write heads probe (circuits/heads.py) end to end on a tiny model through run.run, checked against
independent computations: a single-head and a joint patch recomputed with the nnsight backend's full forward, the
sanity that every head at the decision token gives the clean decision, cross-fitted sets that never see the pair's
own domain, nulls of the declared size, and DLA equal to the direct path recomputed by hand."""
from __future__ import annotations

import pytest
import torch

import run as run_module
from circuits import heads
from kvnotes.interventions import Capture, HeadPatch, NNsightBackend
from kvnotes.models import load_model
from scenarios import make_instances
from scenarios.render import align
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("heads"), "probe=heads", "model=tiny-llama",
                               "probe.n_null=30", "probe.n_null_write=20", *RELAXED))


def _setup(row):
    lm = load_model("tiny-llama")
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    return lm, pair, NNsightBackend(lm.model, lm.tokenizer)


def _recovery(rec, row, lm, pair, nns, ivs) -> float:
    ro = next(g for g in rec["readout"]["per_group"] if set(g["candidates"].values()) == set(pair.instance.candidates))
    logits = nns.run(pair.old_ids, ivs).logits[-1]
    return (float(logits[ro["safe_id"]] - logits[ro["unsafe_id"]]) - row["m_stale"]) / row["delta_m"]


def test_patches_equal_independent_full_forward_patches(record):
    row = max(record["instances"], key=lambda r: abs(r["delta_m"]))
    lm, pair, nns = _setup(row)
    H = row["n_heads"]
    z = {c.layer: v for c, v in nns.run(pair.new_ids, captures=[Capture("z", li)
                                                                for li in range(nns.n_layers)]).acts.items()}
    d, notes = pair.dpos, row["notes"]
    for sweep, pos in (("read", [d]), ("write1", notes[:1]), ("writeN", sorted(notes))):
        for i in (0, H + 1):                                   # a layer-0 head and a layer-1 head
            li, h = divmod(i, H)
            ivs = [HeadPatch(li, h, pos, z[li][pos, h])]
            assert row[f"single_{sweep}"][i] == pytest.approx(_recovery(record, row, lm, pair, nns, ivs), abs=1e-4)
        s = row["plan"]["sets"][sweep]["in"]["3"]              # the joint top-3, ranked by the singles
        ivs = [HeadPatch(i // H, i % H, pos, z[i // H][pos, i % H]) for i in s]
        assert row[f"cum_{sweep}"]["in"]["3"] == pytest.approx(_recovery(record, row, lm, pair, nns, ivs), abs=1e-4)
        single = row[f"single_{sweep}"]
        assert min(single[i] for i in s) >= max(single[i] for i in range(len(single)) if i not in s)


def test_plan_invariants_and_sanity(record):
    n_heads = record["instances"][0]["n_layers"] * record["instances"][0]["n_heads"]
    by_scenario = {r["id"]: r["scenario"] for r in record["instances"]}
    for row in record["instances"]:
        for sweep in heads.SWEEPS:
            sets = row["plan"]["sets"][sweep]
            assert row["scenario"] not in sets["cf_scenarios"]
            assert set(sets["cf_scenarios"]) <= set(by_scenario.values())
            n = 30 if sweep == "read" else 20
            assert {k: len(v) for k, v in row[f"null_{sweep}"].items() if k != "1"} == {
                str(k): n for k in heads.KS if 1 < k < n_heads}
            assert len(row[f"null_{sweep}"]["1"]) == n_heads          # k = 1: exhaustive
    # sanity, true by construction: every head's z at the decision token is the clean decision
    assert record["sanity"]["read_all_heads_recovery"]
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in record["sanity"]["read_all_heads_recovery"])
    agg = record["aggregate"]["read"]
    assert set(agg) >= {"heads_ranked", "cum_in", "cum_cf", "null", "stability", "dla_vs_exact"}
    assert agg["null"]["2"]["B"] >= 2000 and "p_in_ge_null" in agg["null"]["2"]


def test_dla_is_the_direct_path(record):
    """DLA of a head, recomputed by hand: W_O^h (z_clean - z_corrupt) . grad of the margin through the final norm."""
    row = max(record["instances"], key=lambda r: abs(r["delta_m"]))
    lm, pair, nns = _setup(row)
    ro = next(g for g in record["readout"]["per_group"]
              if set(g["candidates"].values()) == set(pair.instance.candidates))
    L, H, dh, d = nns.n_layers, nns.n_heads, nns.d_head, pair.dpos
    caps = [Capture("z", L - 1), Capture("resid_post", L - 1)]
    clean, corrupt = nns.run(pair.new_ids, captures=caps).acts, nns.run(pair.old_ids, captures=caps).acts
    r = corrupt[Capture("resid_post", L - 1)][d].clone().requires_grad_(True)
    with torch.enable_grad():
        lg = lm.model.lm_head(lm.model.model.norm(r))
        (lg[ro["safe_id"]] - lg[ro["unsafe_id"]]).backward()
    h = 1
    w = lm.model.model.layers[L - 1].self_attn.o_proj.weight[:, h * dh:(h + 1) * dh].detach()
    dz = clean[Capture("z", L - 1)][d, h] - corrupt[Capture("z", L - 1)][d, h]
    expect = float((w @ dz) @ r.grad) / row["delta_m"]
    assert row["dla_read"][(L - 1) * H + h] == pytest.approx(expect, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_the_backends_give_the_engines_numbers(record, tmp_path, backend):
    """probe.backend switches the patching to one full forward per set through nnsight or the TransformerLens
    bridge: every per-pair number of the record (singles, joint sets, nulls) is the engine's."""
    other = run_module.run(_cfg(tmp_path, "probe=heads", "model=tiny-llama", "probe.n_null=30", "probe.n_null_write=20",
                                f"probe.backend={backend}", *RELAXED))
    assert other["config"]["probe"]["backend"] == backend
    for a, b in zip(record["instances"], other["instances"]):
        assert a["id"] == b["id"]
        tol = max(1e-4, 2e-5 / abs(a["delta_m"]))      # 2e-5 in logits; recoveries divide by a tiny model's delta m
        for sweep in heads.SWEEPS:
            assert b[f"single_{sweep}"] == pytest.approx(a[f"single_{sweep}"], abs=tol)
            assert b[f"cum_{sweep}"]["in"] == pytest.approx(a[f"cum_{sweep}"]["in"], abs=tol)
            for k, v in a[f"null_{sweep}"].items():
                assert b[f"null_{sweep}"][k] == pytest.approx(v, abs=tol)
