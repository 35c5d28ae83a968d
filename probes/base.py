"""The probe contract: what a probe declares, and the checks `run.py` makes before any model is loaded.

A probe is a module `probes/<name>.py` with a `configs/probe/<name>.yaml`. Near its top the module declares

    CONTRACT = ProbeSpec(name=..., paper_refs=..., options={...}, scenarios={...}, ...)

and it defines the functions the contract promises (checked by `load_probe`):

    measure(lm, pair, token_ids, **measure_options, check_decode=...) -> dict
        the model work for one aligned pair, JSON-able (it is appended to the run's resume file); `check_decode`
        is passed only to probes with a `check_decode_instances` option
    analyse(instances, tokens, raws, readouts, exclusion, stats) -> dict
        no model: per-pair rows split into instances / excluded / controls (probes.common.Split), "aggregate",
        "sanity" and a "summary" with Split.summary's counts
    plan_second(instances, tokens, raws, readouts, exclusion, options) -> {instance id: plan}   (second_pass)
    measure_second(lm, pair, token_ids, plan, **measure_options) -> dict                         (second_pass)
        a pass that needs every pair's first pass and the readouts (e.g. rankings); run.py puts its output and the
        plan under each raw's "second" and "plan" keys before `analyse`
    raw_from_row(row, record) -> dict                                                            (reanalysable)
        `measure`'s output for one pair rebuilt from its row in a written record, so that `run.py reanalyse=true`
        can re-run `analyse` (current code, current statistics) without the model

The readout (which candidate tokens are the margin's, `probes.common.choose_readouts`) and the inclusion rule are
the same for every probe.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from probes.common import choose_readouts


class ProbeContractError(TypeError):
    """A probe module does not implement what its CONTRACT declares (a programming error, not a config error)."""


class ProbeConfigError(ValueError):
    """A run's config asks a probe for something it cannot do: unknown options, or a scenario it cannot use."""


@dataclass(frozen=True, kw_only=True)
class ProbeSpec:
    """What a probe declares about itself.

    options          every key its configs/probe/<name>.yaml may set besides `name`, with the default used when the
                     yaml leaves it out; any other key is an error. A probe whose measure() takes `check_decode`
                     declares `check_decode_instances` (how many instances also run that check).
    measure_options  the options measure() and measure_second() take as keyword arguments (the rest are read by
                     plan_second from the options dict, or are run.py's, like check_decode_instances).
    scenarios        the scenario families the probe can use, each with the scenario params it needs
                     ({param: allowed values}), or with a tuple of such dicts when the probe can use any one of
                     several designs of that family (e.g. decodability: polarity mixed, OR changes trigger); a
                     param the scenario config leaves out reads as None, so list None among the allowed values
                     where the generator's default will do. None: any family, no requirement.
    second_pass      the module defines plan_second and measure_second.
    reanalysable     the module defines raw_from_row: its record rows keep everything measure() returned.
    not_reanalysable what a record's rows lack for a re-analysis (required when not reanalysable).
    instance_needs   {Instance attribute: what it is} every instance must carry (checked before the model loads;
                     a user's pair without it is rejected with the reason, see run.check_instances).
    """
    name: str
    paper_refs: tuple[str, ...]
    options: Mapping[str, Any]
    measure_options: tuple[str, ...] = ("batch_size",)
    scenarios: Mapping[str, Mapping[str, tuple] | tuple[Mapping[str, tuple], ...]] | None = None
    second_pass: bool = False
    reanalysable: bool = False
    not_reanalysable: str = ""
    instance_needs: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = [k for k in self.measure_options if k not in self.options]
        if unknown:
            raise ProbeContractError(f"probe {self.name!r}: measure_options {unknown} are not among its options "
                                     f"{sorted(self.options)}")
        if not self.reanalysable and not self.not_reanalysable:
            raise ProbeContractError(f"probe {self.name!r}: say what its records lack for a re-analysis "
                                     f"(not_reanalysable=...) or define raw_from_row (reanalysable=True)")

    def scenario_problems(self, family: str, params: Mapping[str, Any]) -> list[str]:
        """Why this probe cannot run on a scenario of `family` with `params` (empty: it can). With alternative
        designs (a tuple of requirement dicts) the scenario must meet every requirement of at least one of them."""
        if self.scenarios is None:
            return []
        if family not in self.scenarios:
            return [f"it needs a scenario of family {' or '.join(map(repr, self.scenarios))}, not {family!r}"]
        needs = self.scenarios[family]
        designs = (needs,) if isinstance(needs, Mapping) else tuple(needs)
        if any(all(params.get(key) in allowed for key, allowed in design.items()) for design in designs):
            return []
        if len(designs) == 1:
            return [f"on family {family!r} it needs scenario.params.{key} in {list(allowed)}, not {params.get(key)!r}"
                    for key, allowed in designs[0].items() if params.get(key) not in allowed]
        keys = dict.fromkeys(key for design in designs for key in design)
        return [f"on family {family!r} it needs one of {len(designs)} designs: "
                + "; or ".join("(" + ", ".join(f"scenario.params.{key} in {list(allowed)}"
                                               for key, allowed in design.items()) + ")" for design in designs)
                + "; this scenario has " + ", ".join(f"{key}={params.get(key)!r}" for key in keys)]

    def resolve_options(self, given: Mapping[str, Any]) -> dict:
        """The probe's options: the given ones (a configs/probe/<name>.yaml, `name` included) over the defaults."""
        unknown = sorted(set(given) - set(self.options) - {"name"})
        if unknown:
            raise ProbeConfigError(f"probe {self.name!r} has no option{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(unknown)} (configs/probe/{self.name}.yaml or an override sets it); "
                                   f"its options are {', '.join(sorted(self.options))}")
        return {"name": self.name, **self.options, **{k: v for k, v in given.items() if k != "name"}}


@dataclass(frozen=True)
class Probe:
    """A probe's contract with the module's functions bound to it (see `load_probe`)."""
    spec: ProbeSpec
    measure: Callable
    analyse: Callable
    plan_second: Callable | None = None
    measure_second: Callable | None = None
    raw_from_row: Callable | None = None
    readouts: Callable = choose_readouts

    @property
    def name(self) -> str:
        return self.spec.name


PACKAGES = ("probes", "circuits")   # where probe modules live: the KV-cache probes, the component-level circuit ones


def load_probe(name: str) -> Probe:
    """Import probes.<name> (or circuits.<name>) and bind its functions to its CONTRACT; a ProbeContractError if they
    do not match, a ProbeConfigError naming both places if neither has it."""
    for package in PACKAGES:
        try:
            module = importlib.import_module(f"{package}.{name}")
            break
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
    else:
        raise ProbeConfigError(f"no probe {name!r}: neither probes/{name}.py nor circuits/{name}.py exists")
    spec = getattr(module, "CONTRACT", None)
    where = f"{package}/{name}.py"
    if not isinstance(spec, ProbeSpec):
        raise ProbeContractError(f"{where} declares no CONTRACT = ProbeSpec(...) (see probes/base.py)")
    if spec.name != name:
        raise ProbeContractError(f"{where} declares the probe {spec.name!r}; a probe's name is its module's")
    optional = {"plan_second": spec.second_pass, "measure_second": spec.second_pass,
                "raw_from_row": spec.reanalysable}
    problems = [f"it defines no {fn}()" for fn in ("measure", "analyse") if not callable(getattr(module, fn, None))]
    for fn, declared in optional.items():
        defined = callable(getattr(module, fn, None))
        if declared and not defined:
            problems.append(f"its contract promises {fn}() but the module does not define it")
        elif defined and not declared:
            flag = "second_pass" if fn != "raw_from_row" else "reanalysable"
            problems.append(f"it defines {fn}() but its contract does not declare {flag}=True")
    if problems:
        raise ProbeContractError(f"{where}: " + "; ".join(problems))
    return Probe(spec, module.measure, module.analyse,
                 **{fn: getattr(module, fn) for fn, declared in optional.items() if declared})
