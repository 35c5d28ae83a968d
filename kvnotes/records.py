"""Result records: one JSON file per (probe, model, scenario[, tag]) run, written atomically, with provenance.

A run appends each finished instance to a `.partial.jsonl` beside its record; an interrupted run with the same
config resumes from it, and the partial file is removed once the record is written.

Reading records back (figures, tables, the README's numbers) goes through four functions, all taking the same
`source` and filters (see `find_records`):

* `load_index`      one row per record: identity, provenance, the record's `summary` counts;
* `load_frame`      long format, one row per instance x per-instance metric (the rows' numeric keys);
* `load_aggregates` one row per record x aggregate summary (mean, ci_lo, ci_hi, n, n_clusters and any other
                    scalar key the summary carries);
* `read_record`     the validated JSON itself, for what is neither a number nor a count (e.g. wording labels).

Every frame starts with the same identity columns (`ID_COLUMNS`). A missing or malformed record raises
`RecordError` (an ordinary exception) naming the file and, for a missing one, the command that makes it.
"""
from __future__ import annotations

import datetime as dt
import glob as globlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]   # the same root as kvnotes.models.REPO_ROOT, without importing it
DEFAULT_RESULTS = REPO_ROOT / "results"
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "model"

SCHEMA_VERSION = 1
PACKAGES = ("torch", "transformers", "accelerate", "gguf", "transformer-lens", "nnsight", "hydra-core", "numpy")


def plain_value(x):
    """A frame cell as a plain value: NaN / NA -> None, numpy scalars -> Python numbers (for JSON and drawing)."""
    try:
        if x is None or x != x:   # NaN / NA
            return None
    except TypeError:             # pd.NA compares to NA
        return None
    return x.item() if hasattr(x, "item") else x


def repo_relative(path) -> str:
    """`path` relative to the repository root when it lies inside it (for tables and READMEs that must not name this
    machine's directories), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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


# ---------------------------------------------------------------------------------------------------------------------
# Reading records back: index, per-instance frame, aggregate frame
# ---------------------------------------------------------------------------------------------------------------------
ANY = "*"   # the `tag` filter that matches every tag (the default); `tag=None` matches untagged records only

ID_COLUMNS = ["probe", "model", "scenario", "family", "tag", "seed", "git_sha", "path"]
INSTANCE_COLUMNS = ["instance", "domain", "kind", "status", "flip", "flip_source", "layout", "field", "old_value",
                    "new_value", "expected_old", "expected_new", "dec_stale", "dec_oracle", "delta_m", "reasons"]
FRAME_COLUMNS = [*ID_COLUMNS, *INSTANCE_COLUMNS, "metric", "index", "value"]
AGGREGATE_COLUMNS = [*ID_COLUMNS, "metric", "key", "mean", "ci_lo", "ci_hi", "n", "n_clusters"]
SECTIONS = (("instances", "included"), ("excluded", "excluded"), ("controls", "control"))
NESTED_SKIP = ("variant", "tokens", "raw")   # per-row keys that hold inputs / raw logits, never metrics
DIRECTION_WORDS = {"allowed->disallowed": "allow->refuse", "disallowed->allowed": "refuse->allow"}


class RecordError(Exception):
    """A missing or malformed record. The message names the file (and the key that is wrong)."""


class MissingRecord(RecordError):
    """No record where one is needed; `command` is the run.py invocation that makes it."""

    def __init__(self, message: str, command: str | None = None):
        super().__init__(message)
        self.command = command


def run_command(probe: str, model: str, scenario: str, tag: str | None = None) -> str:
    """The command that makes the record of (probe, model, scenario[, tag])."""
    cmd = f"python run.py probe={probe} model={model} scenario={scenario}"
    return f"{cmd} tag={tag}" if tag else cmd


def registered_models(config_dir=MODEL_CONFIG_DIR) -> list[str]:
    """The registered models that run here: `configs/model/<name>.yaml` of kind `gguf` (not the tiny test models, not
    the remote `ndif` ones, which only the circuit probes reach), sorted by name."""
    import yaml

    names = []
    for p in sorted(Path(config_dir).glob("*.yaml")):
        spec = yaml.safe_load(p.read_text()) or {}
        if spec.get("kind") == "gguf":
            names.append(p.stem)
    return names


def split_record_name(path) -> tuple[str, str | None]:
    """`<scenario>[-<tag>].json` -> (scenario, tag or None). Scenario names never contain '-'."""
    scenario, _, tag = Path(path).name.removesuffix(".json").partition("-")
    return scenario, (tag or None)


def _wanted(value, want) -> bool:
    if want is None:
        return True
    if isinstance(want, str):
        return value == want
    return value in set(want)


def _tag_wanted(tag, want) -> bool:
    if want == ANY:
        return True
    if want is None or want == "":
        return not tag
    return _wanted(tag, want)


def find_records(source=None, *, probe=None, model=None, scenario=None, tag=ANY) -> list[Path]:
    """Record files from `source`, filtered by the path layout `<probe>/<model>/<scenario>[-<tag>].json`.

    `source` is None (the repository's `results/`), a results directory, a record file, a glob pattern (`*`, `?`,
    `[`; `**` recurses), or a list of these. Filters are a name, a list of names, or None (no filter); `tag` is
    `ANY` ("*", the default: every tag), None (untagged records only), a tag or a list of tags. Files named
    explicitly or by a glob are filtered on their content when they are read (`load_*`), not here.
    """
    sources = [source] if source is None or isinstance(source, (str, os.PathLike)) else list(source)
    found: dict[Path, None] = {}
    for src in sources:
        src = DEFAULT_RESULTS if src is None else src
        text = str(src)
        if Path(src).is_dir():
            for p in sorted(Path(src).glob("*/*/*.json")):
                if p.name.startswith("."):
                    continue
                scen, t = split_record_name(p)
                if (_wanted(p.parent.parent.name, probe) and _wanted(p.parent.name, model)
                        and _wanted(scen, scenario) and _tag_wanted(t, tag)):
                    found[p] = None
        elif Path(src).is_file():
            found[Path(src)] = None
        elif any(c in text for c in "*?["):
            for p in sorted(globlib.glob(text, recursive=True)):
                if Path(p).is_file() and p.endswith(".json") and not Path(p).name.startswith("."):
                    found[Path(p)] = None
        else:
            raise MissingRecord(f"no record or results directory at {src}")
    return list(found)


def _require(rec: dict, path, *keys):
    node = rec
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise RecordError(f"malformed record {path}: missing key '{'.'.join(keys[: i + 1])}'")
        node = node[key]
    return node


def _parse(data: bytes, path) -> dict:
    try:
        rec = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"malformed record {path}: not valid JSON ({err})") from None
    if not isinstance(rec, dict):
        raise RecordError(f"malformed record {path}: top level is not a JSON object")
    for keys in (("experiment",), ("model", "name"), ("scenario", "name"), ("aggregate",), ("summary",)):
        _require(rec, path, *keys)
    for key in ("aggregate", "summary"):
        if not isinstance(rec[key], dict):
            raise RecordError(f"malformed record {path}: '{key}' is not an object")
    for key, _ in SECTIONS:
        if not isinstance(rec.get(key, []), list):
            raise RecordError(f"malformed record {path}: '{key}' is not a list")
    return rec


def _read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        probe, model = Path(path).parent.parent.name, Path(path).parent.name
        scenario, tag = split_record_name(path)
        raise MissingRecord(f"missing record {path}", run_command(probe, model, scenario, tag)) from None


def read_record(path) -> dict:
    """One record, checked for the keys every probe writes (experiment, model.name, scenario.name, aggregate,
    summary; instances/excluded/controls are lists when present). Raises MissingRecord / RecordError."""
    return _parse(_read_bytes(path), path)


def record_identity(rec: dict, path) -> dict:
    """The identity columns of a record: probe, model, scenario, family, tag, seed, git_sha, path."""
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    prov = rec.get("provenance") if isinstance(rec.get("provenance"), dict) else {}
    tag = cfg["tag"] if "tag" in cfg else split_record_name(path)[1]
    return {"probe": rec["experiment"], "model": rec["model"]["name"], "scenario": rec["scenario"]["name"],
            "family": rec["scenario"].get("family"), "tag": tag or None, "seed": cfg.get("seed", prov.get("seed")),
            "git_sha": prov.get("git_sha"), "path": str(path)}


def _matches(ident: dict, probe, model, scenario, tag) -> bool:
    return (_wanted(ident["probe"], probe) and _wanted(ident["model"], model) and _wanted(ident["scenario"], scenario)
            and _tag_wanted(ident["tag"], tag))


def _is_scalar(x) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_interval_key(key: str) -> bool:
    """Keys whose [lo, hi] list becomes <key>_lo / <key>_hi columns ("ci" -> ci_lo / ci_hi)."""
    return key == "ci" or key.endswith("_ci") or key.startswith("ci_") or key in ("wilson", "interval")


def _summary_fields(node: dict) -> tuple[dict, list]:
    """Split a dict into its scalar fields (intervals split into _lo/_hi) and its dict/list children."""
    fields, children = {}, []
    for k, v in node.items():
        k = str(k)
        if _is_interval_key(k) and (v is None and k == "ci" or isinstance(v, list) and len(v) == 2
                                    and all(x is None or _is_number(x) for x in v)):
            lo, hi = v if v is not None else (None, None)
            fields["ci_lo" if k == "ci" else f"{k}_lo"] = lo
            fields["ci_hi" if k == "ci" else f"{k}_hi"] = hi
        elif _is_scalar(v):
            fields[k] = v
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            fields[k] = "; ".join(v)   # e.g. several warnings
        elif isinstance(v, dict) or isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            children.append((k, v))
        # a list of numbers (e.g. per-pair means) is not a summary: skipped
    return fields, children


def _aggregate_rows(agg: dict) -> list[dict]:
    """One row per summary node of `aggregate` (see load_aggregates); rows under a `per_scenario` key are marked."""
    rows = []

    def walk(node, metric: str, parts: list, per_scenario: bool):
        if isinstance(node, dict):
            fields, children = _summary_fields(node)
            if fields:
                rows.append({"metric": metric, "key": "/".join(parts), **fields, "_per_scenario": per_scenario})
            for k, v in children:
                walk(v, metric, [*parts, k], per_scenario or k == "per_scenario")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, (dict, list)):
                    walk(v, metric, [*parts, str(i)], per_scenario)

    for metric, node in agg.items():
        if _is_scalar(node):
            rows.append({"metric": str(metric), "key": "", "value": node, "_per_scenario": False})
        else:
            walk(node, str(metric), [], False)
    return rows


def _index_row(rec: dict, path) -> dict:
    row = record_identity(rec, path)
    prov = rec.get("provenance") if isinstance(rec.get("provenance"), dict) else {}
    row.update(git_dirty=prov.get("git_dirty"), schema_version=rec.get("schema_version"))
    summary = rec["summary"]
    if isinstance(summary.get("scenarios_included"), list):
        row["n_scenarios"] = len(summary["scenarios_included"])
    for k, v in summary.items():
        if k not in row:
            row[k] = v
    return row


_TABLES: dict[str, tuple[str, dict, list]] = {}   # resolved path -> (content digest, index row, aggregate rows)


def _record_tables(path) -> tuple[dict, list]:
    """The index row and aggregate rows of a record, parsed once per content (keyed on a digest of the bytes)."""
    data = _read_bytes(path)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    cached = _TABLES.get(str(Path(path).resolve()))
    if cached is None or cached[0] != digest:
        rec = _parse(data, path)
        cached = (digest, _index_row(rec, path), _aggregate_rows(rec["aggregate"]))
        _TABLES[str(Path(path).resolve())] = cached
    index, rows = cached[1], cached[2]
    if index["path"] != str(path):   # the same file reached through another spelling of its path
        index = {**index, "path": str(path)}
    return index, rows


def _column(values: list):
    """A column that keeps the record's types: ints (with gaps) as Int64, floats as float64, mixed as object."""
    import pandas as pd

    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {int}:
        return pd.array(values, dtype="Int64")
    if kinds and kinds <= {float}:
        return pd.array([math.nan if v is None else v for v in values], dtype="float64")
    if kinds and kinds <= {bool}:
        return pd.array(values, dtype="boolean")
    if kinds and kinds <= {str}:
        return pd.array(values, dtype="str")
    return pd.array(values, dtype=object)


def _frame(rows: list[dict], lead: list[str]):
    import pandas as pd

    names = list(lead)
    seen = set(names)
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                names.append(k)
    return pd.DataFrame({k: _column([r.get(k) for r in rows]) for k in names}, columns=names)


def _records(source, probe, model, scenario, tag):
    for path in find_records(source, probe=probe, model=model, scenario=scenario, tag=tag):
        index, rows = _record_tables(path)
        if _matches(index, probe, model, scenario, tag):
            yield path, index, rows


def load_index(source=None, *, probe=None, model=None, scenario=None, tag=ANY):
    """One row per record: the identity columns, git_dirty, schema_version, n_scenarios (= len of
    summary.scenarios_included) and every key of the record's `summary` (counts such as n_total, n_gated,
    n_included, n_excluded, n_controls; lists such as ks stay lists). Sources and filters as in `find_records`."""
    rows = [index for _, index, _ in _records(source, probe, model, scenario, tag)]
    return _frame(rows, [*ID_COLUMNS, "git_dirty", "schema_version", "n_scenarios"])


def load_aggregates(source=None, *, probe=None, model=None, scenario=None, tag=ANY, metric=None,
                    per_scenario: bool = False):
    """Long-format aggregates: one row per record x summary node of the record's `aggregate`.

    `metric` is the top-level aggregate key (e.g. "field_only_recovery", "label_recovery/task", "topk_in"); `key`
    is the path below it, "/"-joined ("" at the top; "8" for topk_in["8"]; "graded/0.5/mask/recovery" in
    knockout; list positions are path parts, e.g. single_by_layer "3"). A summary node is any dict with scalar
    values; its scalars become columns, whatever they are (mean, n, n_clusters, ci_method, k, median, warning,
    scenario_weighted_mean, ...), and 2-number intervals split in two: ci -> ci_lo, ci_hi; <name>_ci, ci_<name>,
    wilson, interval -> <name>_lo, <name>_hi; a list of strings inside a summary (e.g. several warnings) becomes
    one "; "-joined string. A bare scalar aggregate (e.g. decodability n_samples) is a row with its number in
    `value`. Lists of numbers (per-pair means) and top-level lists of names (anchors) are skipped. Rows under a
    `per_scenario` key are left out unless `per_scenario=True`. Integer fields are Int64, so a table written
    from this frame prints 28, not 28.0. `metric` filters like the other filters.
    """
    rows = []
    for _, index, agg_rows in _records(source, probe, model, scenario, tag):
        ident = {k: index[k] for k in ID_COLUMNS}
        for r in agg_rows:
            if (per_scenario or not r["_per_scenario"]) and _wanted(r["metric"], metric):
                rows.append({**ident, **{k: v for k, v in r.items() if k != "_per_scenario"}})
    return _frame(rows, AGGREGATE_COLUMNS)


def _refusals(rec: dict) -> set:
    """The restrictive ("safe") actions of a record's readout groups, e.g. {"deny"} or {"refuse", "escalate"}."""
    readout = rec.get("readout") if isinstance(rec.get("readout"), dict) else {}
    return {g["safe"] for g in readout.get("per_group") or [] if isinstance(g, dict) and g.get("safe")}


def flip_direction(row: dict, refusals: set) -> tuple[str | None, str | None]:
    """(direction, what it was read from). Directions are "allow->refuse", "refuse->allow", or, for a control,
    "allow->allow" / "refuse->refuse"; "refuse" is the restrictive action of the record's readout (deny, refuse,
    escalate) or the row's own `safe_action`, "allow" any other action. Read, in this order, from:
    "expected"          the row's expected_old / expected_new (locality, wording, decodability rows);
    "variant.direction" the generator's "allowed->disallowed" / "disallowed->allowed" (every diverse-family row);
    "decisions"         the model's own dec_stale / dec_oracle (observed, not intended: the last resort).
    Expected actions without a known restrictive action give "<old action>-><new action>"."""
    refuse = set(refusals) | ({row["safe_action"]} if row.get("safe_action") else set())
    side = lambda a: "refuse" if a in refuse else "allow"   # noqa: E731
    old, new = row.get("expected_old"), row.get("expected_new")
    if old is not None and new is not None:
        return (f"{side(old)}->{side(new)}" if refuse else f"{old}->{new}"), "expected"
    variant = row.get("variant") if isinstance(row.get("variant"), dict) else {}
    if variant.get("direction") in DIRECTION_WORDS:
        return DIRECTION_WORDS[variant["direction"]], "variant.direction"
    old, new = row.get("dec_stale"), row.get("dec_oracle")
    if old is not None and new is not None and refuse:
        return f"{side(old)}->{side(new)}", "decisions"
    return None, None


def _row_metrics(row: dict, nested: bool):
    """(metric, index, value) for each number of a row: its top-level numeric keys; with `nested`, also every
    number inside its dicts and lists ("/"-joined dict path; the position in the innermost list in `index`)."""
    for k, v in row.items():
        if _is_number(v):
            yield k, None, v
    if not nested:
        return

    def walk(node, parts):
        if isinstance(node, dict):
            for k, v in node.items():
                if _is_number(v):
                    yield "/".join([*parts, str(k)]), None, v
                elif isinstance(v, (dict, list)):
                    yield from walk(v, [*parts, str(k)])
        else:
            for i, v in enumerate(node):
                if _is_number(v):
                    yield "/".join(parts), i, v
                elif isinstance(v, (dict, list)):
                    yield from walk(v, [*parts, str(i)])

    for k, v in row.items():
        if k not in NESTED_SKIP and isinstance(v, (dict, list)):
            yield from walk(v, [k])


def load_frame(source=None, *, probe=None, model=None, scenario=None, tag=ANY, nested: bool = False):
    """Long format: one row per instance x per-instance metric, from every record `source` and the filters select
    (see `find_records`; e.g. ``load_frame(probe="locality", scenario="diverse")``).

    Columns (FRAME_COLUMNS): the identity columns probe, model, scenario (the record's scenario name), family,
    tag, seed, git_sha, path; then per instance: instance (its id), domain (the row's `scenario`, the statistics
    cluster), kind (gated / control), status (included / excluded / control: which list of the record the row
    sits in), flip and flip_source (see `flip_direction`), layout (variant["layout"], else variant["placement"],
    else None), field, old_value, new_value, expected_old, expected_new, dec_stale, dec_oracle, delta_m, reasons
    (an excluded row's reasons, "; "-joined); then metric, index, value (float).

    Metrics are the numeric top-level keys of each row (m_stale, m_oracle, delta_m, field_only_recovery, ...), so
    delta_m is both a column and a metric. Nested per-position / per-layer dicts and lists are skipped unless
    `nested=True`, which flattens every number in them (metric = "/"-joined path, e.g. "m/field" or
    "knockout/oracle/graded/0.5/mask/recovery"; list positions of the innermost list go to `index`, e.g. metric
    "single", index = layer); variant, tokens and raw (logits) are never flattened.
    """
    import pandas as pd

    cols: dict[str, list] = {c: [] for c in FRAME_COLUMNS}
    for path in find_records(source, probe=probe, model=model, scenario=scenario, tag=tag):
        rec = read_record(path)
        ident = record_identity(rec, path)
        if not _matches(ident, probe, model, scenario, tag):
            continue
        refusals = _refusals(rec)
        for section, status in SECTIONS:
            for row in rec.get(section) or []:
                variant = row.get("variant") if isinstance(row.get("variant"), dict) else {}
                flip, source_ = flip_direction(row, refusals)
                reasons = row.get("reasons")
                meta = {**ident, "instance": row.get("id"), "domain": row.get("scenario"), "kind": row.get("kind"),
                        "status": status, "flip": flip, "flip_source": source_,
                        "layout": variant.get("layout", variant.get("placement")),
                        **{k: row.get(k) for k in ("field", "old_value", "new_value", "expected_old", "expected_new",
                                                   "dec_stale", "dec_oracle", "delta_m")},
                        "reasons": "; ".join(map(str, reasons)) if isinstance(reasons, list) else reasons}
                for metric, index, value in _row_metrics(row, nested):
                    for k, v in meta.items():
                        cols[k].append(v)
                    cols["metric"].append(metric)
                    cols["index"].append(index)
                    cols["value"].append(float(value))
    dtypes = {"value": "float64", "delta_m": "float64", "index": "Int64", "seed": "Int64", "layout": object}
    return pd.DataFrame({k: pd.array(v, dtype=dtypes.get(k, "str")) for k, v in cols.items()}, columns=FRAME_COLUMNS)
