"""The conclusion-direction probe (circuits/direction.py): the DoM direction of a planted signal is recovered; on a
tiny model end to end, the directions are fitted without the pair's own domain, the full difference added at the
notes equals a ResidAdd recomputed with the nnsight backend, and the nulls have the declared size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import run as run_module
from circuits import direction
from kvnotes.interventions import ResidAdd, NNsightBackend
from kvnotes.models import load_model
from scenarios import make_instances
from scenarios.render import align
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


def test_dom_recovers_a_planted_direction():
    rng = np.random.default_rng(0)
    D, n = 64, 400
    planted = rng.normal(size=D)
    planted /= np.linalg.norm(planted)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, D)) + np.outer(2 * y - 1, planted) * 1.5
    dirs = direction.fit_directions(X, y)
    assert dirs["dm"] @ planted > 0.9
    assert dirs["probe"] @ planted > 0.5
    assert np.linalg.norm(dirs["dm"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both conclusions"):
        direction.fit_directions(X, np.zeros(n, dtype=int))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("direction"), "probe=direction", "model=tiny-llama",
                               "probe.n_random=6", "probe.n_random_necessity=4", "probe.n_notes=3",
                               "probe.layer_fracs=[0.5,1.0]", *RELAXED))


def test_end_to_end_against_an_independent_resid_add(record):
    rows = [r for r in record["instances"] if r["layers"]]
    assert rows
    for r in rows:
        assert r["scenario"] not in r["train_scenarios"]
        for li, v in r["layers"].items():
            assert len(v["random"]) == 6 and len(v["random_necessity"]) == 4
    row = max(rows, key=lambda r: abs(r["delta_m"]))
    lm = load_model("tiny-llama")
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    nns = NNsightBackend(lm.model, lm.tokenizer)
    ro = next(g for g in record["readout"]["per_group"] if set(g["candidates"].values()) == set(inst.candidates))
    li = max(row["layers"], key=int)
    clean, corrupt = direction._resid(lm, pair, [int(li)], row["notes"])
    delta = clean[int(li)] - corrupt[int(li)]
    logits = nns.run(pair.old_ids, [ResidAdd(int(li), row["notes"], delta)]).logits[-1]
    rec = (float(logits[ro["safe_id"]] - logits[ro["unsafe_id"]]) - row["m_stale"]) / row["delta_m"]
    assert row["layers"][li]["full"] == pytest.approx(rec, abs=1e-4)
    if int(li) == lm.model.config.num_hidden_layers - 1:    # nothing reads a note's residual after the last layer
        assert abs(row["layers"][li]["full"]) < 1e-4
    agg = record["aggregate"][li]
    assert agg["random_null"]["B"] >= 2000 and "p_along_dm_ge_null" in agg["random_null"]

