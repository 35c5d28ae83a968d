"""kvnotes entry point: one probe x one model x one scenario family -> one JSON record (and refreshed figures).

    python run.py                                    # locality, qwen2.5-coder-1.5b, diverse (the main job)
    python run.py probe=locality model=qwen2.5-coder-0.5b scenario=diverse n_instances=12
    python run.py --multirun model=qwen2.5-coder-0.5b,smollm2-135m scenario=diverse,family_a
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers can be imported: nothing touches the network

import importlib
import inspect
import random
import resource
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import scenarios
from kvnotes.models import REPO_ROOT, load_model
from kvnotes.readout import candidate_tokens
from kvnotes.records import (SCHEMA_VERSION, Progress, config_hash, now_iso, provenance, record_path,
                             write_json_atomic)
from scenarios.render import align


SECOND = "#pass2"   # progress key suffix of a probe's second pass


def _abs(path) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def peak_rss_gib() -> float:
    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kib / 1024 ** 2


def run(cfg: DictConfig) -> dict:
    """Run the configured probe and write its record; returns the record."""
    t0, started = time.time(), now_iso()
    prov = provenance(cfg.seed, started, 0.0)   # git state as the run starts: the code that produced the record
    conf = OmegaConf.to_container(cfg, resolve=True)
    conf.pop("hydra", None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = importlib.import_module(f"probes.{cfg.probe.name}")
    results_dir = _abs(cfg.results_dir)
    path = record_path(results_dir, cfg.probe.name, cfg.model.name, cfg.scenario.name, cfg.tag)

    lm = load_model(cfg.model.name, cfg.dtype, _abs(cfg.cache_dir) if cfg.cache_dir else None)
    params = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in conf["scenario"]["params"].items()}
    instances = scenarios.make_instances(cfg.scenario.family, n_instances=cfg.n_instances, seed=cfg.seed, **params)
    spec = lm.spec
    pairs = [align(i, lm.tokenizer, bool(spec.get("prepend_bos")), spec.get("plain_prompt")) for i in instances]
    tokens = {p.instance.id: p.token_info(lm.tokenizer) for p in pairs}

    volatile = {"make_figures", "cache_dir"}   # settings that cannot change a result
    progress = Progress(path, config_hash({k: v for k, v in conf.items() if k not in volatile}))
    if progress.done:
        n_done = sum(not k.endswith(SECOND) for k in progress.done)
        print(f"[kvnotes] resuming {path.name}: {n_done}/{len(pairs)} instances already measured")
    cand_cache = {}

    def cand_ids(pair) -> list:
        cands = tuple(pair.instance.candidates)
        if cands not in cand_cache:
            cand_cache[cands] = [t for lst in candidate_tokens(lm.tokenizer, list(cands)).values() for _, t, _ in lst]
        return cand_cache[cands]

    todo = [p for p in pairs if p.instance.id not in progress.done]
    # probe options (configs/probe/<name>.yaml) that the probe's measure() takes by name, e.g. knockout's n_random
    accepted = inspect.signature(probe.measure).parameters
    options = {k: v for k, v in conf["probe"].items() if k in accepted and k not in ("batch_size", "check_decode")}
    for pair in tqdm(todo, desc=f"{cfg.probe.name} {cfg.model.name} {cfg.scenario.name}", unit="inst"):
        check = sum(not k.endswith(SECOND) for k in progress.done) < cfg.probe.check_decode_instances
        raw = probe.measure(lm, pair, cand_ids(pair), batch_size=cfg.probe.batch_size, check_decode=check, **options)
        progress.add(pair.instance.id, raw)

    raws = {k: dict(v) for k, v in progress.done.items() if not k.endswith(SECOND)}
    seconds = {k: raws[k].pop("seconds", None) for k in raws}
    readouts = probe.choose_readouts(lm.tokenizer, instances, raws)
    if hasattr(probe, "measure_second"):   # a pass that needs every pair's first pass and the readouts (e.g. rankings)
        plans = probe.plan_second(instances, tokens, raws, readouts, conf["exclusion"], conf["probe"])
        todo = [p for p in pairs if p.instance.id + SECOND not in progress.done]
        for pair in tqdm(todo, desc=f"{cfg.probe.name} pass 2", unit="inst"):
            raw2 = probe.measure_second(lm, pair, cand_ids(pair), plans[pair.instance.id],
                                        batch_size=cfg.probe.batch_size)
            progress.add(pair.instance.id + SECOND, raw2)
        for iid in raws:
            second = dict(progress.done[iid + SECOND])
            seconds[iid] = (seconds[iid] or 0) + (second.pop("seconds", None) or 0)
            raws[iid].update({"second": second, "plan": plans[iid]})
    analysis = probe.analyse(instances, tokens, raws, readouts, conf["exclusion"], conf["stats"])
    wall = time.time() - t0
    record = {
        "schema_version": SCHEMA_VERSION,
        "experiment": cfg.probe.name,
        "paper_refs": getattr(probe, "PAPER_REFS", []),
        "model": {k: v for k, v in lm.info.items() if k != "load_s"},
        "scenario": {"name": cfg.scenario.name, "family": cfg.scenario.family, "params": params,
                     "n_instances_per_scenario": cfg.n_instances},
        "config": conf,
        "provenance": {**prov, "wall_s": round(wall, 2)},
        "readout": {"per_group": [{"candidates": list(k[0]), **ro.to_record()} for k, ro in readouts.items()],
                    "exclusion_rule": conf["exclusion"]},
        **analysis,
        "timing": {"load_s": lm.info.get("load_s"), "per_instance_s": seconds, "wall_s": round(wall, 2)},
    }
    write_json_atomic(path, record)
    progress.finish()
    s = analysis["summary"]
    print(f"[kvnotes] record: {path}  ({s['n_included']}/{s['n_gated']} gated instances included, "
          f"{s['n_excluded']} excluded, {s['n_controls']} controls)")
    return record


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    t0 = time.time()
    record = run(cfg)
    if cfg.make_figures:
        from figures import fig3, make_figures
        try:
            make_figures.main(["--results", str(_abs(cfg.results_dir))])
        except SystemExit as e:   # e.g. no record yet for the panel's required scenario: say so, keep the record
            print(f"[kvnotes] figures not regenerated: {e}")
        fig3.main(["--results", str(_abs(cfg.results_dir))])     # skips, with a message, what has no record yet
    print(f"[kvnotes] wall time {time.time() - t0:.1f} s, peak memory {peak_rss_gib():.2f} GiB")
    agg = record["aggregate"].get("field_only_recovery", {})
    return agg.get("mean")


if __name__ == "__main__":
    main()
