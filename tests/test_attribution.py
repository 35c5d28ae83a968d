"""Attribution patching: the gradient terms are right (first order of the exact effect), and the agreement
statistics are the textbook ones. The agreement between AtP and exact splicing on real models is a measurement
(probes/attribution.py), not something a test can assert."""
from __future__ import annotations

import pytest
import torch

from kvnotes import kv
from kvnotes.attribution import agreement, kv_gradients, ranks, spearman, splice_attribution, top_k_overlap
from kvnotes.engine import Splice, SpliceEngine

pytestmark = pytest.mark.usefixtures("single_thread")


def scaled_source(base, direction, eps):
    """A cache equal to base + eps * direction (per layer, keys and values)."""
    out = kv.splice(base, base, [])
    for lo, (dk, dv) in zip(out.layers, direction):
        lo.keys = lo.keys + eps * dk
        lo.values = lo.values + eps * dv
    return out


def test_atp_is_the_first_order_term_of_the_exact_effect(tiny, case):
    """Exact effect(eps) - AtP(eps) must shrink like eps^2: halving eps quarters the error. A wrong gradient (wrong
    layer, sign, K/V swapped, positions shifted) leaves an error of order eps and fails."""
    c = case(tiny, "diverse")
    stale = c.stale
    gen = torch.Generator().manual_seed(0)
    direction = [(torch.randn(lo.keys.shape, generator=gen), torch.randn(lo.values.shape, generator=gen))
                 for lo in stale.layers]
    P = tuple(range(c.a, c.d))
    # the two tokens whose logits this perturbation moves most (fixed ids would depend on the tiny vocabulary)
    src = scaled_source(stale, direction, 0.01)
    moved = SpliceEngine(c.model, stale, src, c.last).run([Splice(P), Splice(())], tokens=None)
    tok = (moved[0] - moved[1]).abs().topk(2).indices.tolist()
    errs, atps = [], []
    for eps in (0.01, 0.005):       # small enough that the eps^2 remainder is < 10 % of the effect
        src = scaled_source(stale, direction, eps)
        exact = SpliceEngine(c.model, stale, src, c.last).run([Splice(P), Splice(())], tokens=tok)
        exact = exact[0] - exact[1]
        terms = splice_attribution(c.model, stale, src, c.last, tok)["terms"]
        atp = terms[..., c.a:c.d].sum((1, 2, 3))
        errs.append(float((exact - atp).abs().max()))
        atps.append(float(atp.abs().max()))
    assert atps[0] > 1e-3, "the perturbation must move the logits for the check to mean anything"
    assert errs[0] < 0.1 * atps[0], f"AtP misses the first-order effect: error {errs[0]:.3g} vs effect {atps[0]:.3g}"
    assert errs[1] < errs[0] / 2.5, f"error does not fall like eps^2: {errs}"


def test_atp_per_position_terms_locate_a_single_position_edit(tiny, case):
    """Perturb one position only: all AtP mass must sit at that position."""
    c = case(tiny, "diverse")
    stale = c.stale
    p = (c.b + c.d) // 2
    direction = []
    for lo in stale.layers:
        dk, dv = torch.zeros_like(lo.keys), torch.zeros_like(lo.values)
        idx = p - kv._layer_offset(lo)
        if idx >= 0:
            dk[:, :, idx] = 1.0
            dv[:, :, idx] = 1.0
        direction.append((dk, dv))
    terms = splice_attribution(c.model, stale, scaled_source(stale, direction, 0.1), c.last, [3])["terms"][0]
    per_pos = terms.sum((0, 1))
    assert float(per_pos[p].abs()) > 0
    others = torch.cat([per_pos[:p], per_pos[p + 1:]])
    assert float(others.abs().max()) == 0.0


def test_atp_base_point_is_the_decode(tiny, case):
    c = case(tiny, "diverse")
    _, _, logits = kv_gradients(c.model, c.stale, c.last, [3, 11])
    ref = kv.decode(c.model, [c.stale], c.last)[0, [3, 11]]
    assert float((logits - ref).abs().max()) <= 1e-5
    # and the base cache is left as it was (the gradient pass works on a copy)
    assert all(not lo.keys.requires_grad for lo in c.stale.layers)


def test_ranks_and_spearman_reference_values():
    assert ranks([10, 30, 20]).tolist() == [1.0, 3.0, 2.0]
    assert ranks([1, 2, 2, 3]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # textbook example with a tie: x = (1, 2, 3, 4, 5), y = (2, 1, 4, 3, 3); rho from ranks by hand
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 3]
    ry = [2.0, 1.0, 5.0, 3.5, 3.5]
    rx = [1.0, 2.0, 3.0, 4.0, 5.0]
    mx, my = sum(rx) / 5, sum(ry) / 5
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    assert spearman(x, y) == pytest.approx(num / den)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_top_k_overlap_ranks_by_magnitude_and_reports_the_random_baseline():
    exact = torch.tensor([0.0, -5.0, 1.0, 4.0, 0.1])
    assert top_k_overlap(torch.tensor([0.0, 9.0, 0.0, 8.0, 0.0]), exact, 2) == 1.0
    assert top_k_overlap(torch.tensor([9.0, 0.0, 8.0, 0.0, 0.0]), exact, 2) == 0.0
    assert top_k_overlap(torch.tensor([0.0, 9.0, 8.0, 0.0, 0.0]), exact, 2) == 0.5
    a = agreement(torch.tensor([0.0, 9.0, 8.0, 0.0, 0.0]), exact, ks=(1, 4, 8))
    assert a["n"] == 5 and a["top4_overlap_random"] == 0.8 and "top8_overlap" not in a
