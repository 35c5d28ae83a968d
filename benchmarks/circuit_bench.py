"""Head patches per second: the same read-head and write-head sweeps three ways, timed in one run.

    python benchmarks/circuit_bench.py                          # qwen2.5-coder-1.5b, fp32, an F->R diverse pair
    python benchmarks/circuit_bench.py --model tiny-qwen2 --out -

The sweeps are those of the circuit probes (paper_spec §4.1, §4.2): every query head (layer x head) patched alone
with its clean value into the corrupt (old-value) prompt,
  read:  at the decision token;
  write: at the top-1 note position p (the downstream position whose K/V splice recovers most, found with the
         splice engine), everything after p recomputed.
Three realisations of each patch:
(a) kvnotes.heads.HeadPatchEngine: prefix computed once, patched rows batched (`--chunk-size` to a forward), only the
    suffix from the first patched position recomputed, margin tokens unembedded;
(b) nnsight, one patch per trace (kvnotes.interventions.NNsightBackend: a full forward of the whole prompt);
(c) TransformerLens 4.x TransformerBridge, one patch per forward (kvnotes.interventions.LensBackend; the bridge gets
    its own copy of the weights, which it switches to eager attention).
(a) runs every head; (b) and (c) the same evenly spaced `--n-reference` heads, whose logits must equal (a)'s to 1e-4
(the reference paths compute every position's full-vocabulary logits, as those libraries do by default; their rate
is per patch and does not depend on which heads). Peak resident memory is sampled during each path (psutil, every
20 ms; the process total, so the later paths include the memory of the earlier ones still held).
The record goes to results/bench/circuit-<model>.json; the ratios are (a)'s patches/s over the faster of (b), (c).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.splice_bench import save_record, spaced  # noqa: E402
from kvnotes import kv  # noqa: E402
from kvnotes.engine import Splice, SpliceEngine  # noqa: E402
from kvnotes.heads import HeadPatchEngine, HeadSet  # noqa: E402
from kvnotes.interventions import Capture, HeadPatch, NNsightBackend, lens_backend  # noqa: E402
from kvnotes.models import load_model  # noqa: E402
from kvnotes.readout import candidate_logits, candidate_tokens, choose_readout  # noqa: E402
from kvnotes.records import now_iso, provenance  # noqa: E402
from scenarios import make_instances  # noqa: E402
from scenarios.render import align  # noqa: E402


class PeakRSS:
    """Peak resident set size (GiB) of this process while the block runs, sampled every `every` seconds."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def _watch(self):
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss / 1024 ** 3)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss / 1024 ** 3)
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--scenario", default="diverse")
    ap.add_argument("--layout", default="field_first_user", help="scenario.params.layout of the diverse family")
    ap.add_argument("--instance", type=int, default=0, help="index of the (gated) instance to use")
    ap.add_argument("--n-reference", type=int, default=12, help="heads timed on paths (b) and (c), per sweep")
    ap.add_argument("--chunk-size", type=int, default=64, help="patched rows per forward on path (a)")
    ap.add_argument("--out", default=None,
                    help="record path ('-' for none); default results/bench/circuit-<model>.json")
    args = ap.parse_args(argv)
    started, t_start = now_iso(), time.time()
    prov = provenance(0, started, 0.0)

    lm = load_model(args.model, dtype="float32")
    model = lm.model
    params = {"layout": args.layout} if args.scenario.startswith("diverse") else {}
    inst = [i for i in make_instances(args.scenario, n_instances=args.instance + 1, seed=0, **params)
            if i.kind == "gated"][args.instance]
    pair = align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))
    a, b = pair.span
    d, last = pair.dpos, int(pair.old_ids[pair.dpos])
    cands = candidate_tokens(lm.tokenizer, list(inst.candidates))
    stale, oracle = kv.prefill(model, pair.old_ids[:d]), kv.prefill(model, pair.new_ids[:d])
    ends = kv.decode(model, [stale, oracle], last)
    readout = choose_readout(cands, inst.safe, inst.unsafe,
                             candidate_logits(ends, [t for lst in cands.values() for _, t, _ in lst]))
    tokens = [readout.safe_id, readout.unsafe_id]
    # the top-1 note position: the downstream position whose single-position K/V splice moves the margin most
    down = list(range(b, d))
    spl = SpliceEngine(model, stale, {"source": oracle}, last).run([Splice((p,)) for p in down], tokens=tokens)
    m_old = float(ends[0, tokens[0]] - ends[0, tokens[1]])
    p_note = down[int(((spl[:, 0] - spl[:, 1]) - m_old).abs().argmax())]

    nns = NNsightBackend(model, lm.tokenizer)
    H, n_layers = nns.n_heads, nns.n_layers
    z_clean = nns.run(pair.new_ids, captures=[Capture("z", li) for li in range(n_layers)]).acts
    z_clean = {c.layer: z for c, z in z_clean.items()}
    heads = [(li, h) for li in range(n_layers) for h in range(H)]
    ref_heads = spaced(heads, args.n_reference)
    print(f"{args.model}, {inst.id} ({args.layout}): L = {pair.length}, decision token {d}, top-1 note position "
          f"{p_note} ({d - p_note + 1} tokens recomputed per write patch), {len(heads)} heads, "
          f"{torch.get_num_threads()} threads", flush=True)
    bridge = None
    sweeps, results = {"read": d, "write": p_note}, {}
    for sweep, pos in sweeps.items():
        sets = [HeadSet.of([(li, h, pos, z_clean[li][pos, h])]) for li, h in heads]
        eng = HeadPatchEngine(model, pair.old_ids, start=pos, chunk_size=args.chunk_size)
        eng.run(sets[:2], tokens=tokens)                                            # warm-up
        with PeakRSS() as mem_a:
            t = time.time()
            ours = eng.run(sets, tokens=tokens)
            t_a = time.time() - t
        ours_full = eng.run([sets[heads.index(x)] for x in ref_heads])              # full vocabulary, to compare
        ivs = [[HeadPatch(li, h, [pos], z_clean[li][[pos], h])] for li, h in ref_heads]
        nns.run(pair.old_ids, ivs[0])                                               # warm-up
        with PeakRSS() as mem_b:
            t = time.time()
            by_nns = torch.stack([nns.run(pair.old_ids, iv).logits[-1] for iv in ivs])
            t_b = time.time() - t
        if bridge is None:
            bridge = lens_backend(lm)
        bridge.run(pair.old_ids, ivs[0])                                            # warm-up
        with PeakRSS() as mem_c:
            t = time.time()
            by_tl = torch.stack([bridge.run(pair.old_ids, iv).logits[-1] for iv in ivs])
            t_c = time.time() - t
        rates = {"ours": len(sets) / t_a, "nnsight": len(ivs) / t_b, "transformer_lens": len(ivs) / t_c}
        results[sweep] = {
            "position": pos, "n_recomputed_tokens": d - pos + 1, "n_patches": len(sets), "n_reference": len(ivs),
            "patches_per_s": rates, "seconds": {"ours": t_a, "nnsight": t_b, "transformer_lens": t_c},
            "ours_over_faster_reference": rates["ours"] / max(rates["nnsight"], rates["transformer_lens"]),
            "max_abs_logit_diff": {"nnsight": float((ours_full - by_nns).abs().max()),
                                   "transformer_lens": float((ours_full - by_tl).abs().max())},
            "max_abs_margin_diff_vs_full_vocab": float(((ours[[heads.index(x) for x in ref_heads]]
                                                         - ours_full[:, tokens]).abs().max())),
            "peak_rss_gib": {"ours": mem_a.peak, "nnsight": mem_b.peak, "transformer_lens": mem_c.peak},
            "margins": (ours[:, 0] - ours[:, 1]).tolist(),
        }
        r = results[sweep]
        print(f"{sweep:>5}: ours {rates['ours']:.1f} patches/s, nnsight {rates['nnsight']:.2f}, TransformerLens "
              f"{rates['transformer_lens']:.2f} -> {r['ours_over_faster_reference']:.0f}x the faster; max |logit "
              f"diff| {max(r['max_abs_logit_diff'].values()):.1e}; peak RSS {mem_a.peak:.1f} / {mem_b.peak:.1f} / "
              f"{mem_c.peak:.1f} GiB", flush=True)
    record = {
        "schema_version": 1, "experiment": "circuit_bench", "model": args.model,
        "config": {**vars(args), "instance_id": inst.id, "L": pair.length, "span": [a, b], "dpos": d,
                   "threads": torch.get_num_threads(), "heads": len(heads)},
        "provenance": prov, "readout": readout.to_record(),
        "aggregate": {f"{s}_{k}": v for s, r in results.items() for k, v in
                      (("ours_over_faster_reference", r["ours_over_faster_reference"]),
                       ("max_abs_logit_diff", max(r["max_abs_logit_diff"].values())),
                       ("ours_patches_per_s", r["patches_per_s"]["ours"]),
                       ("nnsight_patches_per_s", r["patches_per_s"]["nnsight"]),
                       ("transformer_lens_patches_per_s", r["patches_per_s"]["transformer_lens"]),
                       ("recomputed_tokens", r["n_recomputed_tokens"]),
                       ("ours_peak_rss_gib", r["peak_rss_gib"]["ours"]))},
        "sweeps": results,
        "sanity": {"note": "the three paths compute the same head patches; their agreement is a correctness check"},
    }
    return save_record(record, args.out, f"circuit-{args.model}.json", t_start)


if __name__ == "__main__":
    main()
