"""Field-placement dose-response (paper_spec §1.7, §3.7): the `diverse` one-word decisions with the field line moved
from before the policy to right before the request, everything else held fixed.

Each level re-generates the same instances (same seed: same names, ids, request wording, rules) with only the
placement and the number of record lines after the field changed, so levels are matched pairs of one design. Level
ids count from far (the field before the gate, with the rest of the record after it) to near (the field the last
record line, right before the request). Instance ids are prefixed by the level; the cluster stays the domain.
"""
from __future__ import annotations

import dataclasses

from scenarios import diverse

LEVELS = {
    "0_before_rule_far": {"placement": "before_rule", "n_filler": (6, 6)},
    "1_before_rule": {"placement": "before_rule", "n_filler": (0, 0)},
    "2_after_rule_far": {"placement": "after_rule", "n_filler": (12, 12)},
    "3_after_rule": {"placement": "after_rule", "n_filler": (4, 4)},
    "4_after_rule_near": {"placement": "after_rule", "n_filler": (0, 0)},
}


def make_instances(n_instances: int, seed: int, levels: list | None = None, domains: list | None = None,
                   n_filler_rules: tuple = (0, 2), filler_style: str = "record") -> list:
    levels = list(levels or LEVELS)
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown dose levels {unknown}; known: {list(LEVELS)}")
    out = []
    for lv in levels:
        for inst in diverse.make_instances(n_instances, seed, domains=domains, n_filler_rules=n_filler_rules,
                                           filler_style=filler_style, controls=0, **LEVELS[lv]):
            out.append(dataclasses.replace(inst, id=f"{lv}:{inst.id}", variant={**inst.variant, "dose_level": lv}))
    return out
