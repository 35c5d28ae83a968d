"""kvnotes entry point: one probe x one model x one scenario family -> one JSON record (and refreshed figures).

    python run.py                                    # locality, qwen2.5-coder-1.5b, diverse (the main job)
    python run.py probe=locality model=qwen2.5-coder-0.5b scenario=diverse n_instances=12
    python run.py experiment=dose                    # a preset pairing a probe with the scenario it needs
    python run.py --multirun model=qwen2.5-coder-0.5b,smollm2-135m scenario=diverse,family_a
    python run.py -m hydra/launcher=parallel experiment=fig3 model=tiny-llama,tiny-qwen2   # cells in parallel
    python run.py probe=locality model=qwen2.5-coder-1.5b reanalyse=true   # re-analyse the record, no model run

Before any model work the run checks that the probe can use the scenario (its CONTRACT, probes/base.py) and that it
will not replace an existing record made with another config (tag it, or pass overwrite=true).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers can be imported: nothing touches the network

import fcntl
import inspect
import json
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import scenarios
from kvnotes.models import REPO_ROOT, load_model, load_tokenizer
from kvnotes.readout import candidate_tokens
from kvnotes.records import (SCHEMA_VERSION, Progress, RecordError, config_hash, now_iso, provenance, record_path,
                             run_command, write_json_atomic)
from probes.base import Probe, ProbeConfigError, load_probe
from scenarios.pairs import PairError, Rejected, file_sha256
from scenarios.pairs import resolve as resolve_pairs_path
from scenarios.render import AlignmentError, align

SECOND = "#pass2"   # progress key suffix of a probe's second pass
CONFIG_DIR = REPO_ROOT / "configs"
# settings that cannot change a result: left out of the resume hash and of the comparison with an existing record
VOLATILE = ("make_figures", "cache_dir", "results_dir", "overwrite", "reanalyse", "strict")
ANALYSIS = ("exclusion", "stats")          # settings a re-analysis may change (everything else was measured)
# the token layout of a pair that a re-analysis checks against the record before reusing its logits
LAYOUT = ("L", "dpos", "span", "line_end", "span_old", "span_new", "line_tail", "decision_token")
IDENTITY = ("scenario", "kind", "field", "old_value", "new_value")


class RecordConflictError(RuntimeError):
    """A run would replace an existing record with one made from a different config."""


class ReanalysisError(RuntimeError):
    """A record cannot be re-analysed (no record, a probe whose rows lack the raw data, or changed prompts)."""


def _abs(path) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def peak_rss_gib() -> float:
    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kib / 1024 ** 2


def _command(conf: dict, *extra: str) -> str:
    """The run.py command that makes this config's record (with the pairs file and a non-default results_dir)."""
    scen = conf["scenario"]
    more = [f"scenario.path={scen['params']['path']}"] if scen.get("family") in scenarios.READ_FROM_FILE else []
    if conf.get("results_dir") not in (None, "results") and _abs(conf["results_dir"]) != _abs("results"):
        more.append(f"results_dir={conf['results_dir']}")
    return " ".join([run_command(conf["probe"]["name"], conf["model"]["name"], scen["name"], conf.get("tag")),
                     *more, *extra])


# ---------------------------------------------------------------- checks made before any model work
def _scenario_configs() -> dict:
    """{config name: (family, params)} of configs/scenario/*.yaml, resolving their in-group defaults (best effort:
    used only to suggest a fix)."""
    def load(name, seen=()):
        raw = yaml.safe_load((CONFIG_DIR / "scenario" / f"{name}.yaml").read_text()) or {}
        base = {"params": {}}
        for entry in raw.pop("defaults", []):
            if isinstance(entry, str) and entry != "_self_" and entry not in seen:
                base = load(entry, seen + (name,))
        return {**base, **raw, "params": {**base.get("params", {}), **(raw.get("params") or {})}}
    found = {}
    for path in sorted((CONFIG_DIR / "scenario").glob("*.yaml")):
        try:
            c = load(path.stem)
            found[path.stem] = (c.get("family"), c.get("params", {}))
        except Exception:   # noqa: BLE001 - a suggestion must never hide the real error
            continue
    return found


def check_probe(probe: Probe, conf: dict) -> dict:
    """The probe's options (defaults filled in), or a ProbeConfigError naming the probe, the scenario and the fix:
    unknown options, a scenario the probe cannot use, no instances to measure, or a remote model (model.remote set)
    under a probe that cannot run every forward through nnsight. Checked before the model loads."""
    spec, scen = probe.spec, conf["scenario"]
    options = spec.resolve_options(conf["probe"])
    remote = conf["model"].get("remote")
    if remote and "backend" not in options:
        raise ProbeConfigError(f"model {conf['model']['name']!r} has remote={remote!r} (true: the weights are on NDIF; "
                               f"'local': nnsight's dry run of that path), so every forward of probe {spec.name!r} "
                               f"must go through nnsight: it has no such path; the circuit probes heads, components "
                               f"and direction have one (probe.backend=nnsight)")
    if "backend" in options:
        from circuits.common import check_backend
        try:
            check_backend(conf["model"], options["backend"])
        except ValueError as e:
            raise ProbeConfigError(f"probe {spec.name!r}: {e}") from None
    if int(conf["n_instances"]) < 1:
        raise ProbeConfigError(f"n_instances={conf['n_instances']}: a run needs at least one instance per scenario "
                               f"(it would write a record with nothing measured in it)")
    problems = spec.scenario_problems(scen["family"], scen.get("params") or {})
    if problems:
        fixes = []
        if (CONFIG_DIR / "experiment" / f"{spec.name}.yaml").exists():
            fixes.append(f"python run.py experiment={spec.name} (configs/experiment/{spec.name}.yaml pairs them)")
        fitting = [name for name, (family, params) in _scenario_configs().items()
                   if not spec.scenario_problems(family, params)]
        if fitting:
            fixes.append("scenario=" + " or scenario=".join(fitting))
        raise ProbeConfigError(
            f"probe {spec.name!r} cannot run on scenario {scen['name']!r} (family {scen['family']!r}): "
            + "; ".join(problems) + ". Fix: " + ("; or ".join(fixes) if fixes else "choose another scenario"))
    return options


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def scenario_defaults(family: str | None) -> dict:
    """The keyword defaults of a scenario family's generator (its make_instances signature, without n_instances and
    seed); {} for an unknown family."""
    make = scenarios.FAMILIES.get(family)
    if make is None:
        return {}
    return {name: p.default for name, p in inspect.signature(make).parameters.items()
            if p.default is not inspect.Parameter.empty and name not in ("n_instances", "seed")}


def comparable(conf: dict, probe: Probe) -> dict:
    """A config as a record's identity: without the volatile settings, with the probe's options as the current
    contract reads them (defaults filled in; options it no longer has dropped, since nothing reads them), top-level
    settings that are null left out (a setting added later, off by default, is absent from older records), and the
    scenario params with the generator's defaults filled in (a param added later with a default that keeps the
    prompts as they were, e.g. diverse's `changes: field`, does not make an older record another config)."""
    out = {k: v for k, v in conf.items() if k not in VOLATILE and v is not None}   # absent = null (a newer setting)
    given = out.get("probe") or {}
    out["probe"] = {"name": given.get("name"), **probe.spec.options,
                    **{k: v for k, v in given.items() if k in probe.spec.options}}
    scen = out.get("scenario")
    if isinstance(scen, dict) and isinstance(scen.get("params"), dict):
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in scenario_defaults(scen.get("family")).items()}
        out["scenario"] = {**scen, "params": {**defaults, **scen["params"]}}
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting that differs (dotted keys)."""
    a, b = _flat(old), _flat(new)
    missing = object()

    def show(v):
        text = "(absent)" if v is missing else json.dumps(v, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return [f"{k}: {show(a.get(k, missing))} -> {show(b.get(k, missing))}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def check_overwrite(path: Path, conf: dict, probe: Probe) -> None:
    """Refuse to replace an existing record made with another config (a run with the same config reproduces it and
    may rewrite it)."""
    if conf.get("overwrite") or not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("config")
    except (OSError, json.JSONDecodeError) as e:
        raise RecordConflictError(f"{path} exists but cannot be read ({e}); move it away or pass overwrite=true")
    diff = config_diff(comparable(old or {}, probe), comparable(conf, probe))
    if diff:
        shown = "\n  ".join(diff[:12]) + (f"\n  ... and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise RecordConflictError(
            f"refusing to overwrite {path}: it was made with another config (record -> this run):\n  {shown}\n"
            f"To keep both, tag this run (tag=<name> writes {path.stem.split('-')[0]}-<name>.json) or write elsewhere "
            f"(results_dir=...); to replace the record, pass overwrite=true.")


# ---------------------------------------------------------------- the run
def run(cfg: DictConfig) -> dict:
    """Run the configured probe and write its record (or, with reanalyse=true, re-analyse it); returns the record."""
    t0, started = time.time(), now_iso()
    conf = OmegaConf.to_container(cfg, resolve=True)
    conf.pop("hydra", None)
    probe = load_probe(conf["probe"]["name"])
    conf["probe"] = check_probe(probe, conf)
    pin_scenario_file(conf)
    results_dir = _abs(cfg.results_dir)
    path = record_path(results_dir, probe.name, conf["model"]["name"], conf["scenario"]["name"], conf["tag"])
    cache_dir = _abs(cfg.cache_dir) if cfg.cache_dir else None
    if conf.get("reanalyse"):
        return reanalyse(conf, probe, path, cache_dir)
    check_overwrite(path, conf, probe)

    prov = provenance(cfg.seed, started, 0.0)   # git state as the run starts: the code that produced the record
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = dict(conf["scenario"]["params"])
    family = conf["scenario"]["family"]
    lenient = family in scenarios.READ_FROM_FILE and not conf.get("strict")
    try:
        instances, rejected = scenarios.load(family, strict=bool(conf.get("strict")), n_instances=cfg.n_instances,
                                             seed=cfg.seed, **params)
    except PairError as e:
        raise PairError(e.line, e.id, e.reason, f"{params.get('path')} (strict=true) ") from None
    instances, rejected = check_instances(probe, instances, rejected, lenient)
    pairs_source, not_run = None, []
    if conf.get("pairs_from"):
        instances, pairs_source, not_run = pairs_from_record(conf, instances)
        print(f"[kvnotes] pairs_from: {len(instances)} pairs included in {conf['pairs_from']}; "
              f"{len(not_run)} left out")
        if not instances:   # not an error: a sweep over map cells goes on to the next cell
            print(f"[kvnotes] {conf['pairs_from']} included none of these {len(not_run)} pairs (no pair passed "
                  f"its inclusion rule; its `excluded` rows give each pair's reasons, usually no decision flip): "
                  f"nothing to measure for this model and cell, no record written. "
                  f"figures/tab_circuit_coverage.md lists the cells with pairs per model")
            return {}
    spec = conf["model"]   # the composed model config: overrides and search-path configs included
    lm = load_model(spec, cfg.dtype, cache_dir)
    pairs, tokens, rejected = align_all(instances, lm.tokenizer, spec, rejected, lenient)

    # the resume file is named by the config's hash: sweep cells that share a record path never share one
    h = config_hash({k: v for k, v in conf.items() if k not in VOLATILE})
    progress = Progress(path.with_name(f"{path.stem}.{h}.json"), h)
    if progress.done:
        n_done = sum(not k.endswith(SECOND) for k in progress.done)
        print(f"[kvnotes] resuming {path.name}: {n_done}/{len(pairs)} instances already measured")
    cand_cache = {}

    def cand_ids(pair) -> list:
        cands = tuple(pair.instance.candidates)
        if cands not in cand_cache:
            cand_cache[cands] = [t for lst in candidate_tokens(lm.tokenizer, list(cands)).values() for _, t, _ in lst]
        return cand_cache[cands]

    options = conf["probe"]
    kwargs = {k: options[k] for k in probe.spec.measure_options}
    n_check = options.get("check_decode_instances")   # declared only by probes whose measure() has the check
    todo = [p for p in pairs if p.instance.id not in progress.done]
    gone = set()   # pairs this probe could not measure (a pairs file's, rejected with the reason)
    for pair in tqdm(todo, desc=f"{probe.name} {spec['name']} {cfg.scenario.name}", unit="inst"):
        if n_check is not None:
            kwargs["check_decode"] = sum(not k.endswith(SECOND) for k in progress.done) < n_check
        try:
            result = probe.measure(lm, pair, cand_ids(pair), **kwargs)
        except (RuntimeError, ValueError) as e:   # e.g. wording: a note site this pair's layout cannot take
            if not lenient:
                raise
            rejected.append(Rejected(_rejected_line(pair.instance), pair.instance.id, "probe", str(e)))
            gone.add(pair.instance.id)
            continue
        progress.add(pair.instance.id, result)
    pairs = [p for p in pairs if p.instance.id not in gone]
    instances = [p.instance for p in pairs]
    tokens = {k: v for k, v in tokens.items() if k not in gone}
    if not pairs:
        raise ProbeConfigError(f"no pair could be measured: all {len(rejected)} were rejected:" + _listed(rejected))

    if rejected:
        _report_rejected(rejected, len(instances) + len(rejected), params.get("path"))
    raws = {k: dict(v) for k, v in progress.done.items() if not k.endswith(SECOND) and k not in gone}
    seconds = {k: raws[k].pop("seconds", None) for k in raws}
    readouts = (readouts_from_record(pairs_source, instances) if pairs_source
                else probe.readouts(lm.tokenizer, instances, raws))
    if probe.spec.second_pass:   # a pass that needs every pair's first pass and the readouts (e.g. rankings)
        plans = probe.plan_second(instances, tokens, raws, readouts, conf["exclusion"], options)
        todo = [p for p in pairs if p.instance.id + SECOND not in progress.done]
        second_kwargs = {k: options[k] for k in probe.spec.measure_options}
        for pair in tqdm(todo, desc=f"{probe.name} pass 2", unit="inst"):
            raw2 = probe.measure_second(lm, pair, cand_ids(pair), plans[pair.instance.id], **second_kwargs)
            progress.add(pair.instance.id + SECOND, raw2)
        for iid in raws:
            second = dict(progress.done[iid + SECOND])
            seconds[iid] = (seconds[iid] or 0) + (second.pop("seconds", None) or 0)
            raws[iid].update({"second": second, "plan": plans[iid]})
    analysis = probe.analyse(instances, tokens, raws, readouts, conf["exclusion"], conf["stats"])
    wall = time.time() - t0
    record = {
        "schema_version": SCHEMA_VERSION,
        "experiment": probe.name,
        "paper_refs": list(probe.spec.paper_refs),
        "model": {k: v for k, v in lm.info.items() if k != "load_s"},
        "scenario": {"name": cfg.scenario.name, "family": cfg.scenario.family, "params": params,
                     "n_instances_per_scenario": None if family in scenarios.READ_FROM_FILE else cfg.n_instances},
        "config": conf,
        "provenance": {**prov, "wall_s": round(wall, 2), "torch_threads": torch.get_num_threads()},
        "readout": _readout_block(readouts, conf),
        **analysis,
        "timing": {"load_s": lm.info.get("load_s"), "per_instance_s": seconds, "wall_s": round(wall, 2)},
    }
    if family in scenarios.READ_FROM_FILE:   # every pair left out, with its line and reason
        record["rejected"] = [r.to_record() for r in rejected]
        record["summary"] = {**record["summary"], "n_rejected": len(rejected)}
    if pairs_source:   # the pairs left out because the source record did not include them, each with the reason
        record["pairs_from"] = {k: v for k, v in pairs_source.items() if k != "readout"}
        record["not_run"] = not_run
        record["summary"] = {**record["summary"], "n_not_run": len(not_run)}
    check_overwrite(path, conf, probe)   # again: a parallel sweep cell may have written this record meanwhile
    write_json_atomic(path, record)
    progress.finish()
    _report(path, analysis)
    return record


def pin_scenario_file(conf: dict) -> None:
    """A scenario read from a file (scenario=pairs): its path is written repository-relative when the file is in
    the repository, else absolute (so a re-analysis from another directory finds it); its params get the file's
    sha256 (so the record, the resume file and the overwrite check name the exact file; a changed file is a
    different config); and an untagged run is tagged with the file's stem (results/<probe>/<model>/pairs-<stem>.json;
    a tag given replaces the stem). Two files with one stem (my.jsonl, my.yaml) would share a record: the overwrite
    guard refuses the second until it is tagged."""
    scen = conf["scenario"]
    if scen["family"] not in scenarios.READ_FROM_FILE:
        return
    params = scen["params"]
    where = resolve_pairs_path(params["path"]).resolve()
    try:
        params["path"] = str(where.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        params["path"] = str(where)
    if "path" in scen:
        scen["path"] = params["path"]
    if not conf.get("tag"):
        conf["tag"] = where.stem
    digest = file_sha256(where)   # also when re-analysing: an unchanged file is then the same config
    if params.get("sha256") and params["sha256"] != digest:
        raise ProbeConfigError(f"scenario.params.sha256={params['sha256']} but {params['path']} has sha256 {digest}; "
                               f"leave sha256 unset (the run fills it in) or restore the file")
    params["sha256"] = digest


class PairsFromError(ProbeConfigError):
    """pairs_from names a record that cannot select this run's pairs (missing, another model or scenario, another
    inclusion rule)."""


def pairs_from_record(conf: dict, instances: list) -> tuple[list, dict, list]:
    """Keep only the gated pairs that the record `conf["pairs_from"]` included (its `instances` part), so that an
    expensive probe (positions, topk) runs on the pairs a locality record found to flip, not on all of them.

    The record must be of the same model, scenario (family, name, params with the generator's defaults filled in),
    seed, n_instances and inclusion rule (`exclusion`): then its included pairs are exactly the ones this run's
    inclusion rule would keep, since the stale and oracle states are the same computation; anything else raises
    PairsFromError naming what differs. One exception: `scenario.params.domains` may name a subset of the source's
    domains (a costly probe on fewer pairs, the subset fixed before any result); the run then takes the source's
    included pairs of those domains, and the record says which (`pairs_from.domains_subset`). Returns (the kept
    instances, the source's summary for the record, the left-out pairs as {id, reason}). The readouts are taken from
    the source too (`readouts_from_record`)."""
    where = _abs(conf["pairs_from"])
    if not where.is_file():
        raise PairsFromError(f"pairs_from={conf['pairs_from']}: no such record ({where}); give the path of a record "
                             f"of this model and scenario, e.g. results/locality/<model>/<scenario>[-<tag>].json, or "
                             f"pairs_from=null to measure every generated pair")
    try:
        src = json.loads(where.read_text())
        sconf = src["config"]
        included = {r["id"] for r in src["instances"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PairsFromError(f"pairs_from={conf['pairs_from']}: not a readable record ({e})") from None
    # a run over some of the source's domains (scenario.params.domains a subset: a cheaper probe on fewer pairs,
    # chosen before any result) takes the source's included pairs of those domains; every other param must agree
    run_domains = (conf["scenario"].get("params") or {}).get("domains")
    src_domains = (sconf["scenario"].get("params") or {}).get("domains")
    subset = (run_domains is not None and run_domains != src_domains
              and (src_domains is None or set(run_domains) <= set(src_domains)))

    def scen(c):
        params = {**scenario_defaults(c["scenario"].get("family")), **c["scenario"]["params"]}
        if subset:
            params.pop("domains", None)
        return {**c["scenario"], "params": params}
    differ = [f"{key}: {a!r} (record) vs {b!r} (this run)" for key, a, b in (
        ("model", sconf["model"]["name"], conf["model"]["name"]), ("scenario", scen(sconf), scen(conf)),
        ("seed", sconf.get("seed"), conf.get("seed")), ("n_instances", sconf.get("n_instances"), conf.get("n_instances")),
        ("exclusion", sconf.get("exclusion"), conf.get("exclusion"))) if a != b]
    if differ:
        raise PairsFromError(f"pairs_from={conf['pairs_from']} was made with another config, so its included pairs "
                             f"are not this run's: " + "; ".join(d if len(d) < 300 else d[:297] + "..." for d in differ)
                             + ". Give a record of the same model, scenario, seed, n_instances and exclusion rule")
    if subset:
        wanted = set(run_domains)
        included = {r["id"] for r in src["instances"] if r.get("scenario") in wanted}
    kept = [i for i in instances if i.id in included]
    missing = sorted(included - {i.id for i in instances})
    if missing:
        raise PairsFromError(f"pairs_from={conf['pairs_from']}: the generator no longer makes {len(missing)} of its "
                             f"included pairs ({missing[:5]}); the prompts changed since it was made")
    left_out = [{"id": i.id, "reason": f"not included in {conf['pairs_from']} (pairs_from)"}
                for i in instances if i.id not in included]
    source = {"path": str(conf["pairs_from"]), "git_sha": (src.get("provenance") or {}).get("git_sha"),
              "n_included": len(included), "n_gated": (src.get("summary") or {}).get("n_gated"),
              "readout": src.get("readout"), "domains_subset": sorted(run_domains) if subset else None}
    return kept, source, left_out


def readouts_from_record(source: dict, instances: list) -> dict:
    """The source record's readout for each readout group of `instances` (matched on the safe and unsafe words and
    the set of action words), so that the margins are the ones the source's inclusion was decided on. Raises
    PairsFromError for a group the source has no readout for."""
    from kvnotes.readout import Readout
    from probes.common import readout_key
    out = {}
    groups = (source.get("readout") or {}).get("per_group") or []
    for inst in instances:
        key = readout_key(inst)
        if key in out:
            continue
        hit = [g for g in groups if g["safe"] == key[1] and g["unsafe"] == key[2]
               and set(g["candidates"].values()) == set(key[0])]
        if not hit:
            raise PairsFromError(f"pairs_from={source['path']} has no readout for {key} (instance {inst.id})")
        g = hit[0]
        out[key] = Readout(g["safe"], g["unsafe"], int(g["safe_id"]), int(g["unsafe_id"]), g["safe_token"],
                           g["unsafe_token"], {int(t): a for t, a in g["candidates"].items()},
                           chosen_by=g["chosen_by"] if g["chosen_by"].endswith("(pairs_from)")
                           else f"{g['chosen_by']}, in {source['path']} (pairs_from)")
    return out


def _listed(rejected: list, at_most: int = 8) -> str:
    """The first rejections, one `line N (id): reason` per line, for an error message."""
    return "".join(f"\n  line {r.line} ({r.id}): {r.reason}" for r in rejected[:at_most])


def _rejected_line(inst) -> int:
    return int(inst.source.rsplit(":", 1)[1]) if inst.source else 0


def check_instances(probe: Probe, instances: list, rejected: list, lenient: bool) -> tuple[list, list]:
    """Before the model loads: the instances the probe can use (its CONTRACT.instance_needs, e.g. the wording probe's
    update-note site). A pair without one is rejected with the reason (lenient: a pairs file without strict=true),
    or the run stops naming every such pair. Also stops when no pair is left."""
    keep, lacking = [], []
    for inst in instances:
        missing = [what for attr, what in probe.spec.instance_needs.items() if not getattr(inst, attr)]
        if missing:
            lacking.append(Rejected(_rejected_line(inst), inst.id, "probe",
                                    f"probe {probe.name!r} needs " + "; ".join(missing)))
        else:
            keep.append(inst)
    if lacking and not lenient:
        raise ProbeConfigError(f"probe {probe.name!r} cannot use {len(lacking)} of the {len(instances)} pairs:"
                               + _listed(lacking))
    rejected = rejected + lacking
    if not keep:
        raise ProbeConfigError(f"no usable pair: all {len(rejected)} were rejected:" + _listed(rejected))
    return keep, rejected


def align_all(instances: list, tokenizer, spec: dict, rejected: list, lenient: bool) -> tuple[list, dict, list]:
    """Align every instance for this model's tokenizer and check its answer words have first tokens of their own
    (kvnotes.readout.candidate_tokens). (aligned pairs, {id: token info}, rejected): a failing pair is rejected with
    the reason when lenient (a pairs file), else its AlignmentError / ValueError stops the run (a generated family's
    bad pair is a bug in the generator or a domain file)."""
    pairs, tokens, rejected = [], {}, list(rejected)
    for inst in instances:
        try:
            pair = align(inst, tokenizer, bool(spec.get("prepend_bos")), spec.get("plain_prompt"))
            info = pair.token_info(tokenizer)
            candidate_tokens(tokenizer, list(inst.candidates))
        except (AlignmentError, ValueError) as e:
            if inst.source and not lenient:     # a pairs file with strict=true: say which line
                raise PairError(_rejected_line(inst), inst.id, str(e), f"{inst.source.rsplit(':', 1)[0]} "
                                                                       f"(strict=true) ") from None
            if not lenient:
                raise
            rejected.append(Rejected(_rejected_line(inst), inst.id, "tokenizer", str(e)))
            continue
        pairs.append(pair)
        tokens[inst.id] = info
    if not pairs:
        raise AlignmentError(f"no pair aligns for this model: all {len(rejected)} were rejected:" + _listed(rejected))
    return pairs, tokens, rejected


def _report_rejected(rejected: list, n: int, path) -> None:
    shown = "\n  ".join(f"line {r.line}{f' ({r.id})' if r.id else ''} [{r.stage}]: {r.reason}" for r in rejected[:10])
    more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
    print(f"[kvnotes] {len(rejected)} of {n} pairs of {path} left out (recorded under `rejected`; strict=true stops "
          f"at the first):\n  {shown}{more}")


def _readout_block(readouts: dict, conf: dict) -> dict:
    return {"per_group": [{"candidates": list(k[0]), **ro.to_record()} for k, ro in readouts.items()],
            "exclusion_rule": conf["exclusion"]}


def _report(path: Path, analysis: dict) -> None:
    s = analysis["summary"]
    print(f"[kvnotes] record: {path}  ({s['n_included']}/{s['n_gated']} gated instances included, "
          f"{s['n_excluded']} excluded, {s['n_controls']} controls)")
    if s.get("n_gated") and not s.get("n_included"):   # say why, not only how many
        print("[kvnotes] no gated pair passed the inclusion rule (exclusion.*): each of the record's `excluded` rows "
              "gives its reasons (e.g. no decision flip, |delta m| < tau); nothing is aggregated")


# ---------------------------------------------------------------- re-analysis of a record, without the model
def _rows(record: dict) -> dict:
    return {r["id"]: r for part in ("instances", "excluded", "controls") for r in record.get(part, [])}


def _changes(old: dict, new: dict, config_changes: list[str]) -> dict:
    """What a re-analysis changed: settings, aggregate entries, summary counts, per-pair rows."""
    oa, na = old.get("aggregate", {}), new.get("aggregate", {})
    orows, nrows = _rows(old), _rows(new)
    return {"config": config_changes,
            "aggregate": sorted(k for k in set(oa) | set(na) if oa.get(k) != na.get(k)),
            "summary": {k: [old.get("summary", {}).get(k), v] for k, v in new.get("summary", {}).items()
                        if old.get("summary", {}).get(k) != v},
            "rows_changed": sum(orows.get(i) != r for i, r in nrows.items()),
            "rows_moved": sorted(i for i in nrows if _part(old, i) != _part(new, i)),
            "sanity_changed": old.get("sanity") != new.get("sanity")}


def _part(record: dict, iid: str) -> str | None:
    return next((p for p in ("instances", "excluded", "controls") if any(r["id"] == iid for r in record.get(p, []))),
                None)


def _migrate_scenario(conf: dict, old: dict, ignored: list[str], generated: list, rows: dict) -> list[str]:
    """The scenario settings to adopt from this run when the record's differ only in how the scenario is written
    (e.g. `placement: after_rule` and `domains: null` before the domains became files, now `layout: rule_first` and
    the explicit list) and this run's scenario makes exactly the record's instances with identical messages; else [].
    Without it, the unchanged canonical run (`make main`) would be refused as a different config."""
    if not ignored or any(not d.startswith("scenario.") for d in ignored):
        return []
    cur = conf["scenario"]
    try:
        now = scenarios.make_instances(cur["family"], n_instances=conf["n_instances"], seed=conf["seed"],
                                       **dict(cur["params"]))
    except (ValueError, TypeError):
        return []
    before = {i.id: i for i in generated if i.id in rows}
    if {i.id for i in now} != set(rows) or any(
            (i.old_messages, i.new_messages, i.suffix) != (before[i.id].old_messages, before[i.id].new_messages,
                                                           before[i.id].suffix) for i in now):
        return []
    return ignored


def reanalyse(conf: dict, probe: Probe, path: Path, cache_dir: Path | None) -> dict:
    """Re-run `probe.analyse` (current code, current statistics) on the raw logits a record stores, and rewrite the
    record with a `reanalysed` entry. The prompts are re-rendered with the model's tokenizer (no weights) and must
    lay out as the record says, or the stored logits would be read at the wrong tokens."""
    if not probe.spec.reanalysable:
        raise ReanalysisError(f"probe {probe.name!r} cannot be re-analysed from its records: "
                              f"{probe.spec.not_reanalysable}. Re-run it instead: {_command(conf, 'overwrite=true')}")
    if not path.exists():
        raise ReanalysisError(f"no record to re-analyse at {path}; make it with: {_command(conf)}")
    record = json.loads(path.read_text())
    old = record["config"]
    if record.get("experiment") != probe.name:
        raise ReanalysisError(f"{path} is a record of {record.get('experiment')!r}, not of {probe.name!r}")
    # what was measured is the record's; only the analysis settings come from this run's config
    measured = {k: v for k, v in comparable(conf, probe).items() if k not in ANALYSIS}
    ignored = config_diff({k: v for k, v in comparable(old, probe).items() if k not in ANALYSIS}, measured)
    if ignored:
        print("[kvnotes] re-analysis keeps the record's measured settings; ignoring this run's:\n  "
              + "\n  ".join(ignored))
    used = {**old, **{k: conf[k] for k in ANALYSIS}}
    spec = old["model"]
    tok = load_tokenizer(spec, cache_dir)
    generated = scenarios.make_instances(old["scenario"]["family"], n_instances=old["n_instances"], seed=old["seed"],
                                         **dict(old["scenario"]["params"]))
    rows = _rows(record)
    gone = sorted(set(rows) - {i.id for i in generated})
    if gone:
        raise ReanalysisError(f"{path}: the scenario generator no longer makes {len(gone)} of the record's instances "
                              f"({gone[:5]}); the prompts changed, re-run the probe: {_command(conf, 'overwrite=true')}")
    # the record's instances, in the order they were measured (a generator whose defaults now make more instances,
    # e.g. `domains: null` over more domain files, still makes these: each is checked token by token below)
    order = list(record.get("timing", {}).get("per_instance_s") or [])
    rank = {iid: k for k, iid in enumerate(order)} if set(order) == set(rows) else {}
    instances = sorted((i for i in generated if i.id in rows), key=lambda i: rank.get(i.id, 0))
    ids = [i.id for i in instances]
    tokens, mismatches = {}, []
    for inst in instances:
        try:
            pair = align(inst, tok, bool(spec.get("prepend_bos")), spec.get("plain_prompt"))
        except AlignmentError as e:
            mismatches.append(f"{inst.id}: no longer aligns ({e})")
            continue
        info, row = pair.token_info(tok), rows[inst.id]
        bad = [f"{k} {row['tokens'].get(k)!r} -> {info[k]!r}" for k in LAYOUT if row["tokens"].get(k) != info[k]]
        bad += [f"{k} {row.get(k)!r} -> {getattr(inst, k)!r}" for k in IDENTITY if row.get(k) != getattr(inst, k)]
        if bad:
            mismatches.append(f"{inst.id}: " + ", ".join(bad))
        tokens[inst.id] = info
    if mismatches:
        raise ReanalysisError(f"{path}: the prompts no longer render as the record's ({len(mismatches)} of "
                              f"{len(instances)} instances differ; record -> now):\n  " + "\n  ".join(mismatches[:8])
                              + f"\nThe stored logits belong to the old prompts; re-run the probe: "
                                f"{_command(conf, 'overwrite=true')}")
    migrated = _migrate_scenario(conf, old, ignored, generated, rows)
    if migrated:
        used["scenario"] = conf["scenario"]
        print("[kvnotes] the record's scenario is written in an older schema that makes exactly these prompts; "
              "its config now says so:\n  " + "\n  ".join(migrated))
    try:
        raws = {iid: probe.raw_from_row(rows[iid], record) for iid in ids}
    except KeyError as e:
        raise ReanalysisError(f"{path}: its rows lack {e} (written before the probe kept it in its rows); re-run the "
                              f"probe: {_command(conf, 'overwrite=true')}") from None
    if record.get("pairs_from"):   # its margins were the source record's: keep them
        readouts = readouts_from_record({"path": record["pairs_from"]["path"], "readout": record["readout"]},
                                        instances)
    else:
        readouts = probe.readouts(tok, instances, raws)
    analysis = probe.analyse(instances, tokens, raws, readouts, used["exclusion"], used["stats"])
    new = {**record, "paper_refs": list(probe.spec.paper_refs), "config": used,
           "readout": _readout_block(readouts, used), **analysis}
    state = provenance(old["seed"], now_iso(), 0.0)
    entry = {"at": state["started_at"], "git_sha": state["git_sha"], "git_dirty": state["git_dirty"],
             "packages": state["packages"],
             "changed": _changes(record, new, config_diff({k: old[k] for k in ANALYSIS},
                                                          {k: used[k] for k in ANALYSIS})),
             "instances_generated_not_in_record": len(generated) - len(instances),
             "scenario_config_migrated": migrated}
    new["reanalysed"] = list(record.get("reanalysed", [])) + [entry]
    write_json_atomic(path, new)
    ch, sha = entry["changed"], state["git_sha"]
    print(f"[kvnotes] re-analysed {path} with the code at {sha[:10] if sha else 'an unknown commit'}: "
          f"{len(ch['aggregate'])} aggregate entries and {ch['rows_changed']} rows changed")
    _report(path, analysis)
    return new


# ---------------------------------------------------------------- entry point
@contextmanager
def _figures_lock(results_dir: Path):
    """One figure build at a time per results directory: parallel sweep cells would write the same files."""
    lock = results_dir / ".hydra" / "figures.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_mode() -> None:
    """A config that defines a sweep (e.g. experiment=fig3a) run without --multirun would quietly run one cell."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    params = hc.sweeper.get("params") if "sweeper" in hc else None
    if hc.mode == RunMode.RUN and params:
        sweep = " ".join(f"{k}={v}" for k, v in params.items())
        raise SystemExit(f"this config is a sweep ({sweep}, from hydra.sweeper.params): run it with --multirun (-m)")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    t0 = time.time()
    _check_mode()
    record = run(cfg)
    if cfg.make_figures and record:
        from figures import circuit, fig3, make_figures
        results = _abs(cfg.results_dir)
        # figures of the repository's results go to figures/; of any other results directory, next to it
        out = [] if results == _abs("results") else ["--out", str(results / "figures")]
        name, tag = record["scenario"]["name"], record["config"].get("tag")
        # a circuit probe's record feeds Fig. 15 and tab:circuit only; every other probe's, Fig. 3 and the rest
        circuit_run = record["experiment"] in circuit.PROBES
        jobs = [(circuit.main, out)] if circuit_run else [(make_figures.main, out), (fig3.main, out)]
        if record["experiment"] == "locality" and (tag or name not in make_figures.FIG3A_SCENARIOS):
            # this run's own Fig. 3a (e.g. a pairs file's): figures/fig3a_locality_<scenario>[-<tag>].png
            jobs.append((make_figures.main, [*out, "--scenario", name, *(["--tag", tag] if tag else [])]))
        with _figures_lock(results):
            for make, extra in jobs:   # each skips, with a message, what has no record yet
                try:
                    make(["--results", str(results), *extra])
                except (SystemExit, RecordError) as e:   # e.g. a record a panel needs is missing: keep the record
                    print(f"[kvnotes] figures not regenerated ({make.__module__}): {e}")
    print(f"[kvnotes] wall time {time.time() - t0:.1f} s, peak memory {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
