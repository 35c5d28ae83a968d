"""Attribution patching (AtP) of cache-state splices: a first-order estimate of every splice's effect, from one
decode step and its backward on the base cache.

For a splice that moves K/V at (layer l, KV head h, position p) from base to source, the change of a readout logit
y is estimated as  dy/dK[l,h,p] . (K_src - K_base)[l,h,p]  +  dy/dV[l,h,p] . (V_src - V_base)[l,h,p].
Summing these terms gives the estimate for any set of (layer, head, position) entries: a single position over all
layers and heads, or a whole (layer, KV head) over a range of positions.

The estimate is a *ranking* aid. It is linear in the edit, so it misses saturation and interactions (softmax
renormalisation when a large score moves); its agreement with the exact splices must be measured, never assumed.
`probes/attribution.py` measures it against the batched engine's exact results and records both.
"""
from __future__ import annotations

import torch

from kvnotes import kv


def kv_gradients(model, base, last_token: int, tokens) -> tuple[list, list, torch.Tensor]:
    """Gradients of each readout logit in `tokens` w.r.t. every layer's stored K and V of `base`.

    Returns (grad_k, grad_v, logits): grad_k[l] is `[n_tokens, kvh, Lc, d]` (Lc = that layer's stored positions),
    logits the fp32 decode logits of `tokens` on the unspliced base."""
    cache = kv.splice(base, base, [])                 # a private copy: the decode step appends to it
    leaves_k, leaves_v = [], []
    with torch.inference_mode(False), torch.enable_grad():
        for layer in cache.layers:
            layer.keys = layer.keys.detach().clone().requires_grad_(True)
            layer.values = layer.values.detach().clone().requires_grad_(True)
            leaves_k.append(layer.keys)
            leaves_v.append(layer.values)
        ids = torch.tensor([[int(last_token)]])
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        tokens = [int(t) for t in tokens]
        grads_k = [[] for _ in leaves_k]
        grads_v = [[] for _ in leaves_v]
        for i, t in enumerate(tokens):
            g = torch.autograd.grad(logits[t], leaves_k + leaves_v, retain_graph=i < len(tokens) - 1)
            for li in range(len(leaves_k)):
                grads_k[li].append(g[li][0])
                grads_v[li].append(g[len(leaves_k) + li][0])
    return ([torch.stack(g).float() for g in grads_k], [torch.stack(g).float() for g in grads_v],
            logits.detach()[tokens].float())


def splice_attribution(model, base, source, last_token: int, tokens) -> dict:
    """AtP terms of every (token, layer, KV head, absolute position) K/V splice from `source` into `base`.

    Returns {"terms": [n_tokens, n_layers, kvh, L] (K term + V term; 0 where a sliding layer stores nothing),
             "k_terms", "v_terms": the same split by K and V, "logits": [n_tokens] base logits}."""
    grads_k, grads_v, logits = kv_gradients(model, base, last_token, tokens)
    n_tok, length = len(list(tokens)), kv.cache_length(base)
    n_layers, kvh = len(base.layers), base.layers[0].keys.shape[1]
    k_terms = torch.zeros(n_tok, n_layers, kvh, length)
    v_terms = torch.zeros(n_tok, n_layers, kvh, length)
    for li, (lb, ls) in enumerate(zip(base.layers, source.layers)):
        off = kv._layer_offset(lb)
        dk = (ls.keys[0] - lb.keys[0]).float()       # [kvh, Lc, d]
        dv = (ls.values[0] - lb.values[0]).float()
        k_terms[:, li, :, off:] = torch.einsum("tkpd,kpd->tkp", grads_k[li], dk)
        v_terms[:, li, :, off:] = torch.einsum("tkpd,kpd->tkp", grads_v[li], dv)
    return {"terms": k_terms + v_terms, "k_terms": k_terms, "v_terms": v_terms, "logits": logits}


def ranks(x) -> torch.Tensor:
    """Average ranks (1-based) of a 1-D tensor, ties sharing their mean rank."""
    x = torch.as_tensor(x, dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):                            # ties: replace by their mean rank
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.bincount(inverse, minlength=len(uniq)).double()
        r = (sums / counts)[inverse]
    return r


def pearson(x, y) -> float | None:
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    den = float(xc.norm() * yc.norm())
    return float((xc * yc).sum()) / den if den > 0 else None


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when either side is constant."""
    return pearson(ranks(x), ranks(y))


def top_k_overlap(estimate, exact, k: int) -> float:
    """|top-k of the estimate ∩ top-k of the exact values| / k, ranking both by magnitude."""
    k = min(k, len(exact))
    a = set(torch.topk(torch.as_tensor(estimate).abs(), k).indices.tolist())
    b = set(torch.topk(torch.as_tensor(exact).abs(), k).indices.tolist())
    return len(a & b) / k


def agreement(estimate, exact, ks=(1, 4, 8, 16)) -> dict:
    """How well an estimate ranks the exact effects: Spearman, Pearson, top-k overlaps by magnitude, and the
    overlap a random ranking would get on average (k / n), for reading the top-k numbers."""
    n = len(exact)
    out = {"n": n, "spearman": spearman(estimate, exact), "pearson": pearson(estimate, exact)}
    for k in ks:
        if k <= n:
            out[f"top{k}_overlap"] = top_k_overlap(estimate, exact, k)
            out[f"top{k}_overlap_random"] = k / n
    return out
