"""Domains of the one-word gated-decision family as data: one YAML file per domain under `scenarios/domains/`.

Adding a domain = adding one file (no Python, no test edits). A file `<key>.yaml` holds:

    agent: a customer-support assistant for an online store    # "You are {agent}."
    record:
      format: key_value          # key_value | table | json | prose
      header: ORDER RECORD       # the record's first line
      lines:                     # the record's other lines, before the field; placeholders {name} {oid} {channel}
        - "customer: {name}"     #   key_value / table / json: "key: value"; prose: sentences
        - "reference: {oid}"
        - "channel: {channel}"   #   {channel} (the control pairs' field) must occur exactly once
      field_text: null           # prose only: the field's sentence, with {value} (default "The {field} is {value}.")
    field: order_status          # the gated field, as the rule and the record name it
    values: {allowed: pending, disallowed: shipped}
    answers: {allow: cancel, refuse: deny}     # the one-word answers; refuse is the restrictive (safe) one
    rule: "An order may be cancelled only if its order_status is pending. ..."  # names the allowed or disallowed value
    rule_inverted: null          # optional; default: `rule` with the two values swapped (whole words)
    other_values: [delivered]    # optional; see below
    requests:                    # >= 3 paraphrases; placeholders {name} {oid}
      - "Please cancel order {oid}."

`other_values` (optional) lists further values of the field that the rule's "anything else" / "otherwise" clause
covers, i.e. that the rule treats like the value it does not name (order_cancel names `pending`, so `delivered` is
denied like `shipped`). They make the same-conclusion controls of scenarios.diverse (`same_conclusion`: a value
change that keeps the action). Each is one word (no spaces or braces), different from both values and from each
other, and the rule must name exactly one of its two values, once, and none of the other values (whole words):
otherwise which action an other value gets is not what the file says.

A file that breaks this schema raises `DomainError` naming the file, the key and the fix. Whether the two values
tokenize alike is a property of each model's tokenizer: that is checked per model at render time
(`scenarios.render.align`, `AlignmentError`).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

DOMAIN_DIR = Path(__file__).resolve().parent / "domains"
FORMATS = ("key_value", "table", "json", "prose")
_TOP = {"agent", "record", "field", "values", "answers", "rule", "rule_inverted", "other_values", "requests"}
_RECORD = {"format", "header", "lines", "field_text"}


class DomainError(ValueError):
    pass


def word_count(text: str, word: str) -> int:
    """How often `word` occurs in `text` as a whole word (the matching of Domain.rule_text: "no" is not in "not")."""
    return len(re.findall(rf"\b{re.escape(word)}\b", text))


@dataclass(frozen=True)
class Domain:
    key: str
    agent: str
    format: str
    header: str
    lines: tuple          # templates over {name}, {oid}, {channel}
    field_text: str       # prose: the field's sentence over {value}; other formats: unused
    field: str
    allowed: str
    disallowed: str
    allow: str            # the permissive answer word (unsafe)
    refuse: str           # the restrictive answer word (safe)
    rule: str
    rule_inverted: str | None
    requests: tuple
    source: str           # the YAML file
    other_values: tuple = ()   # values the rule's "anything else" clause covers (same-conclusion controls)

    def rule_mentions(self) -> dict:
        """{value: how often the (normal) rule names it as a whole word} for the two values and the other values."""
        return {v: word_count(self.rule, v) for v in (self.allowed, self.disallowed, *self.other_values)}

    def rule_text(self, polarity: str = "normal") -> str:
        """The gate rule; "inverted" swaps the allowed and disallowed values (whole words only, so "no" does not
        touch "not"), unless the file gives `rule_inverted`. Raises ValueError if the rule names neither value."""
        if polarity == "normal":
            return self.rule
        if polarity != "inverted":
            raise ValueError(f"an instance's polarity must be 'normal' or 'inverted', got {polarity!r}")
        if self.rule_inverted:
            return self.rule_inverted
        pat = re.compile(rf"\b({re.escape(self.allowed)}|{re.escape(self.disallowed)})\b")
        if not pat.search(self.rule):
            raise ValueError(f"the rule of domain {self.key!r} names neither {self.allowed!r} nor "
                             f"{self.disallowed!r}; cannot invert it (give `rule_inverted` in {self.source})")
        return pat.sub(lambda m: self.disallowed if m.group(1) == self.allowed else self.allowed, self.rule)


def _placeholders(template: str) -> set:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def parse_domain(key: str, doc, source: str = "<memory>") -> Domain:
    """Validate one domain document (the parsed YAML) and return it as a `Domain`; DomainError on any fault."""
    def fail(msg):
        raise DomainError(f"domain {key!r} ({source}): {msg}")

    if not isinstance(doc, dict):
        fail("the file must hold a mapping with the keys " + ", ".join(sorted(_TOP)))
    unknown = set(doc) - _TOP
    if unknown:
        fail(f"unknown keys {sorted(unknown)}; the schema's keys are {sorted(_TOP)} (see scenarios/domains.py)")
    missing = {"agent", "record", "field", "values", "answers", "rule", "requests"} - set(doc)
    if missing:
        fail(f"missing keys {sorted(missing)}")
    rec = doc["record"]
    if not isinstance(rec, dict) or set(rec) - _RECORD or not {"header", "lines"} <= set(rec):
        fail(f"`record` must be a mapping with `header` and `lines` (and optionally `format`, `field_text`), got {rec!r}")
    fmt = rec.get("format", "key_value")
    if fmt not in FORMATS:
        fail(f"record.format {fmt!r} is not one of {FORMATS}")
    lines = rec["lines"]
    if not isinstance(lines, list) or not all(isinstance(x, str) and x for x in lines):
        fail("record.lines must be a list of non-empty strings")
    for line in lines:
        bad = _placeholders(line) - {"name", "oid", "channel"}
        if bad:
            fail(f"record line {line!r} uses placeholders {sorted(bad)}; allowed: name, oid, channel")
        if fmt != "prose" and ": " not in line:
            fail(f"record line {line!r} is not 'key: value' (format {fmt})")
    if sum(line.count("{channel}") for line in lines) != 1:
        fail("record.lines must contain {channel} exactly once (the control pairs change that value)")
    field_text = rec.get("field_text")
    if fmt == "prose":
        field_text = field_text or "The {field} is {value}."
        if _placeholders(field_text) - {"field", "value"} or "{value}" not in field_text:
            fail(f"record.field_text {field_text!r} must contain {{value}} (and may contain {{field}} only)")
    elif field_text is not None:
        fail("record.field_text is for format: prose only")
    vals, ans = doc["values"], doc["answers"]
    if not isinstance(vals, dict) or set(vals) != {"allowed", "disallowed"}:
        fail("values must be {allowed: ..., disallowed: ...}")
    if not isinstance(ans, dict) or set(ans) != {"allow", "refuse"}:
        fail("answers must be {allow: ..., refuse: ...}")
    for name, v in [("values.allowed", vals["allowed"]), ("values.disallowed", vals["disallowed"]),
                    ("answers.allow", ans["allow"]), ("answers.refuse", ans["refuse"]), ("field", doc["field"])]:
        if not isinstance(v, str) or not v.strip() or v != v.strip() or "\n" in v or "{" in v:
            fail(f"{name} must be a non-empty one-line string without surrounding spaces or braces, got {v!r}")
    if vals["allowed"] == vals["disallowed"]:
        fail("the two values are equal")
    if ans["allow"] == ans["refuse"] or " " in ans["allow"] or " " in ans["refuse"]:
        fail("the two answers must be two different single words")
    reqs = doc["requests"]
    if not isinstance(reqs, list) or len(reqs) < 3 or not all(isinstance(r, str) and r for r in reqs):
        fail("requests must be a list of at least three paraphrases")
    for r in reqs:
        bad = _placeholders(r) - {"name", "oid"}
        if bad:
            fail(f"request {r!r} uses placeholders {sorted(bad)}; allowed: name, oid")
    for name in ("agent", "rule"):
        if not isinstance(doc[name], str) or not doc[name].strip() or "\n" in doc[name]:
            fail(f"{name} must be a non-empty one-line string")
    inv = doc.get("rule_inverted")
    if inv is not None and (not isinstance(inv, str) or "\n" in inv):
        fail("rule_inverted must be a one-line string or null")
    for text in [doc["rule"], inv or ""]:
        if "{" in text:
            fail("rules are plain text (no placeholders)")
    others = doc.get("other_values")
    if others is not None:
        if not isinstance(others, list) or not others:
            fail(f"other_values must be a non-empty list of words (or left out), got {others!r}")
        for v in others:
            if not isinstance(v, str) or not v or any(c.isspace() or c in "{}" for c in v):
                fail(f"other_values: {v!r} is not one word (no spaces or braces)")
        if vals["allowed"] in others or vals["disallowed"] in others or len(set(others)) != len(others):
            fail(f"other_values {others} must differ from the two values ({vals['allowed']!r}, "
                 f"{vals['disallowed']!r}) and from each other")
        named = {v: word_count(doc["rule"], v) for v in (vals["allowed"], vals["disallowed"])}
        if sorted(named.values()) != [0, 1]:
            said = ", ".join(f"{v!r} {n}x" for v, n in named.items() if n) or "neither value"
            fail(f"other_values needs a rule that names exactly one of its two values, once, and covers the rest "
                 f"with an 'anything else' / 'otherwise' clause; this rule names {said}. Rewrite the rule that way or "
                 f"remove other_values")
        inside = [v for v in others if word_count(doc["rule"], v)]
        if inside:
            fail(f"other_values {inside} occur in the rule, so the rule does not treat them as 'anything else'; "
                 f"choose values the rule does not name")
    return Domain(key=key, agent=doc["agent"], format=fmt, header=rec["header"], lines=tuple(lines),
                  field_text=field_text or "", field=doc["field"], allowed=vals["allowed"],
                  disallowed=vals["disallowed"], allow=ans["allow"], refuse=ans["refuse"], rule=doc["rule"],
                  rule_inverted=inv, requests=tuple(reqs), source=source, other_values=tuple(others or ()))


def load_domains(dirs=None) -> dict:
    """{key: Domain} from every `*.yaml` in `dirs` (default: scenarios/domains/), sorted by key.

    `dirs`: a path or a list of paths; later directories may add domains but never silently replace one (a key
    defined twice raises DomainError naming both files). Raises DomainError for a missing directory."""
    if dirs is None:
        dirs = [DOMAIN_DIR]
    elif isinstance(dirs, (str, Path)):
        dirs = [dirs]
    out = {}
    for d in dirs:
        d = Path(d).expanduser()
        if not d.is_dir():
            raise DomainError(f"domain directory {d} does not exist")
        for path in sorted(d.glob("*.yaml")):
            key = path.stem
            if key in out:
                raise DomainError(f"domain {key!r} is defined twice: {out[key].source} and {path}")
            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise DomainError(f"domain {key!r} ({path}): not valid YAML: {e}") from None
            out[key] = parse_domain(key, doc, str(path))
    return dict(sorted(out.items()))
