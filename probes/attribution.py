"""Attribution patching vs exact splicing: how well does the gradient estimate rank the splices it would replace?

For each aligned pair (stale = base, oracle = source):

  exact positions   every single-position K+V splice over [a, dpos), all layers (batched engine)
  exact heads       every (layer, KV head) splice of all of [a, dpos) (batched engine)
  AtP               the first-order estimate of both, from one decode step + one backward per candidate token
                    (kvnotes.attribution)

Per pair it records the exact margin changes, the estimates, and their agreement (Spearman, Pearson, top-k overlap
by magnitude, next to the k/n overlap of a random ranking), plus the time each took. AtP results are never used in
place of exact ones: this probe exists to measure whether they could be used to rank.
"""
from __future__ import annotations

import time

import torch

from kvnotes import kv
from kvnotes.attribution import agreement, splice_attribution
from kvnotes.engine import Splice, SpliceEngine
from kvnotes.stats import summarize
from probes.base import ProbeSpec
from probes.common import (Split, boot_args, end_states, margins, pair_row,
                           prefill_pair, readout_key)

CONTRACT = ProbeSpec(
    name="attribution", paper_refs=("§9.2 batching", "Step 2 attribution patching"),
    options={"batch_size": 400},             # splices per batched engine forward
    not_reanalysable="its rows keep margin changes under the run's readout (exact_pos_delta_m, ...), not the "
                     "per-token logit changes measure() returns, nor the unspliced stale / oracle states")
KS = (1, 4, 8, 16)


def measure(lm, pair, token_ids, batch_size: int = 400, check_decode: bool = False) -> dict:
    """Exact and estimated effects on every candidate token's logit, for positions and for (layer, KV head)s."""
    t0 = time.time()
    model = lm.model
    dpos, (a, _) = pair.dpos, pair.span
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(model, pair)
    states = end_states(model, stale, oracle, last, token_ids)
    n_layers, kvh = len(stale.layers), stale.layers[0].keys.shape[1]
    positions = list(range(a, dpos))
    t = time.time()
    engine = SpliceEngine(model, stale, oracle, last, chunk_size=batch_size)
    exact_pos = engine.run([Splice((p,)) for p in positions], tokens=token_ids)
    heads = [(li, h) for li in range(n_layers) for h in range(kvh)]
    exact_heads = engine.run([Splice(tuple(positions), layers=(li,), kv_heads=(h,)) for li, h in heads],
                             tokens=token_ids)
    exact_s = time.time() - t

    t = time.time()
    atp = splice_attribution(model, stale, oracle, last, token_ids)
    atp_s = time.time() - t
    terms = atp["terms"][:, :, :, a:dpos]                       # [n_tok, n_layers, kvh, n_pos]
    # the stale decode again, alone: a batch of one, as the gradient pass runs it, so that base and AtP base point
    # are the same computation (the batch-of-two decode in `states` differs from it by BLAS rounding, ~3e-8)
    base = kv.decode(model, [stale], last)[0, token_ids]
    return {
        "states": states, "token_ids": token_ids, "positions": positions, "heads": heads,
        # logit changes relative to the unspliced stale decode, [n_tok][...] (token-major)
        "exact_pos_delta": (exact_pos - base).T.tolist(),
        "atp_pos_delta": terms.sum((1, 2)).tolist(),
        "exact_head_delta": (exact_heads - base).T.tolist(),
        "atp_head_delta": terms.sum(-1).flatten(1).tolist(),
        "atp_vs_decode_max_abs": float((atp["logits"] - base).abs().max()),
        "exact_s": round(exact_s, 3), "atp_s": round(atp_s, 3), "seconds": round(time.time() - t0, 3),
    }


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Agreement of AtP with exact splicing per pair, aggregated over included gated pairs (clustered bootstrap)."""
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        delta = row["delta_m"]
        exact_pos, atp_pos = (margins(raw, ro, k, token_dim=0) for k in ("exact_pos_delta", "atp_pos_delta"))
        exact_head, atp_head = (margins(raw, ro, k, token_dim=0) for k in ("exact_head_delta", "atp_head_delta"))
        row.update({"positions": raw["positions"], "heads": raw["heads"],
               "exact_pos_delta_m": exact_pos.tolist(), "atp_pos_delta_m": atp_pos.tolist(),
               "exact_head_delta_m": exact_head.tolist(), "atp_head_delta_m": atp_head.tolist(),
               "positions_agreement": agreement(atp_pos, exact_pos, KS),
               "heads_agreement": agreement(atp_head, exact_head, KS),
               "atp_sum_over_positions_recovery": float(atp_pos.sum()) / delta if delta else None,
               "atp_vs_decode_max_abs": raw["atp_vs_decode_max_abs"],
               "exact_s": raw["exact_s"], "atp_s": raw["atp_s"]})
        split.add(inst, row)

    included, boot, clusters = split.included, boot_args(stats), split.clusters
    agg = {}
    for unit in ("positions", "heads"):
        keys = [k for k in (included[0][f"{unit}_agreement"] if included else {}) if k != "n"]
        for k in keys:
            vals = [r[f"{unit}_agreement"][k] for r in included]
            if all(v is not None for v in vals):
                agg[f"{unit}_{k}"] = summarize(vals, clusters, **boot)
    agg["atp_sum_over_positions_recovery"] = summarize(
        [r["atp_sum_over_positions_recovery"] for r in included], clusters, **boot)
    agg["atp_speedup_over_exact"] = summarize([r["exact_s"] / r["atp_s"] for r in included], clusters, **boot)
    sanity = {"atp_vs_decode_max_abs": max((r["atp_vs_decode_max_abs"] for r in split.rows), default=None),
              "note": "the gradient pass's forward logits equal the decode logits (a check of the AtP base point)"}
    return {**split.parts(), "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("agreements"))}
