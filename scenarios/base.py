"""The data every scenario family produces: one `Instance` = an old/new prompt pair that differs in one field value.

Families are plain generators (`make_instances(n, seed, **params) -> list[Instance]`); rendering through a chat
template and token alignment happen later, per model, in `scenarios.render`.

A generator writes its messages with `Text`, which keeps the character span and the label (scenarios.regions.LABELS)
of every piece it writes, so token regions come from the generator rather than from re-reading the text.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Instance:
    id: str                       # unique within a run, e.g. "order_cancel/003"
    scenario: str                 # the cluster key for statistics (one rule / policy), e.g. "order_cancel"
    kind: str                     # "gated": the value flips the correct action; "control": it should not matter
    field: str                    # the field's label as written in the prompt, e.g. "order_status"
    old_value: str                # value in the stale prompt (the base / cache being edited)
    new_value: str                # value in the new prompt (the source / oracle)
    old_messages: tuple           # chat messages ({"role", "content"} dicts) carrying old_value
    new_messages: tuple           # identical except for the value
    safe: str                     # the restrictive action word (m = logit(safe) - logit(unsafe))
    unsafe: str                   # the permissive action word
    expected_old: str             # action word old_value implies (for controls: the same as expected_new)
    expected_new: str
    candidates: tuple             # every action word the decision is taken over (includes safe and unsafe)
    suffix: str = ""              # forced text appended after the generation prompt (e.g. "tool_call:"), "" for none
    variant: dict = field(default_factory=dict, hash=False, compare=False)  # surface parameters, for the record
    # Where the generator wrote what (character offsets into the message contents, written by `Text`):
    spans: tuple = field(default=(), compare=False)     # per old message: ((start, end, label), ...) covering it all
    value_at: tuple = field(default=(), compare=False)  # ((message, start, end) of old_value, same for new_value)
    note_at: tuple = field(default=(), compare=False)   # ((message, offset) old, (message, offset) new): where an
    #                                                     update note goes as its own paragraph (probes/wording.py)
    # A researcher's own pairs (scenarios/pairs.py):
    plain: bool = False           # the one "message" is the raw prompt text: no chat template
    partial_spans: bool = field(default=False, compare=False)  # spans need not tile the contents; the rest takes the
    #                                                            coarse labels prefix / downstream (scenarios.regions)
    direction_known: bool = field(default=True, compare=False)  # False: which answer is restrictive was not given
    source: str = field(default="", compare=False)   # where the pair was read from, e.g. "my_pairs.jsonl:12"

    def record_id(self) -> dict:
        out = {"id": self.id, "scenario": self.scenario, "kind": self.kind, "field": self.field,
               "old_value": self.old_value, "new_value": self.new_value, "variant": dict(self.variant)}
        return {**out, "source": self.source} if self.source else out


class Text:
    """A message content written piece by piece, each piece with its region label.

    `add(text, label)` appends; `mark_value()` / `mark_note()` remember where the changing value and the update-note
    site are. `spans()` merges adjacent pieces of one label into (start, end, label) triples that cover the content
    exactly (an empty content has no spans).
    """

    def __init__(self):
        self.pieces: list[tuple[str, str]] = []
        self.value: tuple | None = None   # (start, end) of the changing value
        self.note: int | None = None      # offset of the update-note site

    def __len__(self) -> int:
        return sum(len(t) for t, _ in self.pieces)

    def add(self, text: str, label: str) -> "Text":
        if text:
            self.pieces.append((text, label))
        return self

    def add_value(self, value: str, label: str = "field") -> "Text":
        """Append the changing value and remember its span (one per message at most)."""
        if self.value is not None:
            raise ValueError("a message holds the changing value once")
        start = len(self)
        self.add(value, label)
        self.value = (start, start + len(value))
        return self

    def strip_newline(self) -> "Text":
        """Drop one trailing newline (a block that ends its message)."""
        if self.pieces and self.pieces[-1][0].endswith("\n"):
            text, label = self.pieces[-1]
            if self.value is not None and self.value[1] > len(self) - 1:
                raise ValueError("cannot strip a newline that belongs to the changing value")
            self.pieces[-1] = (text[:-1], label)
            if not self.pieces[-1][0]:
                self.pieces.pop()
        return self

    def mark_note(self) -> "Text":
        self.note = len(self)
        return self

    def extend(self, other: "Text") -> "Text":
        """Append another Text, carrying its value and note marks along."""
        off = len(self)
        if other.value is not None:
            if self.value is not None:
                raise ValueError("a message holds the changing value once")
            self.value = (other.value[0] + off, other.value[1] + off)
        if other.note is not None:
            self.note = other.note + off
        self.pieces.extend(other.pieces)
        return self

    @property
    def content(self) -> str:
        return "".join(t for t, _ in self.pieces)

    def spans(self) -> tuple:
        out, pos = [], 0
        for text, label in self.pieces:
            if out and out[-1][2] == label:
                out[-1] = (out[-1][0], pos + len(text), label)
            else:
                out.append((pos, pos + len(text), label))
            pos += len(text)
        return tuple(out)


def messages_of(texts: list[tuple[str, Text]]) -> tuple:
    """Chat messages from (role, Text) pairs."""
    return tuple({"role": role, "content": t.content} for role, t in texts)


def marks_of(texts: list[tuple[str, Text]]) -> tuple:
    """((message, start, end) of the changing value, (message, offset) of the note site) of one arm's messages."""
    value = [(i, *t.value) for i, (_, t) in enumerate(texts) if t.value is not None]
    note = [(i, t.note) for i, (_, t) in enumerate(texts) if t.note is not None]
    if len(value) != 1:
        raise ValueError(f"the changing value must be written exactly once, found {len(value)}")
    return value[0], (note[-1] if note else None)
