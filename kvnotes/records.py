"""Result records: one JSON file per (probe, model, scenario[, tag]) run, written atomically, with provenance.

A run appends each finished instance to a `.partial.jsonl` beside its record; an interrupted run with the same
config resumes from it, and the partial file is removed once the record is written.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from kvnotes.models import REPO_ROOT

SCHEMA_VERSION = 1
PACKAGES = ("torch", "transformers", "accelerate", "gguf", "transformer-lens", "nnsight", "hydra-core", "numpy")


def record_path(results_dir, probe: str, model: str, scenario: str, tag: str | None = None) -> Path:
    name = scenario if not tag else f"{scenario}-{tag}"
    return Path(results_dir) / probe / model / f"{name}.json"


def git_state() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    sha = run("rev-parse", "HEAD") or None
    # records under results/ and rendered figures are outputs, not code: a run started while an earlier run's
    # outputs are uncommitted is still a run of the committed code
    dirty = bool(run("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results",
                     ":(exclude)figures/*.png", ":(exclude)figures/*.pdf")) if sha else None
    return {"git_sha": sha, "git_dirty": dirty}


def provenance(seed: int, started_at: str, wall_s: float) -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    return {**git_state(), "packages": versions, "python": platform.python_version(), "seed": seed,
            "started_at": started_at, "wall_s": round(wall_s, 2), "host_cpus": os.cpu_count()}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a record is for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Progress:
    """Per-instance results of an unfinished run, keyed by instance id; only rows with the same config hash count."""

    def __init__(self, record: Path, cfg_hash: str):
        self.path = Path(record).with_suffix(".partial.jsonl")
        self.cfg_hash = cfg_hash
        self.done: dict = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by the interruption
                if row.get("config_hash") == cfg_hash:
                    self.done[row["id"]] = row["result"]

    def add(self, instance_id: str, result: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"config_hash": self.cfg_hash, "id": instance_id, "result": result}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[instance_id] = result

    def finish(self) -> None:
        if self.path.exists():
            self.path.unlink()
