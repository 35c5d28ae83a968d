"""Gated-decision scenario families: old/new prompt pairs that differ in one field value (see scenarios.base)."""
from scenarios import diverse, dose, family_a

FAMILIES = {"diverse": diverse.make_instances, "diverse_dose": dose.make_instances, "family_a": family_a.make_instances}


def make_instances(family: str, **params):
    if family not in FAMILIES:
        raise ValueError(f"unknown scenario family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](**params)
