"""kvnotes.readout (paper_spec §9.3): candidate tokens, readout choice, margin / decision / mass, candidate logits."""
from __future__ import annotations

import math

import pytest
import torch

from kvnotes.readout import Readout, candidate_logits, candidate_tokens, choose_readout, variants

pytestmark = pytest.mark.usefixtures("single_thread")


class StubTokenizer:
    """Maps whole strings to token-id lists; anything else is <unk> (id 0)."""

    unk_token_id = 0

    def __init__(self, table: dict):
        self.table = table
        self.names = {0: "<unk>"}
        for text, ids in table.items():
            for k, t in enumerate(ids):
                self.names.setdefault(t, text if k == 0 else f"{text}#{k}")

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": list(self.table.get(text, [0]))}

    def convert_ids_to_tokens(self, ids):
        return [self.names[t] for t in ids]


def test_variants():
    assert variants("deny") == ["deny", " deny", "Deny", " Deny"]
    assert variants("issue_refund") == ["issue_refund", " issue_refund", "Issue_refund", " Issue_refund"]
    assert variants("Deny") == ["Deny", " Deny"]          # duplicates removed, order kept


def test_candidate_tokens_drops_shared_first_tokens():
    # "refuse" and "refund" share their lower-case first piece "ref" (10); " Refund" is unknown (<unk>);
    # "Refuse" and " Refuse" have the same first token (13), kept once.
    tok = StubTokenizer({
        "refuse": [10, 11], " refuse": [12], "Refuse": [13, 11], " Refuse": [13],
        "refund": [10, 15], " refund": [16], "Refund": [17],
    })
    out = candidate_tokens(tok, ["refuse", "refund"])
    assert out == {
        "refuse": [(" refuse", 12, " refuse"), ("Refuse", 13, "Refuse")],
        "refund": [(" refund", 16, " refund"), ("Refund", 17, "Refund")],
    }
    assert list(out) == ["refuse", "refund"]


def test_candidate_tokens_shared_with_any_of_several_actions():
    tok = StubTokenizer({"cancel": [1], " cancel": [2], "Cancel": [3], " Cancel": [4],
                         "deny": [5], " deny": [2], "Deny": [6], " Deny": [7],
                         "escalate": [8], " escalate": [9], "Escalate": [3], " Escalate": [4]})
    out = candidate_tokens(tok, ["cancel", "deny", "escalate"])
    assert [t for _, t, _ in out["cancel"]] == [1]
    assert [t for _, t, _ in out["deny"]] == [5, 6, 7]
    assert [t for _, t, _ in out["escalate"]] == [8, 9]


def test_candidate_tokens_raises_when_an_action_is_left_with_none():
    # every first token of "deny" is also a first token of "delete"
    tok = StubTokenizer({"deny": [1], " deny": [2], "Deny": [3], " Deny": [4],
                         "delete": [1, 9], " delete": [2, 9], "Delete": [3, 9], " Delete": [4, 9]})
    with pytest.raises(ValueError, match="'deny'"):
        candidate_tokens(tok, ["deny", "delete"])
    # unknown to the tokenizer altogether
    with pytest.raises(ValueError, match="'frobnicate'"):
        candidate_tokens(StubTokenizer({"deny": [1]}), ["deny", "frobnicate"])


def test_candidate_tokens_on_the_tiny_tokenizer(tiny):
    tok = tiny.tokenizer
    out = candidate_tokens(tok, ["cancel", "deny"])
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("cancel", "Cancel", "deny", "Deny")}
    # the word-level tokenizer drops spaces, so " cancel" has the same first token as "cancel": kept once
    assert out == {"cancel": [("cancel", ids["cancel"], "cancel"), ("Cancel", ids["Cancel"], "Cancel")],
                   "deny": [("deny", ids["deny"], "deny"), ("Deny", ids["Deny"], "Deny")]}
    assert tok.unk_token_id not in ids.values()
    # multi-piece actions keep their first piece only
    fa = candidate_tokens(tok, ["cancel_order", "issue_refund"])
    assert [s for _, _, s in fa["cancel_order"]] == ["cancel", "Cancel"]
    assert [s for _, _, s in fa["issue_refund"]] == ["issue", "Issue"]


# ---------------------------------------------------------------- choose_readout and the Readout
CANDS = {"deny": [("deny", 1, "deny"), ("Deny", 2, "Deny")],
         "cancel": [("cancel", 3, "cancel"), ("Cancel", 4, "Cancel")]}


def _obs(probs: dict, lse: float):
    """(cand_logits, lse) whose candidate probabilities are `probs`."""
    return {t: lse + math.log(p) for t, p in probs.items()}, lse


def test_choose_readout_picks_the_highest_mean_probability():
    # token 1 ("deny"): p = 0.25, 0.25 -> mean 0.25;  token 2 ("Deny"): p = 0.10, 0.45 -> mean 0.275.
    # Mean probability picks 2, while the first observation alone, the mean logit (geometric mean) and the raw
    # logits without their lse (obs 2 is shifted by +3) would all pick 1.
    obs = [_obs({1: 0.25, 2: 0.10, 3: 0.30, 4: 0.05}, lse=0.0),
           _obs({1: 0.25, 2: 0.45, 3: 0.02, 4: 0.20}, lse=3.0)]
    ro = choose_readout(CANDS, "deny", "cancel", obs)
    assert isinstance(ro, Readout)
    assert (ro.safe, ro.unsafe) == ("deny", "cancel")
    assert (ro.safe_id, ro.safe_token) == (2, "Deny")
    # token 3: mean 0.16, token 4: mean 0.125 -> 3
    assert (ro.unsafe_id, ro.unsafe_token) == (3, "cancel")
    assert ro.candidates == {1: "deny", 2: "deny", 3: "cancel", 4: "cancel"}
    assert "2" in ro.chosen_by
    rec = ro.to_record()
    assert rec["safe_id"] == 2 and rec["unsafe_id"] == 3 and rec["candidates"] == {"1": "deny", "2": "deny",
                                                                                    "3": "cancel", "4": "cancel"}


def test_choose_readout_respects_the_lse_of_each_observation():
    # Same logits in both observations for token 1, but obs 1 has a much larger lse: its probability there is tiny.
    obs = [({1: 5.0, 2: 4.0, 3: 0.0, 4: 0.0}, 50.0),
           ({1: 5.0, 2: 4.9, 3: 0.0, 4: 0.0}, 5.5)]
    ro = choose_readout(CANDS, "deny", "cancel", obs)
    assert ro.safe_id == 1                   # p1 mean > p2 mean
    obs = [({1: 5.0, 2: 4.0, 3: 0.0, 4: 0.0}, 5.5),
           ({1: 4.0, 2: 5.0, 3: 0.0, 4: 0.0}, 5.5),
           ({1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}, 5.5)]
    assert choose_readout(CANDS, "deny", "cancel", obs).safe_id == 2


@pytest.fixture
def readout():
    return Readout("deny", "cancel", 1, 3, "deny", "cancel", {1: "deny", 2: "deny", 3: "cancel", 4: "cancel"},
                   chosen_by="test")


def test_margin(readout):
    assert readout.margin({1: 2.5, 2: 0.0, 3: -1.25, 4: 9.0}) == pytest.approx(3.75, abs=0)
    assert readout.margin({1: -1.0, 2: 0.0, 3: 1.0, 4: 0.0}) == -2.0
    assert isinstance(readout.margin({1: 1, 2: 0, 3: 0, 4: 0}), float)


def test_decision_is_the_argmax_over_all_candidates(readout):
    # the margin tokens favour "deny" (1 beats 3), but the capitalised "Cancel" (4) is the top candidate
    logits = {1: 2.0, 2: 1.0, 3: 0.0, 4: 3.0}
    assert readout.margin(logits) > 0
    assert readout.decision(logits) == "cancel"
    # and a capitalised "Deny" wins when it is the top one
    assert readout.decision({1: -5.0, 2: 4.0, 3: 3.9, 4: 0.0}) == "deny"


def test_decision_over_more_than_two_actions():
    ro = Readout("deny", "cancel", 1, 3, "deny", "cancel",
                 {1: "deny", 2: "deny", 3: "cancel", 4: "cancel", 5: "escalate"}, chosen_by="test")
    assert ro.decision({1: 1.0, 2: 1.0, 3: 1.5, 4: 0.0, 5: 2.0}) == "escalate"


def test_mass_is_the_summed_candidate_probability(readout):
    probs = {1: 0.4, 2: 0.1, 3: 0.2, 4: 0.05}
    cl, lse = _obs(probs, lse=7.0)
    assert readout.mass(cl, lse) == pytest.approx(0.75, abs=1e-6)
    assert isinstance(readout.mass(cl, lse), float)


def test_mass_matches_softmax_on_real_logits(readout):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g) * 3
    rows = candidate_logits(logits, [1, 2, 3, 4])
    for r, (cl, lse) in enumerate(rows):
        expected = float(torch.softmax(logits[r].double(), -1)[[1, 2, 3, 4]].sum())
        assert readout.mass(cl, lse) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- candidate_logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_candidate_logits_values_and_logsumexp(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 40, generator=g) * 4).to(dtype)
    rows = candidate_logits(logits, [7, 2, 7, 30])
    assert len(rows) == 3
    ref = logits.float()
    for r, (cl, lse) in enumerate(rows):
        assert list(cl) == [2, 7, 30]                       # sorted, duplicates collapsed
        for t, v in cl.items():
            assert type(v) is float and v == float(ref[r, t])
        assert type(lse) is float
        assert lse == pytest.approx(float(torch.logsumexp(ref[r].double(), -1)), abs=1e-5)


def test_candidate_logits_logsumexp_does_not_overflow_in_low_precision():
    # fp16 cannot represent exp(20); the logsumexp must be taken in fp32 (or stably)
    logits = torch.full((1, 1000), 20.0, dtype=torch.float16)
    cl, lse = candidate_logits(logits, [0])[0]
    assert cl == {0: 20.0}
    assert lse == pytest.approx(20.0 + math.log(1000), abs=1e-4)


def test_candidate_logits_on_decode_output(tiny, diverse_pair):
    from kvnotes import kv
    model = tiny.model
    ids = diverse_pair.old_ids
    logits = kv.decode(model, [kv.prefill(model, ids[:-1])], int(ids[-1]))
    cands = candidate_tokens(tiny.tokenizer, list(diverse_pair.instance.candidates))
    token_ids = [t for lst in cands.values() for _, t, _ in lst]
    (cl, lse), = candidate_logits(logits, token_ids)
    assert set(cl) == set(token_ids)
    assert lse == pytest.approx(float(torch.logsumexp(logits[0].double(), -1)), abs=1e-5)
    p = torch.softmax(logits[0].double(), -1)
    for t, v in cl.items():
        assert v == float(logits[0, t])
        assert math.exp(v - lse) == pytest.approx(float(p[t]), rel=1e-5)
