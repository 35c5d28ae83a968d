"""Benchmark: KV-splice interventions per second, batched vs one at a time vs re-running the prompt.

    python -m kvnotes.bench [model] [n_states]        # default: qwen2.5-coder-1.5b, 16 single-position splices

All three ways compute the same quantity for a set of single-position splices of one aligned pair (checked): the
ratios, measured in one process on one machine, are what matters.
"""
from __future__ import annotations

import sys
import time

import torch

from kvnotes import kv
from kvnotes.models import load_model
from scenarios import make_instances
from scenarios.render import align


def main(model: str = "qwen2.5-coder-1.5b", n_states: int = 16) -> dict:
    lm = load_model(model)
    pair = align(make_instances("diverse", n_instances=1, seed=0)[0], lm.tokenizer,
                 bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    a, dpos, last = pair.span[0], pair.dpos, int(pair.old_ids[-1])
    positions = list(range(a, dpos))[:n_states]
    print(f"{model}: L={pair.length}, {len(positions)} single-position KV splices, {torch.get_num_threads()} threads")

    t = time.time()
    stale = kv.prefill(lm.model, pair.old_ids[:dpos])
    oracle = kv.prefill(lm.model, pair.new_ids[:dpos])
    t_prefill = (time.time() - t) / 2

    t = time.time()
    states = [kv.splice(stale, oracle, [p]) for p in positions]
    batched = kv.decode(lm.model, states, last, batch_size=len(states))
    t_batched = time.time() - t

    t = time.time()
    single = torch.cat([kv.decode(lm.model, [kv.splice(stale, oracle, [p])], last) for p in positions])
    t_single = time.time() - t

    # the naive way: no cache reuse, every intervention pays a whole prefill of the prompt + one decode step
    t_naive = len(positions) * t_prefill + t_single
    err = float((batched - single).abs().max())
    out = {"model": model, "L": pair.length, "n_states": len(positions), "prefill_s": round(t_prefill, 3),
           "batched_per_s": len(positions) / t_batched, "single_per_s": len(positions) / t_single,
           "reprefill_per_s (estimated: prefill time x n + decodes)": len(positions) / t_naive,
           "batched_vs_single": t_single / t_batched, "batched_vs_reprefill": t_naive / t_batched,
           "batched_vs_single_max_abs_logit_diff": err}
    for k, v in out.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:1] or []), *(int(x) for x in args[1:2]))
