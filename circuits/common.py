"""What the circuit probes share: where the notes are (paper_spec §4.0 `find_aggregators`), and which backend runs
the patched forwards.

`probe.backend` picks it: "engine" (the batched KV splice engine for the note search, kvnotes.heads for the patched
runs, nnsight for captures), or "nnsight" / "transformer_lens", where every forward of the probe goes through that
library (kvnotes.interventions). A model whose config sets `remote` (true: an NDIF-hosted model such as
`model=llama3.1-8b-ndif`; "local": nnsight's serverless dry run of the same requests on a model loaded here) runs
only through nnsight, since nothing of it is computed here."""
from __future__ import annotations

import torch

from kvnotes.engine import Splice, SpliceEngine
from kvnotes.heads import HeadPatchEngine, HeadSet
from kvnotes.interventions import Capture, HeadPatch, NNsightBackend, ResidAdd, kv_splice, lens_backend
from kvnotes.readout import candidate_tokens, choose_readout
from probes.common import decision_token, end_states, prefill_pair, state_logits, states_of

BACKENDS = ("engine", "nnsight", "transformer_lens")
_LENS: dict = {}


def check_backend(spec: dict, backend: str) -> str:
    """`backend` if it can run on the model of config `spec`; ValueError naming the fix for an unknown name, or for
    a remote model (`model.remote` set) with any backend but nnsight. run.check_probe calls it before the model
    loads; the functions here call it again for callers outside run.py."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    remote = spec.get("remote", False)
    if remote and backend != "nnsight":
        raise ValueError(f"model {spec['name']!r} has remote={remote!r} (true: the weights are on NDIF; 'local': "
                         f"nnsight's dry run of that path): its forwards go through nnsight only; add "
                         f"probe.backend=nnsight")
    return backend


def library_backend(lm, backend: str = "nnsight"):
    """The intervention backend (kvnotes.interventions) a probe's captures and library-path forwards use: nnsight
    for backend "engine" or "nnsight" (remote as the model config says), the TransformerLens bridge (one per model,
    kept) for "transformer_lens"."""
    if check_backend(lm.spec, backend) == "transformer_lens":
        key = (lm.spec["name"], id(lm.model))
        if key not in _LENS:
            _LENS.clear()
            _LENS[key] = lens_backend(lm)
        return _LENS[key]
    return NNsightBackend(lm.model, lm.tokenizer, remote=lm.spec.get("remote", False))


def pair_notes(lm, pair, token_ids: list, n: int, backend: str = "engine") -> tuple[dict, list, list, list]:
    """(states, notes, splice_rows, readout ids) of one pair: the unpatched stale / oracle decodes (candidate-token
    logits and the vocabulary logsumexp, as `probes.common.end_states` gives them) and `note_positions`' result.

    backend "engine": KV caches and the batched splice engine. A library backend runs the same computation as full
    forwards of ids[:dpos + 1]: the two unpatched runs capture every layer's k and v, and each downstream position's
    single-position splice is one run patched through `kvnotes.interventions.kv_splice` (equal to the engine's,
    tested); n_down + 2 forwards, which is what a remote (NDIF) model allows. Raises ValueError as note_positions,
    and for a pair whose decision token differs between the arms."""
    if check_backend(lm.spec, backend) == "engine":
        stale, oracle, last = prefill_pair(lm.model, pair)
        states = end_states(lm.model, stale, oracle, last, token_ids)
        rows = _splice_rows(lm, pair, stale, oracle, last, token_ids)
        return (states, *_rank_notes(lm, pair, states, rows, token_ids, n))
    d = pair.dpos
    decision_token(pair)
    down = _downstream(pair)
    be = library_backend(lm, backend)
    old, new = pair.old_ids[:d + 1], pair.new_ids[:d + 1]
    caps = [Capture(s, li) for li in range(be.n_layers) for s in ("k", "v")]
    run_old, run_new = be.run(old, captures=caps), be.run(new, captures=caps)
    states = states_of(torch.stack([run_old.logits[-1], run_new.logits[-1]]), token_ids)
    token_ids = sorted(set(int(t) for t in token_ids))
    idx = torch.as_tensor(token_ids, dtype=torch.long)
    rows = torch.stack([be.run(old, kv_splice(run_new.acts, run_old.acts, be.n_layers, [p], d)).logits[-1][idx]
                        for p in down])
    return (states, *_rank_notes(lm, pair, states, rows, token_ids, n))


def _downstream(pair) -> list:
    down = list(range(pair.span[1], pair.dpos))
    if not down:
        raise ValueError(f"{pair.instance.id}: no downstream positions between the field and the decision token; "
                         "a circuit probe needs note positions")
    return down


def _splice_rows(lm, pair, stale, oracle, last, token_ids) -> torch.Tensor:
    """[n_down, len(token_ids)]: the decision token's candidate logits after each downstream position's single K/V
    splice (oracle into stale), through the batched splice engine."""
    return SpliceEngine(lm.model, stale, oracle, last, chunk_size=256).run([Splice((p,)) for p in _downstream(pair)],
                                                                           tokens=token_ids)


def _rank_notes(lm, pair, states: dict, rows: torch.Tensor, token_ids: list, n: int) -> tuple[list, list, list]:
    """(the top-n downstream positions by recovery, best first, ties to the later position; rows as lists; the
    readout ids), the readout chosen on this pair's own unpatched states; `token_ids` name `rows`' columns."""
    down = _downstream(pair)
    inst = pair.instance
    cands = candidate_tokens(lm.tokenizer, list(inst.candidates))
    ro = choose_readout(cands, inst.safe, inst.unsafe,
                        [(state_logits({"states": states}, s), states[s]["lse"]) for s in ("stale", "oracle")])
    idx = {t: i for i, t in enumerate(token_ids)}
    m = rows[:, idx[ro.safe_id]] - rows[:, idx[ro.unsafe_id]]
    m_old = ro.margin(state_logits({"states": states}, "stale"))
    m_new = ro.margin(state_logits({"states": states}, "oracle"))
    score = (m - m_old) / (m_new - m_old) if m_new != m_old else (m - m_old).abs()
    order = sorted(range(len(down)), key=lambda i: (-float(score[i]), -down[i]))
    return [down[i] for i in order[:n]], rows.tolist(), [ro.safe_id, ro.unsafe_id]


def note_positions(lm, pair, stale, oracle, last, states: dict, token_ids: list, n: int) -> tuple[list, list, list]:
    """(notes, splice_rows, readout ids): the `n` downstream positions [b, dpos) whose single-position K/V splice
    (clean = new value into the corrupt = old-value cache) moves the margin most toward the clean decision, best
    first (ties: the later position), with every position's candidate-token logits [n_down, len(token_ids)].

    The margin is read with a readout chosen on this pair's own unpatched states (the probe-wide readout needs every
    pair's first pass); the probes record whether it equals the probe-wide one. Raises ValueError when the pair has
    no downstream position. (`pair_notes` does the same from the pair alone, on any backend.)"""
    return _rank_notes(lm, pair, states, _splice_rows(lm, pair, stale, oracle, last, token_ids), token_ids, n)


def patched_logits(lm, ids, start: int, sets: list[HeadSet], tokens, backend: str = "engine",
                   batch_size: int = 64) -> torch.Tensor:
    """Last-position logits [len(sets), len(tokens)] of `ids` under each HeadSet (head z patches, residual
    additions). backend "engine": kvnotes.heads.HeadPatchEngine (prefix shared, rows batched: the fast path);
    "nnsight" / "transformer_lens": one full forward per set through kvnotes.interventions (HeadPatch, ResidAdd),
    the reference realisations the engine is tested against. ValueError for another name."""
    if check_backend(lm.spec, backend) == "engine":
        return HeadPatchEngine(lm.model, ids, start=start, chunk_size=batch_size).run(sets, tokens=tokens)
    be = library_backend(lm, backend)
    idx = torch.as_tensor(list(tokens), dtype=torch.long)
    rows = []
    for s in sets:
        ivs = [HeadPatch(int(li), int(h), [int(p)], v[None]) for li, h, p, v in
               zip(s.layers, s.heads, s.positions, s.values)]
        ivs += [ResidAdd(int(li), [int(p)], v[None]) for li, p, v in zip(s.add_layers, s.add_positions, s.add_vectors)]
        rows.append(be.run(ids, ivs).logits[-1][idx])
    return torch.stack(rows) if rows else torch.empty(0, len(idx))
