"""The `pairs` scenario family: a researcher's own prompt pairs, read from a file (issue 14, "Step 4b").

    python run.py scenario=pairs scenario.path=my_pairs.jsonl probe=locality

The file is JSON Lines (`.jsonl`: one object a line; blank lines are skipped) or YAML (`.yaml` / `.yml`: a list of
the same mappings). One entry is one old/new pair:

    id           required  unique within the file, e.g. "library_renewal/1"
    cluster      required  the unit the statistics cluster by (one policy / domain / template): pairs of one cluster
                           are not independent, so intervals resample clusters, not pairs
    old, new     required  the two prompts: chat messages [{"role": ..., "content": ...}, ...] rendered with the
                           model's chat template, or (with `plain: true`) two raw prompt strings. Identical except
                           one value in one message
    answers      required  {"old": word, "new": word}: the action each prompt's value implies (equal: a control pair)
    candidates   optional  every word the decision is read over (default: the two answers); a control needs >= 2
    restrictive, permissive  optional  the margin m = logit(restrictive) - logit(permissive); for a gated pair they
                           are its two answers (give one, the other follows). Without them the flip direction is
                           `unspecified` (pooled, in neither direction's slice) and m = logit(new) - logit(old)
    field        optional  the field's name, for the record (default "field")
    values       optional  {"old": ..., "new": ...}: the changing values as written (default: the differing
                           characters widened to whole words); they must cover every differing character
    plain        optional  true: `old` / `new` are raw prompt strings (no chat template; the model's BOS rule holds)
    suffix       optional  forced text appended after the generation prompt (e.g. "tool_call:")
    regions      optional  [[message, start, end, label], ...] character spans in the OLD prompt's message contents
                           (message 0 for a plain prompt): fine labels. Content no span covers is labelled `prefix`
                           (before the field) or `downstream` (after it), chat markup `template`. Spans that cover
                           every message exactly with the generators' labels give exactly the generators' labels
    note_at      optional  [message, offset] in the OLD prompt: where the wording probe puts an update note
    kind         optional  "gated" or "control"; must agree with `answers`
    meta         optional  a mapping kept in the record as the pair's `variant`

Bad input never passes silently. A file that cannot be read at all raises `PairsFileError`. An entry that cannot be
used raises `PairError` (its line, id and reason) when `strict`; otherwise it is returned as a `Rejected` (stage
"parse") and the rest are used. Tokenizer-level problems (values of unequal token length, a differing span that
leaves the value, an answer word without a first token of its own) are found per model by run.py, which records them
the same way (stage "tokenizer").
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from scenarios.base import Instance

REQUIRED = ("id", "cluster", "old", "new", "answers")
OPTIONAL = ("candidates", "restrictive", "permissive", "field", "values", "plain", "suffix", "regions", "note_at",
            "kind", "meta")
SUFFIXES = (".jsonl", ".yaml", ".yml")
ROLES = ("system", "user", "assistant", "tool")
LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class PairsFileError(ValueError):
    """The file as a whole cannot be used (missing, unknown format, unparsable YAML, empty, changed since a record)."""


class PairError(ValueError):
    """One entry cannot be used; `line` (1-based) and `id` (None if unknown) say which."""

    def __init__(self, line: int, pair_id: str | None, reason: str, where: str = ""):
        self.line, self.id, self.reason = line, pair_id, reason
        super().__init__(f"{where}line {line}{f' ({pair_id})' if pair_id else ''}: {reason}")


@dataclass(frozen=True)
class Rejected:
    """A pair left out, with the reason: recorded in the run's record under `rejected`."""
    line: int
    id: str | None
    stage: str          # "parse" (the file) or "tokenizer" (this model's tokenizer: alignment, answer tokens)
    reason: str

    def to_record(self) -> dict:
        return asdict(self)


def resolve(path: str | Path) -> Path:
    """The file: as given if it exists (relative to the working directory), else relative to the repository."""
    p = Path(str(path)).expanduser()
    if p.exists() or p.is_absolute():
        return p
    from kvnotes.models import REPO_ROOT
    return REPO_ROOT / p


def existing(path: str | Path) -> Path:
    """The resolved file; PairsFileError naming where it was looked for when there is none."""
    p = resolve(path)
    if not p.is_file():
        raise PairsFileError(f"no pairs file at {p}; give one with scenario.path=<file.jsonl> (see scenarios/pairs.py "
                             f"for the format, scenarios/examples/ for an example)")
    return p


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(existing(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- reading the file
def read_entries(path: str | Path) -> list[tuple[int, object]]:
    """[(line, entry or the exception that made the line unreadable)] in file order."""
    p = existing(path)
    if p.suffix not in SUFFIXES:
        raise PairsFileError(f"{p}: a pairs file is JSON Lines (.jsonl) or YAML (.yaml / .yml), not {p.suffix!r}")
    text = p.read_text(encoding="utf-8-sig")     # a leading byte-order mark is not part of line 1
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line, object_pairs_hook=_no_duplicate_keys)))
            except json.JSONDecodeError as e:
                out.append((n, ValueError(f"not a JSON object: {e.msg} (column {e.colno})")))
            except ValueError as e:
                out.append((n, e))
    else:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PairsFileError(f"{p}: not valid YAML ({e})") from None
        if data is None:
            raise PairsFileError(f"{p}: the file holds no pairs")
        if not isinstance(data, list):
            raise PairsFileError(f"{p}: a YAML pairs file is a list of mappings (one per pair), not a "
                                 f"{type(data).__name__}")
        out = []
        for item, entry in zip(node.value, data):
            dup = _yaml_duplicate_keys(item)
            out.append((item.start_mark.line + 1, ValueError(dup) if dup else entry))
    if not out:
        raise PairsFileError(f"{p}: the file holds no pairs")
    return out


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key{'s' if len(dup) > 1 else ''} {', '.join(map(repr, dup))} in one object "
                         f"(JSON keeps only the last; write each key once)")
    return dict(pairs)


def _yaml_duplicate_keys(node) -> str | None:
    """The reason an entry's YAML mapping (at any depth) repeats a key, or None."""
    if isinstance(node, yaml.MappingNode):
        keys = [k.value for k, _ in node.value]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            return (f"duplicate key{'s' if len(dup) > 1 else ''} {', '.join(map(repr, dup))} in one mapping "
                    f"(YAML keeps only the last; write each key once)")
        children = [v for _, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        return None
    return next((r for r in map(_yaml_duplicate_keys, children) if r), None)


def _not_text(value) -> str:
    """A hint for a value YAML did not read as text (yes / no / on / off are booleans, 0 / 3 numbers)."""
    if isinstance(value, (bool, int, float)):
        return " (YAML read it as a boolean or a number: quote it, e.g. \"yes\" or \"3\")"
    return ""


def _messages(value, plain: bool, key: str) -> tuple:
    if plain:
        if not isinstance(value, str) or not value:
            raise ValueError(f"'{key}' must be a non-empty string when plain is true")
        return ({"role": "text", "content": value},)
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of chat messages {{role, content}} (or a string with "
                         f"plain: true)")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"'{key}' message {i} must be a mapping with exactly the keys role and content")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"'{key}' message {i}: role must be one of {ROLES} and content a string")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _words(value, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"'{key}' must be a non-empty word without surrounding spaces, got {value!r}"
                         + _not_text(value))
    return value


def _value_span(old: str, new: str, values: dict | None) -> tuple[int, int, int]:
    """(start, end in old, end in new) of the changing value in one message's two contents."""
    p = 0
    while p < min(len(old), len(new)) and old[p] == new[p]:
        p += 1
    s = 0
    while s < min(len(old), len(new)) - p and old[-1 - s] == new[-1 - s]:
        s += 1
    lo, hi_old, hi_new = p, len(old) - s, len(new) - s
    if values is None:       # widen to whole words: "pending" vs "paid" differ in "ending" / "aid"
        while lo > 0 and old[lo - 1].isalnum():
            lo -= 1
        while hi_old < len(old) and old[hi_old].isalnum():
            hi_old, hi_new = hi_old + 1, hi_new + 1
        return lo, hi_old, hi_new
    vo, vn = values["old"], values["new"]
    for start in range(max(0, hi_old - len(vo)), lo + 1):
        if old[start:start + len(vo)] == vo and new[start:start + len(vn)] == vn \
                and start + len(vo) >= hi_old and start + len(vn) >= hi_new:
            return start, start + len(vo), start + len(vn)
    raise ValueError(f"the values {vo!r} -> {vn!r} do not cover the characters that differ "
                     f"({old[lo:hi_old]!r} -> {new[lo:hi_new]!r} at character {lo})")


def _one_edit(old: str, new: str) -> None:
    """Without `values`, the differing characters (widened to whole words) must be one edit: not several changes
    with unchanged words between them (`pending\\nlanguage: fr` -> `shipped\\nlanguage: de`), and not across a
    line break. ValueError naming the pieces otherwise."""
    import difflib
    a, b = re.findall(r"\w+|\W", old), re.findall(r"\w+|\W", new)
    edits = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(edits) > 1 or "\n" in old or "\n" in new:
        pieces = [("".join(a[i1:i2]), "".join(b[j1:j2])) for _, i1, i2, j1, j2 in edits]
        raise ValueError(f"the prompts differ in more than one place ({'; '.join(f'{x!r} -> {y!r}' for x, y in pieces)}"
                         f"); a pair changes one value. If this is one value, give it as `values`")


def parse_entry(entry, line: int, source: str = "") -> Instance:
    """One file entry as an Instance; ValueError with the reason when it cannot be used (PairError adds the line)."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is a mapping, not a {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
    problems = ([f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"] if missing else []) \
        + ([f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"] if unknown else [])
    if problems:   # both at once: a typo ('answer') is one unknown and one missing key
        raise ValueError("; ".join(problems) + f" (required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})")
    pid, cluster = entry["id"], entry["cluster"]
    if not isinstance(pid, str) or not pid or not isinstance(cluster, str) or not cluster:
        raise ValueError("'id' and 'cluster' must be non-empty strings")
    plain = entry.get("plain", False)
    if not isinstance(plain, bool):
        raise ValueError(f"'plain' must be true or false, got {plain!r}")
    old, new = _messages(entry["old"], plain, "old"), _messages(entry["new"], plain, "new")
    if len(old) != len(new) or any(a["role"] != b["role"] for a, b in zip(old, new)):
        raise ValueError("'old' and 'new' must have the same messages in the same roles")
    differing = [i for i, (a, b) in enumerate(zip(old, new)) if a["content"] != b["content"]]
    if not differing:
        raise ValueError("the old and new prompts are identical: nothing changes")
    if len(differing) > 1:
        raise ValueError(f"the prompts differ in {len(differing)} messages ({differing}); a pair changes one value "
                         f"in one message")
    mi = differing[0]
    values = entry.get("values")
    if values is not None:
        if not isinstance(values, dict) or set(values) != {"old", "new"} \
                or not all(isinstance(v, str) and v for v in values.values()):
            raise ValueError("'values' must be {old: text, new: text}, both non-empty"
                             + (_not_text(next(iter(values.values()))) if isinstance(values, dict) and values
                                else ""))
    lo, hi_old, hi_new = _value_span(old[mi]["content"], new[mi]["content"], values)
    if old[mi]["content"][:lo] != new[mi]["content"][:lo] or \
            old[mi]["content"][hi_old:] != new[mi]["content"][hi_new:]:
        raise ValueError("the prompts differ outside one value")
    old_value, new_value = old[mi]["content"][lo:hi_old], new[mi]["content"][lo:hi_new]
    if values is None:
        _one_edit(old_value, new_value)

    answers = entry["answers"]
    if not isinstance(answers, dict) or set(answers) != {"old", "new"}:
        raise ValueError("'answers' must be {old: word, new: word}: the action each value implies")
    a_old, a_new = _words(answers["old"], "answers.old"), _words(answers["new"], "answers.new")
    cands = entry.get("candidates", [a_old, a_new])
    if not isinstance(cands, list):
        raise ValueError("'candidates' must be a list of words")
    cands = [_words(c, "candidates") for c in cands]
    cands = list(dict.fromkeys(cands))
    if a_old not in cands or a_new not in cands:
        raise ValueError(f"'candidates' {cands} must include both answers {a_old!r} and {a_new!r}")
    if len(cands) < 2:
        raise ValueError(f"a control pair (both answers {a_old!r}) needs 'candidates' with at least one other word "
                         f"for the decision to be read over")
    kind = "gated" if a_old != a_new else "control"
    if entry.get("kind", kind) != kind:
        raise ValueError(f"'kind' says {entry['kind']!r} but the answers make it {kind!r}")
    restrictive, permissive = entry.get("restrictive"), entry.get("permissive")
    for key, w in (("restrictive", restrictive), ("permissive", permissive)):
        if w is not None and w not in cands:
            raise ValueError(f"'{key}' {w!r} is not among the candidates {cands}")
    known = restrictive is not None or permissive is not None
    if kind == "gated":
        pair = {a_old, a_new}
        for key, w in (("restrictive", restrictive), ("permissive", permissive)):
            if w is not None and w not in pair:
                raise ValueError(f"'{key}' {w!r} must be one of the answers {a_old!r}, {a_new!r}")
        if restrictive is None and permissive is None:
            restrictive, permissive = a_new, a_old
        restrictive = restrictive if restrictive is not None else (pair - {permissive}).pop()
        permissive = permissive if permissive is not None else (pair - {restrictive}).pop()
    else:
        others = [c for c in cands if c != a_old]
        if restrictive is None and permissive is None:
            restrictive, permissive = others[0], a_old
        elif permissive is None:
            permissive = a_old if restrictive != a_old else others[0]
        elif restrictive is None:
            restrictive = a_old if permissive != a_old else others[0]
    if restrictive == permissive:
        raise ValueError(f"'restrictive' and 'permissive' are the same word {restrictive!r}")

    field_name = entry.get("field", "field")
    suffix = entry.get("suffix", "")
    if not isinstance(field_name, str) or not field_name or not isinstance(suffix, str):
        raise ValueError("'field' must be a non-empty string and 'suffix' a string")
    spans = [[] for _ in old]
    regions = entry.get("regions", [])
    if not isinstance(regions, list):
        raise ValueError("'regions' must be a list of [message, start, end, label]")
    for r in regions:
        if not (isinstance(r, list) and len(r) == 4 and all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in r[:3]) and isinstance(r[3], str)):
            raise ValueError(f"a region is [message, start, end, label], got {r!r}")
        m, s, e, label = r
        if not 0 <= m < len(old):
            raise ValueError(f"region {r!r}: message {m} does not exist (the prompt has {len(old)})")
        if not 0 <= s < e <= len(old[m]["content"]):
            raise ValueError(f"region {r!r}: characters {s}..{e} are not inside message {m}'s content "
                             f"(0..{len(old[m]['content'])})")
        if not LABEL.match(label):
            raise ValueError(f"region {r!r}: a label is a name (letters, digits, _ and -), got {label!r}")
        spans[m].append((s, e, label))
    for m, sp in enumerate(spans):
        sp.sort()
        for (s0, e0, _), (s1, _, _) in zip(sp, sp[1:]):
            if s1 < e0:
                raise ValueError(f"regions of message {m} overlap at characters {s1}..{e0}")
    tiles = all(sum(e - s for s, e, _ in sp) == len(msg["content"]) for sp, msg in zip(spans, old))
    note = entry.get("note_at")
    note_at = ()
    if note is not None:
        if not (isinstance(note, list) and len(note) == 2 and all(isinstance(x, int) for x in note)):
            raise ValueError(f"'note_at' is [message, offset], got {note!r}")
        nm, off = note
        if not (0 <= nm < len(old) and 0 <= off <= len(old[nm]["content"])):
            raise ValueError(f"'note_at' {note!r} is not inside the old prompt's messages")
        if nm < mi or (nm == mi and off < hi_old):
            raise ValueError(f"'note_at' {note!r} comes before the end of the changing value (message {mi}, "
                             f"character {hi_old}): an update note goes after the field")
        if plain and off >= len(old[nm]["content"].rstrip()):
            raise ValueError(f"'note_at' {note!r} is at the end of a plain prompt: the note would change the last "
                             f"(decision) token; put it before the question")
        shift = (hi_new - hi_old) if nm == mi and off >= hi_old else 0
        note_at = ((nm, off), (nm, off + shift))
    meta = entry.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be a mapping")
    return Instance(
        id=pid, scenario=cluster, kind=kind, field=field_name, old_value=old_value, new_value=new_value,
        old_messages=old, new_messages=new, safe=restrictive, unsafe=permissive, expected_old=a_old,
        expected_new=a_new, candidates=tuple(cands), suffix=suffix, variant=dict(meta),
        spans=tuple(tuple(sp) for sp in spans), value_at=((mi, lo, hi_old), (mi, lo, hi_new)), note_at=note_at,
        plain=plain, partial_spans=not tiles, direction_known=known, source=source)


def load(path: str | Path, strict: bool = False, sha256: str | None = None) -> tuple[list[Instance], list[Rejected]]:
    """(the usable pairs as Instances, the rejected entries with reasons). strict: raise PairError at the first bad
    entry. sha256: the file's expected digest (a record's), PairsFileError if the file changed."""
    p = resolve(path)
    digest = file_sha256(p)
    if sha256 and sha256 != digest:
        raise PairsFileError(f"{p} changed since the record was made (sha256 {sha256[:12]}... then, {digest[:12]}... "
                             f"now); re-run the probe on the new file, or restore the old one")
    instances, rejected, seen = [], [], {}
    for line, entry in read_entries(p):
        pid = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None
        try:
            if isinstance(entry, Exception):
                raise entry
            if pid in seen:
                raise ValueError(f"duplicate id {pid!r} (first on line {seen[pid]})")
            inst = parse_entry(entry, line, f"{p.name}:{line}")
        except ValueError as e:
            if strict:
                raise PairError(line, pid, str(e), f"{p.name} ") from None
            rejected.append(Rejected(line, pid, "parse", str(e)))
            continue
        seen[pid] = line
        instances.append(inst)
    return instances, rejected


def make_instances(path: str, strict: bool = False, sha256: str | None = None, n_instances: int | None = None,
                   seed: int | None = None) -> list[Instance]:
    """The usable pairs of the file (every entry, in file order; `n_instances` and `seed` belong to the generated
    families and are not used). Rejected entries are left out here; run.py records them via `load`."""
    return load(path, strict, sha256)[0]


# ---------------------------------------------------------------- writing a generated family as such a file
def to_entry(inst: Instance) -> dict:
    """An Instance as a pairs-file entry that reads back to the same prompts, values, answers, margin words, fine
    labels and note site (scenarios/export.py)."""
    if not inst.spans:
        raise ValueError(f"{inst.id}: no generator spans to export")
    (mo, lo, ho), (_, _, hn) = inst.value_at
    entry = {"id": inst.id, "cluster": inst.scenario,
             "old": inst.old_messages[0]["content"] if inst.plain else [dict(m) for m in inst.old_messages],
             "new": inst.new_messages[0]["content"] if inst.plain else [dict(m) for m in inst.new_messages],
             "answers": {"old": inst.expected_old, "new": inst.expected_new}, "candidates": list(inst.candidates),
             "field": inst.field, "values": {"old": inst.old_messages[mo]["content"][lo:ho],
                                             "new": inst.new_messages[mo]["content"][lo:hn]}}
    if inst.direction_known:
        entry.update(restrictive=inst.safe, permissive=inst.unsafe)
    if inst.plain:
        entry["plain"] = True
    if inst.suffix:
        entry["suffix"] = inst.suffix
    entry["regions"] = [[m, s, e, label] for m, sp in enumerate(inst.spans) for s, e, label in sp]
    if inst.note_at:
        entry["note_at"] = list(inst.note_at[0])
    entry["kind"] = inst.kind
    if inst.variant:
        entry["meta"] = dict(inst.variant)
    return entry
