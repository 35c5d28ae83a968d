"""What the circuit probes share: where the notes are (paper_spec §4.0 `find_aggregators`), and which backend runs
the patched forwards."""
from __future__ import annotations

import torch

from kvnotes.engine import Splice, SpliceEngine
from kvnotes.heads import HeadPatchEngine, HeadSet
from kvnotes.interventions import HeadPatch, NNsightBackend, ResidAdd, lens_backend
from kvnotes.readout import candidate_tokens, choose_readout
from probes.common import state_logits


def note_positions(lm, pair, stale, oracle, last, states: dict, token_ids: list, n: int) -> tuple[list, list, list]:
    """(notes, splice_rows, readout ids): the `n` downstream positions [b, dpos) whose single-position K/V splice
    (clean = new value into the corrupt = old-value cache) moves the margin most toward the clean decision, best
    first (ties: the later position), with every position's candidate-token logits [n_down, len(token_ids)].

    The margin is read with a readout chosen on this pair's own unpatched states (the probe-wide readout needs every
    pair's first pass); the probes record whether it equals the probe-wide one. Raises ValueError when the pair has
    no downstream position."""
    a, b = pair.span
    down = list(range(b, pair.dpos))
    if not down:
        raise ValueError(f"{pair.instance.id}: no downstream positions between the field and the decision token; "
                         "a circuit probe needs note positions")
    rows = SpliceEngine(lm.model, stale, oracle, last, chunk_size=256).run([Splice((p,)) for p in down],
                                                                           tokens=token_ids)
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


BACKENDS = ("engine", "nnsight", "transformer_lens")
_LENS: dict = {}


def patched_logits(lm, ids, start: int, sets: list[HeadSet], tokens, backend: str = "engine",
                   batch_size: int = 64) -> torch.Tensor:
    """Last-position logits [len(sets), len(tokens)] of `ids` under each HeadSet (head z patches, residual
    additions). backend "engine": kvnotes.heads.HeadPatchEngine (prefix shared, rows batched: the fast path);
    "nnsight" / "transformer_lens": one full forward per set through kvnotes.interventions (HeadPatch, ResidAdd),
    the reference realisations the engine is tested against. ValueError for another name."""
    if backend == "engine":
        return HeadPatchEngine(lm.model, ids, start=start, chunk_size=batch_size).run(sets, tokens=tokens)
    if backend == "nnsight":
        be = NNsightBackend(lm.model, lm.tokenizer)
    elif backend == "transformer_lens":
        key = (lm.spec["name"], id(lm.model))
        if key not in _LENS:
            _LENS.clear()
            _LENS[key] = lens_backend(lm)
        be = _LENS[key]
    else:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    idx = torch.as_tensor(list(tokens), dtype=torch.long)
    rows = []
    for s in sets:
        ivs = [HeadPatch(int(li), int(h), [int(p)], v[None]) for li, h, p, v in
               zip(s.layers, s.heads, s.positions, s.values)]
        ivs += [ResidAdd(int(li), [int(p)], v[None]) for li, p, v in zip(s.add_layers, s.add_positions, s.add_vectors)]
        rows.append(be.run(ids, ivs).logits[-1][idx])
    return torch.stack(rows) if rows else torch.empty(0, len(idx))
