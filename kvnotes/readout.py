"""Reading the decision out of next-token logits (paper_spec §9.3).

Each action word has candidate first tokens (with/without a leading space, lower/capitalised). First tokens shared by
two actions are dropped. Per model and scenario the variant with the most probability mass in the unpatched states
becomes the margin token; the margin is m = logit(safe) - logit(unsafe) in fp32, and the categorical decision is the
argmax over every candidate token of every action.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def variants(word: str) -> list[str]:
    cap = word[:1].upper() + word[1:]
    return list(dict.fromkeys([word, " " + word, cap, " " + cap]))


def candidate_tokens(tokenizer, actions) -> dict:
    """{action: [(variant string, first token id, token string), ...]} with first tokens shared across actions
    removed. Raises if an action is left without any token."""
    raw = {}
    for a in actions:
        for v in variants(a):
            ids = tokenizer(v, add_special_tokens=False)["input_ids"]
            if ids:
                raw.setdefault(a, []).append((v, ids[0]))
    owners = {}
    for a, lst in raw.items():
        for _, t in lst:
            owners.setdefault(t, set()).add(a)
    unk = getattr(tokenizer, "unk_token_id", None)
    out = {}
    for a in actions:
        seen, keep = set(), []
        for v, t in raw.get(a, []):
            if len(owners[t]) == 1 and t not in seen and t != unk:
                seen.add(t)
                keep.append((v, t, tokenizer.convert_ids_to_tokens([t])[0]))
        if not keep:
            raise ValueError(f"action {a!r} has no first token of its own among {variants(a)} "
                             f"(all shared with other actions {sorted(actions)} or unknown to the tokenizer)")
        out[a] = keep
    return out


@dataclass
class Readout:
    safe: str
    unsafe: str
    safe_id: int
    unsafe_id: int
    safe_token: str
    unsafe_token: str
    candidates: dict            # token id -> action word (every action's every variant)
    chosen_by: str

    def margin(self, cand_logits: dict) -> float:
        return float(cand_logits[self.safe_id] - cand_logits[self.unsafe_id])

    def decision(self, cand_logits: dict) -> str:
        return self.candidates[max(self.candidates, key=lambda t: cand_logits[t])]

    def mass(self, cand_logits: dict, lse: float) -> float:
        return float(sum(torch.tensor(cand_logits[t] - lse).exp() for t in self.candidates))

    def to_record(self) -> dict:
        return {"safe": self.safe, "unsafe": self.unsafe, "safe_id": self.safe_id, "unsafe_id": self.unsafe_id,
                "safe_token": self.safe_token, "unsafe_token": self.unsafe_token,
                "candidates": {str(t): a for t, a in self.candidates.items()}, "chosen_by": self.chosen_by}


def candidate_logits(logits: torch.Tensor, token_ids) -> list[dict]:
    """Per row of `logits` [B, V]: ({token id: logit} over `token_ids`, logsumexp over the vocabulary), fp32."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    ids = sorted(set(int(t) for t in token_ids))
    sub = logits[:, ids]
    return [({t: float(sub[r, j]) for j, t in enumerate(ids)}, float(lse[r])) for r in range(logits.shape[0])]


def choose_readout(cands: dict, safe: str, unsafe: str, observations: list) -> Readout:
    """Pick each action's margin token as the variant with the highest mean probability over `observations`
    (a list of (cand_logits, lse) from unpatched stale and oracle states of one scenario)."""
    def best(action):
        scored = []
        for v, t, s in cands[action]:
            p = sum(float(torch.tensor(obs[t] - lse).exp()) for obs, lse in observations) / max(len(observations), 1)
            scored.append((p, t, s))
        return max(scored)

    _, sid, stok = best(safe)
    _, uid, utok = best(unsafe)
    table = {t: a for a, lst in cands.items() for _, t, _ in lst}
    return Readout(safe, unsafe, sid, uid, stok, utok, table,
                   chosen_by=f"highest mean probability over {len(observations)} unpatched stale/oracle states")
