"""Gated-decision scenario families: old/new prompt pairs that differ in one field value (see scenarios.base).

The generated families (diverse, diverse_dose, family_a) make their instances from a seed; `pairs` reads a
researcher's own file (scenarios/pairs.py) and may leave bad entries out with reasons (`load`)."""
from scenarios import diverse, dose, family_a, offtemplate, pairs

FAMILIES = {"diverse": diverse.make_instances, "diverse_dose": dose.make_instances, "family_a": family_a.make_instances,
            "family_c": offtemplate.make_family_c, "offtemplate": offtemplate.make_instances,
            "pairs": pairs.make_instances}
READ_FROM_FILE = ("pairs",)   # families whose bad entries are rejected with reasons instead of stopping the run


def make_instances(family: str, **params):
    if family not in FAMILIES:
        raise ValueError(f"unknown scenario family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](**params)


def load(family: str, strict: bool = False, **params) -> tuple[list, list]:
    """(instances, rejected entries): `make_instances` plus, for a family read from a file, the entries it left out
    (scenarios.pairs.Rejected; with strict=True the first one raises instead). Generated families reject nothing."""
    if family in READ_FROM_FILE:
        params = {k: v for k, v in params.items() if k not in ("n_instances", "seed")}
        return pairs.load(strict=strict, **params)
    return make_instances(family, **params), []
