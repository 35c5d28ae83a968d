"""Render an `Instance` for one model (chat template or plain prompt, forced suffix) and token-align the pair.

Alignment is the contract every probe relies on: the old and new token sequences are identical outside one span of
equal length (the field value's changed subtokens), so that positions mean the same thing in both caches. A pair
that does not align raises `AlignmentError` naming the scenario, both values and the token counts; nothing is padded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scenarios.base import Instance
from scenarios.regions import content_offsets, token_labels


class AlignmentError(ValueError):
    pass


@dataclass
class AlignedPair:
    instance: Instance
    old_ids: torch.Tensor      # [L] long
    new_ids: torch.Tensor      # [L] long
    span: tuple                # [a, b): the differing span (the field value's changed subtokens)
    line_end: int              # one past the token that ends the field's line (its newline): [a, line_end) = field line
    text_old: str
    text_new: str
    prepend_bos: bool = False

    @property
    def length(self) -> int:
        return int(self.old_ids.shape[0])

    @property
    def dpos(self) -> int:
        """The decision position: the last prompt token, fed as one decode step after a cache of length L-1."""
        return self.length - 1

    def token_info(self, tokenizer) -> dict:
        a, b = self.span
        return {"L": self.length, "dpos": self.dpos, "span": [a, b], "line_end": self.line_end,
                "span_old": tokenizer.convert_ids_to_tokens(self.old_ids[a:b].tolist()),
                "span_new": tokenizer.convert_ids_to_tokens(self.new_ids[a:b].tolist()),
                "line_tail": tokenizer.convert_ids_to_tokens(self.old_ids[b:self.line_end].tolist()),
                "decision_token": tokenizer.convert_ids_to_tokens([int(self.old_ids[-1])])[0],
                "regions": {"prefix": [0, a], "field": [a, b], "downstream": [b, self.dpos],
                            "decision": [self.dpos, self.length]},
                "labels": token_labels(self, tokenizer, self.prepend_bos)}


def render_text(messages, tokenizer, plain_prompt: dict | None = None, suffix: str = "", raw: bool = False) -> str:
    """The prompt string: the model's chat template with the generation prompt (or a plain layout for base models
    that have none), then the forced suffix. raw=True (a user's `plain` pair): the one message's content is the
    prompt as it stands, then the suffix."""
    if raw:
        if len(messages) != 1:
            raise ValueError(f"a raw prompt is one text, got {len(messages)} messages")
        return messages[0]["content"] + suffix
    if plain_prompt:
        missing = sorted({m["role"] for m in messages} - set(plain_prompt))
        if missing:
            raise ValueError(f"this model has no chat template and its plain_prompt layout has no entry for the "
                             f"role{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} (it has "
                             f"{', '.join(sorted(k for k in plain_prompt if k != 'generation'))}); use those roles, "
                             f"or give the model config a layout for them")
        text = "".join(plain_prompt[m["role"]].format(content=m["content"]) for m in messages)
        text += plain_prompt["generation"]
        sep = " " if suffix else ""
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; give the model config a `plain_prompt` layout")
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        sep = ""
    return text + (sep + suffix if suffix else "")


def tokenize(text: str, tokenizer, prepend_bos: bool) -> torch.Tensor:
    """Token ids of a rendered prompt: special tokens come from the text itself (never added twice), plus one BOS
    in front when the model needs it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if prepend_bos:
        if bos is None:
            raise ValueError("prepend_bos is set but the tokenizer has no bos token")
        if ids and ids[0] == bos:
            raise ValueError("the rendered text already starts with BOS; prepend_bos would double it")
        ids = [bos] + ids
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        raise ValueError("doubled BOS at the start of the prompt")
    return torch.tensor(ids, dtype=torch.long)


def check_value_span(instance: Instance, tokenizer, texts, ids, span, prepend_bos: bool, where: str) -> None:
    """The differing tokens [a, b) must cover characters of the two values only: a token that also carries a
    neighbour's characters (punctuation, a newline, part of the next word: `pending.` vs `pending!` at a line end
    differs in the single token '.\\n') would make the "field" splice something else. One space right before a value
    may ride on its first token (the word-boundary space of BPE / SentencePiece tokens). Raises AlignmentError naming
    both values and the offending tokens. Instances without `value_at` (no generator marks) are not checked."""
    if not instance.value_at:
        return
    a, b = span
    shift = 1 if prepend_bos else 0
    for arm, text, tok_ids, (mi, vs, ve), msgs in zip(("old", "new"), texts, ids, instance.value_at,
                                                       (instance.old_messages, instance.new_messages)):
        at = content_offsets(text, msgs)[mi]
        lo_ok, hi_ok = at + vs, at + ve
        if lo_ok > 0 and text[lo_ok - 1] == " ":
            lo_ok -= 1
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        bad = [(i + shift, text[lo:hi]) for i, (lo, hi) in enumerate(offsets)
               if a <= i + shift < b and (lo < lo_ok or hi > hi_ok)]
        if bad:
            toks = tokenizer.convert_ids_to_tokens(tok_ids[a:b].tolist())
            raise AlignmentError(
                f"{where}: the differing tokens {toks} ({arm} arm) cover characters outside the value "
                f"{text[at + vs:at + ve]!r}: {[t for _, t in bad]}. The \"field\" splice would edit a neighbour too; "
                f"choose values (or surrounding text) that tokenize apart from their neighbours for this model.")


def align(instance: Instance, tokenizer, prepend_bos: bool = False, plain_prompt: dict | None = None) -> AlignedPair:
    text_old = render_text(instance.old_messages, tokenizer, plain_prompt, instance.suffix, instance.plain)
    text_new = render_text(instance.new_messages, tokenizer, plain_prompt, instance.suffix, instance.plain)
    old = tokenize(text_old, tokenizer, prepend_bos)
    new = tokenize(text_new, tokenizer, prepend_bos)
    where = (f"scenario {instance.scenario!r} ({instance.id}), field {instance.field!r}: "
             f"{instance.old_value!r} -> {instance.new_value!r}")
    n_old, n_new = len(old), len(new)
    m = min(n_old, n_new)
    neq = (old[:m] != new[:m]).nonzero()
    if len(neq) == 0:
        raise AlignmentError(f"{where}: the two prompts tokenize identically (no differing span)")
    a = int(neq[0])
    s = 0
    while s < m - a and old[n_old - 1 - s] == new[n_new - 1 - s]:
        s += 1
    b_old, b_new = n_old - s, n_new - s
    if n_old != n_new or b_old != b_new:
        raise AlignmentError(
            f"{where}: the values tokenize to different lengths ({b_old - a} vs {b_new - a} tokens; prompts of "
            f"{n_old} vs {n_new} tokens; old span {tokenizer.convert_ids_to_tokens(old[a:b_old].tolist())}, new span "
            f"{tokenizer.convert_ids_to_tokens(new[a:b_new].tolist())}). Choose values that tokenize to equal lengths "
            f"for this model.")
    b = b_old
    check_value_span(instance, tokenizer, (text_old, text_new), (old, new), (a, b), prepend_bos, where)
    if b >= n_old - 1:
        raise AlignmentError(f"{where}: the differing span reaches the decision token; nothing lies downstream")
    line_end = b
    toks = tokenizer.convert_ids_to_tokens(old[b:n_old - 1].tolist())
    for i, t in enumerate(toks):
        if "\n" in tokenizer.convert_tokens_to_string([t]):
            line_end = b + i + 1
            break
    return AlignedPair(instance, old, new, (a, b), line_end, text_old, text_new, prepend_bos)
