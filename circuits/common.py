"""What the circuit probes share: where the notes are (paper_spec §4.0 `find_aggregators`)."""
from __future__ import annotations

from kvnotes.engine import Splice, SpliceEngine
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
