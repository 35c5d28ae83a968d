"""kvnotes.heads.HeadPatchEngine (batched head output patching from a shared prefix) against the reference
realisation, `HeadPatch` in a full nnsight forward, on the three tiny architectures (fp32): read heads at the
decision token and write heads at an earlier position with everything after it recomputed, single heads and joint
sets mixed in one batch across chunk boundaries; the unpatched row equals the plain forward; bad patches are refused.

On tiny-gemma3 the prefix is longer than the sliding window, so the window's mask is exercised."""
from __future__ import annotations

import pytest
import torch

from kvnotes.heads import HeadPatchEngine, HeadSet
from kvnotes.interventions import Capture, HeadPatch, NNsightBackend

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-4


def max_abs(x, y) -> float:
    return float((x.float() - y.float()).abs().max())


@pytest.fixture
def setup(tiny, get_pair):
    pair = get_pair(tiny, "diverse")
    nns = NNsightBackend(tiny.model, tiny.tokenizer)
    caps = [Capture("z", li) for li in range(nns.n_layers)]
    z_clean = nns.run(pair.new_ids, captures=caps).acts
    return tiny, pair, nns, {c.layer: z for c, z in z_clean.items()}


def reference(nns, ids, hs: HeadSet) -> torch.Tensor:
    ivs = [HeadPatch(int(l), int(h), [int(p)], v[None]) for l, h, p, v in
           zip(hs.layers, hs.heads, hs.positions, hs.values)]
    return nns.run(ids, ivs).logits[-1]


def sets_at(nns, z, positions, rng):
    """The unpatched set, every single head, and joint sets; values are the clean z plus unit noise (on a random tiny
    model clean and corrupt z differ too little at the field for the patches to move the logits measurably)."""
    z = {li: zl + torch.randn(zl.shape, generator=rng) for li, zl in z.items()}
    out = [HeadSet.of([])]
    for li in range(nns.n_layers):
        for h in range(nns.n_heads):
            out.append(HeadSet.of([(li, h, p, z[li][p, h]) for p in positions]))
    for k in (2, 3, 5):             # joint sets over layers, the cumulative top-k curve's shape
        picks = torch.randperm(nns.n_layers * nns.n_heads, generator=rng)[:k].tolist()
        out.append(HeadSet.of([(i // nns.n_heads, i % nns.n_heads, p, z[i // nns.n_heads][p, i % nns.n_heads])
                               for i in picks for p in positions]))
    return out


@pytest.mark.parametrize("mode", ["read", "write"])
def test_batched_head_patches_equal_full_forward_patches(setup, mode):
    lm, pair, nns, z = setup
    ids, d = pair.old_ids, pair.dpos
    rng = torch.Generator().manual_seed(0)
    if mode == "read":
        start, positions = d, [d]
    else:                               # patch at the field's last token and one later position, recompute the rest
        start, positions = pair.span[1] - 1, [pair.span[1] - 1, (pair.span[1] + d) // 2]
    sets = sets_at(nns, z, positions, rng)
    eng = HeadPatchEngine(lm.model, ids, start=start, chunk_size=5)          # several chunks, rows joining mid-way
    got = eng.run(sets)
    assert got.shape == (len(sets), lm.model.config.vocab_size)
    base = nns.run(ids).logits[-1]
    assert max_abs(got[0], base) <= TOL
    moved = 0.0
    for i, s in enumerate(sets):
        ref = reference(nns, ids, s)
        assert max_abs(got[i], ref) <= TOL, f"set {i}: engine vs full forward differ by {max_abs(got[i], ref):.3g}"
        moved = max(moved, max_abs(ref, base))
    assert moved > 1e-3, "no patch moved the logits; the comparison would be empty"


def test_tokens_restrict_the_unembedding(setup):
    lm, pair, nns, z = setup
    d = pair.dpos
    sets = [HeadSet.of([(0, 1, d, z[0][d, 1])])]
    eng = HeadPatchEngine(lm.model, pair.old_ids, start=d)
    full, some = eng.run(sets), eng.run(sets, tokens=[5, 7])
    assert max_abs(full[:, [5, 7]], some) <= 1e-5


def test_bad_patches_are_refused(setup):
    lm, pair, nns, z = setup
    d = pair.dpos
    eng = HeadPatchEngine(lm.model, pair.old_ids, start=d)
    with pytest.raises(ValueError, match="must lie in"):
        eng.run([HeadSet.of([(0, 0, d - 1, z[0][d, 0])])])
    with pytest.raises(ValueError, match="heads"):
        eng.run([HeadSet.of([(0, 99, d, z[0][d, 0])])])
    with pytest.raises(ValueError, match="start must"):
        HeadPatchEngine(lm.model, pair.old_ids, start=0)


def test_residual_additions_equal_full_forward_resid_add(setup):
    """Sets adding vectors to the residual after a layer (alone, several positions, with a head patch) against
    `ResidAdd` / `HeadPatch` in a full nnsight forward."""
    from kvnotes.interventions import ResidAdd
    lm, pair, nns, z = setup
    ids, d = pair.old_ids, pair.dpos
    start = pair.span[1]
    D = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    vec = lambda: torch.randn(D, generator=g)   # noqa: E731
    specs = [([], [(0, start, vec())]),
             ([], [(nns.n_layers - 1, d, vec()), (0, start + 1, vec()), (0, d, vec())]),
             ([(1, 0, d, z[1][d, 0] + 1.0)], [(0, start, vec())]),
             ([], [])]
    eng = HeadPatchEngine(lm.model, ids, start=start, chunk_size=3)
    got = eng.run([HeadSet.of(p, a) for p, a in specs])
    for i, (patches, adds) in enumerate(specs):
        ivs = [HeadPatch(li, h, [p], v[None]) for li, h, p, v in patches]
        ivs += [ResidAdd(li, [p], v[None]) for li, p, v in adds]
        ref = nns.run(ids, ivs).logits[-1]
        assert max_abs(got[i], ref) <= TOL, f"set {i}: {max_abs(got[i], ref):.3g}"
    assert max_abs(got[0], got[3]) > 1e-3          # the addition moves the logits
    with pytest.raises(ValueError, match="add_vectors"):
        eng.run([HeadSet.of([], [(0, start, torch.zeros(3))])])
