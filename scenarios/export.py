"""Write a generated scenario family as a pairs file (scenarios/pairs.py), to edit or to run through `scenario=pairs`.

    python -m scenarios.export family=diverse n_instances=2 out=my_pairs.jsonl
    python -m scenarios.export scenario=diverse_field_first n_instances=1 seed=3 out=ff.yaml scenario.params.n_gates=2

Arguments are the run's Hydra overrides (configs/: `scenario=<config>`, or `family=<name>` for the scenario config of
that family, `n_instances`, `seed`, `scenario.params.*`) plus `out=<file>` (.jsonl, .yaml or .yml) and optionally
`overwrite=true`. Every pair keeps its prompts, values, answers, margin words, generator labels (as regions), update
note site and surface parameters (as meta), so `scenario=pairs` on the file measures exactly what the family does
(tests/test_pairs.py checks the records are identical).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

import scenarios
from scenarios.pairs import SUFFIXES, to_entry


class ExportError(ValueError):
    pass


def export(overrides: list[str], out: str | Path, overwrite: bool = False) -> Path:
    """Compose the config with `overrides`, generate its scenario and write it to `out`; returns the path.
    ExportError for a scenario read from a file, an unknown suffix, or an existing file without overwrite."""
    from hydra import compose, initialize_config_dir

    from kvnotes.models import REPO_ROOT
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ExportError(f"out={out}: a pairs file is .jsonl, .yaml or .yml")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=true to replace it")
    overrides = [f"scenario={o.split('=', 1)[1]}" if o.startswith("family=") else o for o in overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "configs")):
        cfg = compose(config_name="config", overrides=overrides)
    scen = cfg.scenario
    if scen.family in scenarios.READ_FROM_FILE:
        raise ExportError(f"scenario {scen.name!r} is already read from a file ({scen.path})")
    params = dict(scen.params)
    instances = scenarios.make_instances(scen.family, n_instances=cfg.n_instances, seed=cfg.seed, **params)
    entries = [to_entry(i) for i in instances]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    else:
        out.write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("out", "overwrite") and "=" in a)
    rest = [a for a in argv if a.split("=", 1)[0] not in ("out", "overwrite")]
    if "out" not in opts or any("=" not in a for a in rest):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        path = export(rest, opts["out"], opts.get("overwrite", "false").lower() == "true")
    except ExportError as e:
        print(f"[kvnotes] {e}", file=sys.stderr)
        return 1
    n = sum(1 for _ in open(path)) if path.suffix == ".jsonl" else len(yaml.safe_load(path.read_text()))
    print(f"[kvnotes] wrote {n} pairs to {path}; run them with: python run.py scenario=pairs scenario.path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
