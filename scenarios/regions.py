"""Fine token regions of a rendered prompt, from the spans the scenario generator wrote (scenarios.base.Text).

Every character of every message content carries the label of the piece the generator wrote there (role line, gate
rule, neutral "filler" rules, record lines, the field's line, the changing value, tools, conversation, task; other
gates' rules and fields when a policy has several gates; in a trigger pair, paper_spec §1.3 Family B, the rule's
trigger word and the fixed field's line); characters outside the message contents (chat markup, BOS, the forced
suffix) are `template`. A token takes the label of the character it starts at (its first non-space character, so a
leading-space token belongs to the word it carries); the token span that differs between the arms is `field` (or
`trigger` when the generator wrote the changing value as the rule's trigger word) and the last prompt token is
`decision`.

Labels are per token position (regions need not be contiguous: a record has lines before and after the field).
Nothing is inferred from the text: an instance without generator spans, or spans that do not cover a message
exactly, raise ValueError.

A researcher's own pairs (scenarios/pairs.py, `Instance.partial_spans`) may label only some blocks, with labels of
their own: a token starting in content characters no span covers takes the coarse label `prefix` (before the field)
or `downstream` (after it); chat markup and the forced suffix stay `template`.
"""
from __future__ import annotations

LABELS = ("template", "role", "gate", "filler_rules", "record", "field_line", "field", "tools", "conversation",
          "task", "decision", "other_gate", "other_field", "trigger", "fixed_field")
# Meanings: template = chat markup, BOS and forced suffix; role = the "You are ..." line; gate = the gating rule;
# filler_rules = the "Policy:" header and neutral rules; record = record lines that no rule reads; field_line = the
# line of the changing field value; field = the changing field value; tools / conversation / task = the tools block,
# the request, the answer line; decision = the last prompt token; other_gate / other_field = the other gates' rules
# and fields (n_gates > 1); trigger = the changing word inside the gate rule, the value it names (changes=trigger,
# Family B); fixed_field = the gated field's line, value included, when its value is held fixed (changes=trigger).
COARSE = ("prefix", "downstream")   # the fill of content a user's pair leaves unlabelled


def content_offsets(text: str, messages) -> list[int]:
    """Where each message's content starts in the rendered `text` (found in order); ValueError if one is missing."""
    out, start = [], 0
    for m in messages:
        at = text.find(m["content"], start)
        if at < 0:
            raise ValueError("a message's content does not occur verbatim in the rendered prompt; "
                             "cannot place the fine regions")
        out.append(at)
        start = at + len(m["content"])
    return out


def check_spans(messages, spans, where: str = "") -> None:
    """Each message's spans must tile its content: contiguous, in order, known labels, nothing left unlabelled."""
    if len(spans) != len(messages):
        raise ValueError(f"{where}: {len(spans)} span lists for {len(messages)} messages; a scenario family must "
                         f"write every message with scenarios.base.Text")
    for i, (m, sp) in enumerate(zip(messages, spans)):
        pos = 0
        for s, e, label in sp:
            if s != pos or e < s:
                raise ValueError(f"{where}: message {i} has unlabelled or overlapping characters at {pos}..{s}")
            if label not in LABELS:
                raise ValueError(f"{where}: unknown region label {label!r}; known: {LABELS}")
            pos = e
        if pos != len(m["content"]):
            raise ValueError(f"{where}: message {i} has {len(m['content']) - pos} unlabelled characters at its end")


def check_partial_spans(messages, spans, where: str = "") -> None:
    """A user's spans: per message, in order, inside the content, not overlapping, labels non-empty strings."""
    if len(spans) != len(messages):
        raise ValueError(f"{where}: {len(spans)} span lists for {len(messages)} messages")
    for i, (m, sp) in enumerate(zip(messages, spans)):
        pos = 0
        for s, e, label in sp:
            if not (pos <= s < e <= len(m["content"])):
                raise ValueError(f"{where}: message {i}: span ({s}, {e}) overlaps the previous one or leaves the "
                                 f"content (0..{len(m['content'])})")
            if not isinstance(label, str) or not label:
                raise ValueError(f"{where}: message {i}: span ({s}, {e}) has no label")
            pos = e


def char_labels(text: str, messages, spans, fill: str | None = "template") -> list:
    """One label per character of the rendered `text`: the spans inside the message contents, `template` outside
    them; content characters no span covers get `fill` (generators' spans cover everything)."""
    out = ["template"] * len(text)
    for at, m, sp in zip(content_offsets(text, messages), messages, spans):
        out[at:at + len(m["content"])] = [fill] * len(m["content"])
        for s, e, label in sp:
            out[at + s:at + e] = [label] * (e - s)
    return out


def token_labels(pair, tokenizer, prepend_bos: bool) -> list[str]:
    """Fine label of every token position of the old prompt of an aligned pair (see the module docstring)."""
    inst = pair.instance
    a, b = pair.span
    if inst.partial_spans:
        check_partial_spans(inst.old_messages, inst.spans, inst.id)
    elif not inst.spans:
        raise ValueError(f"{inst.id}: the instance carries no generator spans; a scenario family must write its "
                         f"messages with scenarios.base.Text so that every token has a region")
    else:
        check_spans(inst.old_messages, inst.spans, inst.id)
    text = pair.text_old
    chars = char_labels(text, inst.old_messages, inst.spans, None if inst.partial_spans else "template")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labels = ["template"] if prepend_bos else []
    for lo, hi in offsets:
        i = lo
        while i < hi - 1 and text[i].isspace():
            i += 1
        label = chars[i] if i < len(text) else "template"
        labels.append(label if label is not None else COARSE[len(labels) >= a])
    if len(labels) != pair.length:
        raise ValueError(f"{inst.id}: {len(labels)} offsets for {pair.length} tokens; the tokenizer does not map "
                         "offsets one-to-one")
    labels[a:b] = ["trigger" if "trigger" in labels[a:b] else "field"] * (b - a)
    labels[pair.dpos] = "decision"
    return labels
