"""What every KV probe shares: prefilling an aligned pair once, and the inclusion rule (paper_spec §9.3 item 5)."""
from __future__ import annotations

from kvnotes import kv
from kvnotes.readout import candidate_logits


def prefill_pair(model, pair):
    """(stale, oracle, last_token): caches of old[:dpos] and new[:dpos] (the shared prefix [0, a) computed once)."""
    dpos = pair.dpos
    last = int(pair.old_ids[dpos])
    if last != int(pair.new_ids[dpos]):
        raise ValueError(f"{pair.instance.id}: the decision token differs between the arms; the pair is misaligned")
    a = pair.span[0]
    prefix = kv.prefill(model, pair.old_ids[:a]) if a > 0 else None
    stale = kv.prefill(model, pair.old_ids[a:dpos], past=prefix)
    oracle = kv.prefill(model, pair.new_ids[a:dpos], past=prefix)
    return stale, oracle, last


def end_states(model, stale, oracle, last, token_ids) -> dict:
    """Candidate-token logits and the vocabulary logsumexp of the unpatched stale and oracle decodes, in the form
    `probes.locality.choose_readouts` reads."""
    ends = kv.decode(model, [stale, oracle], last)
    return {s: {"logits": {str(t): v for t, v in cl.items()}, "lse": lse}
            for s, (cl, lse) in zip(("stale", "oracle"), candidate_logits(ends, token_ids))}


def exclusion_reasons(inst, dec_stale: str, dec_oracle: str, delta_m: float, rule: dict) -> list[str]:
    """Why a gated pair does not count (empty: it counts): no flip, wrong decisions, or |Δm| below τ."""
    reasons = []
    if rule["require_flip"] and dec_stale == dec_oracle:
        reasons.append(f"no decision flip: stale and oracle both decide {dec_stale!r}")
    if rule["require_correct"] and (dec_stale != inst.expected_old or dec_oracle != inst.expected_new):
        reasons.append(f"decisions (stale {dec_stale!r}, oracle {dec_oracle!r}) are not the ones the values "
                       f"imply ({inst.expected_old!r}, {inst.expected_new!r})")
    if abs(delta_m) < rule["min_abs_delta_m"]:
        reasons.append(f"|delta m| = {abs(delta_m):.3f} < tau = {rule['min_abs_delta_m']}")
    return reasons
