"""The attention-vs-MLP write attribution probe (circuits/components.py) on the three tiny architectures: the parts
sum to the whole (an identity, Gemma-3's post-norms included), the shares equal the same decomposition computed from
the TransformerLens bridge's hooks, and bad readout fractions are refused."""
from __future__ import annotations

import pytest
import torch

import run as run_module
from circuits import components
from kvnotes.interventions import Capture, lens_backend
from scenarios import make_instances
from scenarios.render import align
from test_run import _cfg

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_parts_sum_and_the_bridge_agrees(tmp_path, model, tiny_by_name):
    torch.set_num_threads(1)
    rec = run_module.run(_cfg(tmp_path, "probe=components", f"model={model}", *RELAXED))
    assert rec["sanity"]["decomposition_error_max"] < 1e-4
    row = max(rec["instances"], key=lambda r: r["by_T"][max(r["by_T"], key=int)]["norm"])
    lm = tiny_by_name(model)
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    tl = lens_backend(lm)
    caps = [Capture(s, li) for s in components.SITES for li in range(tl.n_layers)]
    clean, corrupt = tl.run(pair.new_ids, captures=caps).acts, tl.run(pair.old_ids, captures=caps).acts
    for T, got in row["by_T"].items():
        ref = components.decompose(clean, corrupt, row["note"], int(T))
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-4)
        assert got["attn_share"] == pytest.approx(sum(ref["attn"]), abs=1e-4)
        assert got["mlp_share"] == pytest.approx(sum(ref["mlp"]), abs=1e-4)
        assert abs(got["embed_share"]) < 1e-5                 # a downstream token is the same in both prompts
    assert set(rec["aggregate"]) == {str(t) for t in components.readout_layers([0.33, 0.5, 0.67, 1.0], row["n_layers"])}


def test_readout_fractions_are_checked():
    assert components.readout_layers([0.5, 1.0], 28) == [14, 27]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        components.readout_layers([0.0, 1.5], 28)
