"""Fine token regions of a rendered prompt, read off the text so that a bin means what its name says.

Every prompt line of every message is labelled by what it is (role line, gate rule, neutral "filler" rule, record
line, the field's line, tools, conversation, task instruction); characters outside the message contents (chat markup,
BOS, the forced suffix) are `template`. A token takes the label of the character it starts at (its first non-space
character, so a leading-space token belongs to the word it carries); the field value's span is `field` and the last
prompt token is `decision`. Blank lines belong to the line before them and end a record block.

Labels are per token position (regions need not be contiguous: a record has lines before and after the field).
"""
from __future__ import annotations

import re

LABELS = ("template", "role", "gate", "filler_rules", "record", "field_line", "field", "tools", "conversation",
          "task", "decision")

_HEADERS = {  # a header line opens a block; lines in the block get the block's label unless a line rule applies
    "policy": re.compile(r"^(Policy:|POLICY DOCUMENT)"),
    "record": re.compile(r"^(SESSION CONTEXT|[A-Z]+( [A-Z]+)* (RECORD|REQUEST|PROFILE|STATUS))$"),
    "tools": re.compile(r"^AVAILABLE TOOLS"),
    "conversation": re.compile(r"^CONVERSATION"),
    "task": re.compile(r"^TASK$"),
}
_BLOCK_LABEL = {"policy": "filler_rules", "record": "record", "tools": "tools", "conversation": "conversation",
                "task": "task", None: "conversation"}


def line_labels(content: str, field: str, value: str) -> list[str]:
    """Label of each line of one message (split on "\\n"); a block never spans two messages."""
    labels, block = [], None
    for line in content.split("\n"):
        s = line.strip()
        for name, pat in _HEADERS.items():
            if pat.match(s):
                block = name
                break
        if not s:
            label = labels[-1] if labels else "template"
            if block == "record":      # a blank line ends a record; what follows is the conversation
                block = None
        elif s.startswith(f"{field}: {value}"):
            label = "field_line"
        elif re.search(rf"\b{re.escape(field)}\b", s) and not re.match(r"^\w+: ", s):
            label = "gate"        # a rule that names the field (record lines "key: value" are not rules)
        elif s.startswith("You are "):
            label = "role"
        elif s.startswith("Answer with") or s.startswith("Decide the") or s.startswith("Next action"):
            label = "task"
        elif block == "policy" or re.match(r"^R\d+\. ", s):
            label = "filler_rules"
        else:
            label = _BLOCK_LABEL[block]
        labels.append(label)
    return labels


def char_labels(text: str, messages, field: str, value: str) -> list[str]:
    """One label per character of the rendered `text` (message contents found in order; the rest is template)."""
    out = ["template"] * len(text)
    start = 0
    for m in messages:
        content = m["content"]
        at = text.find(content, start)
        if at < 0:
            raise ValueError("a message's content does not occur verbatim in the rendered prompt; "
                             "cannot place the fine regions")
        labels = line_labels(content, field, value)
        pos = at
        for line, label in zip(content.split("\n"), labels):
            for i in range(pos, min(pos + len(line) + 1, at + len(content))):  # the line and its newline
                out[i] = label
            pos += len(line) + 1
        start = at + len(content)
    return out


def token_labels(pair, tokenizer, prepend_bos: bool) -> list[str]:
    """Fine label of every token position of the old prompt of an aligned pair (see the module docstring)."""
    inst = pair.instance
    text = pair.text_old
    chars = char_labels(text, inst.old_messages, inst.field, inst.old_value)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    labels = ["template"] if prepend_bos else []
    for lo, hi in offsets:
        i = lo
        while i < hi - 1 and text[i].isspace():
            i += 1
        labels.append(chars[i] if i < len(text) else "template")
    if len(labels) != pair.length:
        raise ValueError(f"{inst.id}: {len(labels)} offsets for {pair.length} tokens; the tokenizer does not map "
                         "offsets one-to-one")
    a, b = pair.span
    labels[a:b] = ["field"] * (b - a)
    labels[pair.dpos] = "decision"
    return labels
