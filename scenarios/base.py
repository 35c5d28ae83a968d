"""The data every scenario family produces: one `Instance` = an old/new prompt pair that differs in one field value.

Families are plain generators (`make_instances(n, seed, **params) -> list[Instance]`); rendering through a chat
template and token alignment happen later, per model, in `scenarios.render`.
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

    def record_id(self) -> dict:
        return {"id": self.id, "scenario": self.scenario, "kind": self.kind, "field": self.field,
                "old_value": self.old_value, "new_value": self.new_value, "variant": dict(self.variant)}
