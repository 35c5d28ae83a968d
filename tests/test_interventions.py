"""The intervention vocabulary (kvnotes.interventions) on its two backends, nnsight and the TransformerLens bridge,
on the three tiny architectures (fp32): every primitive gives equal numbers on both, each moves the logits (so the
agreement is not vacuous), and the circuit invariants of paper_spec §9.4 hold on each backend: patching a head with
its own value is a no-op, patching every head of a layer equals patching the layer's attention output, the parts of
the residual stream sum to the whole (Gemma-3's extra norms included), and the logit lens at the last layer is the
model's output.

Pair: diverse order_cancel/000 on each tiny model; the clean run is the new prompt, the corrupt run the old one."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from kvnotes.interventions import (Ablate, Capture, HeadPatch, NNsightBackend, Patch, ResidAdd, ResidProject, SITES,
                                   lens_backend)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-4        # fp32 agreement between the backends
MOVES = 1e-3      # each intervention below moves some logit by more than this on every tiny model


def max_abs(x, y) -> float:
    return float((x.float() - y.float()).abs().max())


class Pair:
    def __init__(self, lm, pair):
        self.lm = lm
        self.clean, self.corrupt = pair.new_ids, pair.old_ids
        self.a, self.b, self.d = *pair.span, pair.dpos

    @functools.cached_property
    def nns(self):
        return NNsightBackend(self.lm.model, self.lm.tokenizer)

    @functools.cached_property
    def tl(self):
        return lens_backend(self.lm)      # the bridge on its own copy of the weights

    @functools.cached_property
    def clean_acts(self):
        caps = [Capture(s, li) for s in SITES for li in range(self.nns.n_layers)]
        return self.nns.run(self.clean, captures=caps).acts

    def backends(self):
        return self.nns, self.tl


_PAIRS: dict = {}


@pytest.fixture
def pair(tiny, get_pair):
    name = tiny.spec["name"]
    if name not in _PAIRS:
        _PAIRS[name] = Pair(tiny, get_pair(tiny, "diverse"))
    return _PAIRS[name]


def test_unpatched_runs_equal_the_hf_forward(pair):
    with torch.inference_mode():
        ref = pair.lm.model(input_ids=pair.corrupt[None]).logits[0].float()
    for be in pair.backends():
        assert max_abs(be.run(pair.corrupt).logits, ref) <= TOL, be.name


@pytest.mark.parametrize("site", SITES)
def test_captures_agree(pair, site):
    caps = [Capture(site, li) for li in range(pair.nns.n_layers)]
    a = pair.nns.run(pair.clean, captures=caps).acts
    b = pair.tl.run(pair.clean, captures=caps).acts
    for c in caps:
        assert a[c].shape == b[c].shape, (c, a[c].shape, b[c].shape)
        assert max_abs(a[c], b[c]) <= TOL * max(1.0, float(a[c].abs().max())), c
    if site == "pattern":
        S = pair.clean.numel()
        assert a[caps[0]].shape == (pair.nns.n_heads, S, S)
        torch.testing.assert_close(a[caps[0]].sum(-1), torch.ones(pair.nns.n_heads, S), atol=1e-5, rtol=0)


def interventions(pair):
    """One of each primitive, with values from the clean run placed into the corrupt run."""
    acts, L = pair.clean_acts, pair.nns.n_layers - 1
    d, field = [pair.d], list(range(pair.a, pair.b))
    resid = acts[Capture("resid_post", 0)]
    delta = resid[field] - pair.nns.run(pair.corrupt, captures=[Capture("resid_post", 0)]).acts[
        Capture("resid_post", 0)][field]
    return {
        "head_patch_decision": [HeadPatch(L, h, d, acts[Capture("z", L)][d, h]) for h in range(2)],
        "head_patch_field": [HeadPatch(0, 1, field, acts[Capture("z", 0)][field, 1])],
        "attn_patch": [Patch("attn_out", 0, field, acts[Capture("attn_out", 0)][field])],
        "mlp_patch": [Patch("mlp_out", 0, field, acts[Capture("mlp_out", 0)][field])],
        "resid_add": [ResidAdd(0, field, delta * 3)],
        "resid_project": [ResidProject(0, d, torch.randn(resid.shape[-1], generator=torch.Generator().manual_seed(0)))],
        "ablate_head": [Ablate("z", L, d, head=0)],
        "ablate_attn": [Ablate("attn_out", L, d)],
        "ablate_mlp": [Ablate("mlp_out", 0, field)],
    }


@pytest.mark.parametrize("kind", ["head_patch_decision", "head_patch_field", "attn_patch", "mlp_patch", "resid_add",
                                  "resid_project", "ablate_head", "ablate_attn", "ablate_mlp"])
def test_every_primitive_agrees_across_backends_and_moves_the_logits(pair, kind):
    ivs = interventions(pair)[kind]
    base = pair.nns.run(pair.corrupt).logits        # every position's logits: a field patch on a random tiny model
    a = pair.nns.run(pair.corrupt, ivs).logits      # moves the decision token's only slightly, the field's a lot
    b = pair.tl.run(pair.corrupt, ivs).logits
    assert max_abs(a, b) <= TOL, f"{kind}: nnsight and TransformerLens differ by {max_abs(a, b):.3g}"
    assert max_abs(a, base) > MOVES, f"{kind}: the intervention does not move the logits; the agreement is vacuous"


def test_the_remote_path_ships_the_same_intervention(pair, monkeypatch):
    """remote='local' serialises each trace as a remote (NDIF) run would, deserialises it with this project's modules
    hidden and runs it here: every primitive and capture must give the local numbers (no network involved)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    shipped = []
    real_call = LocalSimulationBackend.__call__

    def spy(self, tracer):
        shipped.append(1)
        return real_call(self, tracer)
    monkeypatch.setattr(LocalSimulationBackend, "__call__", spy)
    dry = NNsightBackend(pair.nns.envoy, remote="local")
    caps = [Capture(s, pair.nns.n_layers - 1) for s in SITES]
    for kind, ivs in interventions(pair).items():
        a, b = pair.nns.run(pair.corrupt, ivs, caps), dry.run(pair.corrupt, ivs, caps)
        assert max_abs(a.logits, b.logits) <= 1e-6, kind
        assert set(a.acts) == set(b.acts) == set(caps)
        for c in caps:
            assert max_abs(a.acts[c], b.acts[c]) <= 1e-6, (kind, c)
    assert len(shipped) == len(interventions(pair)), "the dry runs did not go through nnsight's remote path"


def test_patching_a_head_with_its_own_value_is_a_no_op(pair):
    L = pair.nns.n_layers - 1
    own = pair.nns.run(pair.corrupt, captures=[Capture("z", L)]).acts[Capture("z", L)]
    ivs = [HeadPatch(L, h, [pair.d], own[[pair.d], h]) for h in range(pair.nns.n_heads)]
    for be in pair.backends():
        assert max_abs(be.run(pair.corrupt, ivs).logits, be.run(pair.corrupt).logits) <= 1e-5, be.name


@pytest.mark.parametrize("layer", [0, -1])
def test_every_head_of_a_layer_equals_the_attention_output(pair, layer):
    L = layer % pair.nns.n_layers
    acts, P = pair.clean_acts, list(range(pair.a, pair.d + 1))
    heads = [HeadPatch(L, h, P, acts[Capture("z", L)][P, h]) for h in range(pair.nns.n_heads)]
    whole = [Patch("attn_out", L, P, acts[Capture("attn_out", L)][P])]
    for be in pair.backends():
        x, y = be.run(pair.corrupt, heads).logits, be.run(pair.corrupt, whole).logits
        assert max_abs(x, y) <= TOL, be.name
        assert max_abs(x, be.run(pair.corrupt).logits) > MOVES


def test_residual_decomposition_sums_to_the_whole(pair):
    """resid_post[l] - resid_post[l-1] = attn_out[l] + mlp_out[l] at every position, on both backends: what the
    attention-vs-MLP attribution (paper_spec §4.3) relies on, Gemma-3's post-norms included."""
    n = pair.nns.n_layers
    caps = [Capture(s, li) for s in ("attn_out", "mlp_out", "resid_post") for li in range(n)]
    for be in pair.backends():
        acts = be.run(pair.clean, captures=caps).acts
        for li in range(1, n):
            step = acts[Capture("resid_post", li)] - acts[Capture("resid_post", li - 1)]
            parts = acts[Capture("attn_out", li)] + acts[Capture("mlp_out", li)]
            scale = max(1.0, float(step.abs().max()))
            assert max_abs(step, parts) <= 1e-5 * scale, (be.name, li)


def test_logit_lens_at_the_last_layer_is_the_output(pair):
    L = pair.nns.n_layers - 1
    for be in pair.backends():
        run = be.run(pair.clean, captures=[Capture("resid_post", L)])
        lens = be.logit_lens(run.acts[Capture("resid_post", L)])
        assert max_abs(lens, run.logits) <= TOL, be.name


def test_bad_interventions_are_refused_with_the_reason(pair):
    z = torch.zeros(1, pair.nns.d_head)
    with pytest.raises(ValueError, match="layer 99"):
        pair.nns.run(pair.corrupt, [HeadPatch(99, 0, [1], z)])
    with pytest.raises(ValueError, match="head 99"):
        pair.tl.run(pair.corrupt, [HeadPatch(0, 99, [1], z)])
    with pytest.raises(ValueError, match="outside a"):
        pair.nns.run(pair.corrupt, [HeadPatch(0, 0, [10_000], z)])
    with pytest.raises(ValueError, match=r"len\(positions\)=2"):
        HeadPatch(0, 0, [1, 2], z)
    with pytest.raises(ValueError, match="non-zero"):
        ResidProject(0, [1], torch.zeros(8))
    with pytest.raises(ValueError, match="head= exactly"):
        Ablate("attn_out", 0, [1], head=0)
    with pytest.raises(ValueError, match="remote=True needs"):
        NNsightBackend(pair.lm.model, remote=True)


@pytest.mark.slow
def test_every_primitive_agrees_on_smollm2(get_pair):
    """The same primitives on a real model (smollm2-135m, fp32, the bridge on its own copy of the weights)."""
    from kvnotes.models import WeightsNotInstalledError, load_model
    try:
        lm = load_model("smollm2-135m", dtype="float32")
    except WeightsNotInstalledError:
        if os.environ.get("CI"):
            pytest.fail("smollm2-135m weights are not installed; `make test` installs them")
        pytest.skip("smollm2-135m weights not installed (run: make weights MODEL=smollm2-135m)")
    p = Pair(lm, get_pair(lm, "diverse"))
    base = p.nns.run(p.corrupt).logits
    assert max_abs(base, p.tl.run(p.corrupt).logits) <= TOL
    for kind, ivs in interventions(p).items():
        a, b = p.nns.run(p.corrupt, ivs).logits, p.tl.run(p.corrupt, ivs).logits
        scale = max(1.0, float(a.abs().max()))
        assert max_abs(a, b) <= TOL * scale, f"{kind}: backends differ by {max_abs(a, b):.3g}"
        assert max_abs(a, base) > MOVES, kind
