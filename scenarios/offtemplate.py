"""Family C (the cancel/deny gate, paper_spec §1.4 / §3.15 D6) and Family D (the off-template tasks, §1.5 /
§3.14 D5) as generated families with surface variation. The prompt text is data: one YAML file per task under
`scenarios/offtemplate/` (family_c, multihop, rag_lookup, natural); this module only assembles the pieces.

The paper generated these prompts with almost no surface variation (a handful of order ids, §8 W2). Here every
instance draws its wording from the file's pools with its own PRNG, `random.Random("<family>:<seed>:...:<k>")`, so an
instance is the same whatever else is generated with it, and a different seed gives different prompts.

* `family_c` (`make_family_c`): "cancel order X only if order_status equals <trigger>, otherwise deny", reference
  notes, the order_status line, the request, a one-word answer (cancel / deny, deny the restrictive one) and the
  forced suffix `Decision:`. `pair`: "field" (the paper's primary pairs: the order_status value changes, the trigger
  is held) or "trigger" (the dissociation pairs: the rule's trigger changes, the field line is held byte for byte).
  `order`: "rule_first" (the paper's: the rule, the notes, then the field) or "field_first" (the order_status line
  before the rule, the F->R regime of the step-5 map).
* `offtemplate` (`make_instances`): `task` multihop | rag_lookup | natural (None: all three). The field is the
  location an entity is stored in (multihop), the person on duty (rag_lookup) or the account state (natural); the
  answer is one word the field implies. No answer is the restrictive one, so the instances say
  `direction_known=False` and set safe / unsafe to the new / old answers: m = logit(new) - logit(old), as in §1.5.

Both families add control pairs in which one detail no question reads changes (the file's `control` line: the
order's channel, the audit day, the ticket priority, the device the user writes from) and the answer must not.

Region labels (scenarios/regions.py): the changing value `field`, the rest of its line `field_line`; in a Family C
trigger pair the changing word `trigger` (the rest of the rule `gate`) and the held order_status line `fixed_field`,
as in the Family B trigger pairs of scenarios/diverse.py; the cancel rule and the natural task's rule sentence `gate`;
record lines, directories, session lines and a control pair's unchanged field line `record`; reference notes, filler
lines and small talk `filler_rules` (the neutral text of the prompt: there is no label for neutral text that is not a
rule); the request and the question `conversation`; the answer instruction and cue `task`. The multihop and
rag_lookup prompts have no `gate`: their directory, which maps the field to the answer, is a `record`.
"""
from __future__ import annotations

import random
import re
import string
from pathlib import Path

import yaml

from scenarios.base import Instance, Text, marks_of, messages_of

DATA_DIR = Path(__file__).resolve().parent / "offtemplate"
TASKS = ("multihop", "rag_lookup", "natural")
PAIRS = ("field", "trigger")
ORDERS = ("rule_first", "field_first")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class DataError(ValueError):
    """A task file of scenarios/offtemplate/ breaks its schema; the message names the file, the key and the fix."""


# ---------------------------------------------------------------- reading and checking the task files
class _Doc:
    """One mapping of a task file, read key by key: each reader checks the value and raises DataError naming the file
    and the dotted key; `done()` refuses keys nothing read (a typo would otherwise be silently ignored)."""

    def __init__(self, doc, source: str, where: str = ""):
        self.source, self.where = source, where
        if not isinstance(doc, dict):
            raise DataError(f"{source}: `{where.rstrip('.') or 'the file'}` must be a mapping, got "
                            f"{type(doc).__name__}")
        self.doc, self.read = doc, set()

    def fail(self, key, msg: str):
        raise DataError(f"{self.source}: key `{self.where}{key}`: {msg}")

    def get(self, key):
        if key not in self.doc:
            self.fail(key, "missing (see the comments at the top of the shipped file for what it holds)")
        self.read.add(key)
        return self.doc[key]

    def sub(self, key) -> "_Doc":
        return _Doc(self.get(key), self.source, f"{self.where}{key}.")

    def subs(self, key, min_n: int = 1) -> list:
        items = self.get(key)
        if not isinstance(items, list) or len(items) < min_n:
            self.fail(key, f"must be a list of at least {min_n} mappings")
        return [_Doc(x, self.source, f"{self.where}{key}[{i}].") for i, x in enumerate(items)]

    def word(self, key) -> str:
        w = self.get(key)
        if not isinstance(w, str) or not _WORD.match(w):
            self.fail(key, f"must be one word (letters, digits, _ or -), got {w!r}")
        return w

    def words(self, key, min_n: int = 1) -> tuple:
        ws = self.get(key)
        if not isinstance(ws, list) or len(ws) < min_n:
            self.fail(key, f"must be a list of at least {min_n} words, got {ws!r}")
        for w in ws:
            if not isinstance(w, str) or not _WORD.match(w):
                self.fail(key, f"{w!r} is not one word (letters, digits, _ or -; quote numbers: \"12\")")
        if len(set(ws)) != len(ws):
            self.fail(key, f"lists a word twice: {sorted(w for w in set(ws) if ws.count(w) > 1)}")
        return tuple(ws)

    def text(self, key, need=(), allow=(), value=None) -> str:
        t = self.get(key)
        _check_template(self, key, t, need, allow, value)
        return t

    def texts(self, key, min_n: int = 1, need=(), allow=(), value=None) -> tuple:
        ts = self.get(key)
        if not isinstance(ts, list) or len(ts) < min_n:
            self.fail(key, f"must be a list of at least {min_n} strings, got {ts!r}")
        for t in ts:
            _check_template(self, key, t, need, allow, value)
        if len(set(ts)) != len(ts):
            self.fail(key, "lists a string twice")
        return tuple(ts)

    def done(self) -> None:
        extra = sorted(set(self.doc) - self.read)
        if extra:
            raise DataError(f"{self.source}: unknown key{'s' if len(extra) > 1 else ''} "
                            f"{', '.join(f'`{self.where}{k}`' for k in extra)}; this mapping's keys are "
                            f"{sorted(self.read)}")


def _placeholders(t: str) -> list:
    return [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]


def _check_template(d: _Doc, key, t, need, allow, value) -> None:
    """A one-line template whose placeholders are among need + allow, each of `need` exactly once; the changing
    `value` placeholder must follow a space and not run into a letter or digit (a value glued to its neighbour
    tokenizes with it, so the pair would not align: §8 W6)."""
    if not isinstance(t, str) or not t.strip() or "\n" in t or t != t.strip():
        d.fail(key, f"must hold one-line strings without surrounding spaces, got {t!r}")
    try:
        parsed = list(string.Formatter().parse(t))
    except ValueError as e:
        d.fail(key, f"{t!r} is not a template ({e}); placeholders are {{name}}, braces are not allowed otherwise")
    for _, f, spec, conv in parsed:
        if f is not None and (spec or conv or not f.isidentifier()):
            d.fail(key, f"{t!r}: write placeholders as plain {{name}}, got {{{f}{'!' + conv if conv else ''}"
                        f"{':' + spec if spec else ''}}}")
    fields = _placeholders(t)
    bad = sorted(set(fields) - set(need) - set(allow))
    if bad:
        d.fail(key, f"{t!r} uses placeholder{'s' if len(bad) > 1 else ''} {bad}; allowed here: "
                    f"{sorted(set(need) | set(allow)) or 'none'}")
    for n in need:
        if fields.count(n) != 1:
            d.fail(key, f"{t!r} must contain {{{n}}} exactly once (found {fields.count(n)})")
    if value:
        at = t.index("{" + value + "}")
        end = at + len(value) + 2
        if at == 0 or t[at - 1] != " " or (end < len(t) and t[end].isalnum()):
            d.fail(key, f"{t!r}: {{{value}}} must follow a space and must not run into a letter or digit (a value "
                        f"glued to a neighbour tokenizes with it and the old/new pair would not align)")


def _order_id(d: _Doc) -> dict:
    o = d.sub("order_id")
    letters, digits = o.get("letters"), o.get("digits")
    if not isinstance(letters, str) or not letters.isalpha() or not letters.isupper():
        o.fail("letters", f"must be a string of capital letters, got {letters!r}")
    if not isinstance(digits, int) or not 1 <= digits <= 8:
        o.fail("digits", f"must be an integer 1..8, got {digits!r}")
    o.done()
    return {"letters": letters, "digits": digits}


def _control(d: _Doc, taken) -> dict:
    c = d.sub("control")
    out = {"field": c.word("field"), "line": c.text("line", need=("value",), value="value"),
           "values": c.words("values", min_n=2)}
    clash = sorted({v.lower() for v in out["values"]} & {w.lower() for w in taken})
    if clash:
        c.fail("values", f"{clash} also occur as values or answers of the task; a control value must be a detail "
                         f"nothing asks for")
    c.done()
    return out


def _first_chars(d: _Doc, key, words) -> None:
    if len({w[0].lower() for w in words}) < 2:
        d.fail(key, "needs answers with at least two different first characters (the two answers of a pair must "
                    "not share a first token)")


def _parse_family_c(d: _Doc) -> dict:
    out = {"field": d.word("field"), "values": d.words("values", min_n=2), "suffix": d.get("suffix"),
           "order_id": _order_id(d)}
    if not isinstance(out["suffix"], str) or "\n" in out["suffix"]:
        d.fail("suffix", f"must be a one-line string (\"\" for none), got {out['suffix']!r}")
    a = d.sub("answers")
    out["answers"] = {"allow": a.word("allow"), "refuse": a.word("refuse")}
    a.done()
    if out["answers"]["allow"][0].lower() == out["answers"]["refuse"][0].lower():
        d.fail("answers", "the two answers must start with different characters (else they share a first token)")
    words = {"oid", "field", "allow", "refuse"}
    out.update(roles=d.texts("roles"), rules=d.texts("rules", need=("trigger",), allow=words, value="trigger"),
               notes_headers=d.texts("notes_headers"), note_prefixes=d.texts("note_prefixes", need=("i",)),
               requests=d.texts("requests", allow=("oid",)),
               answer_lines=d.texts("answer_lines", need=("allow", "refuse")))
    n = d.sub("notes")
    out["notes"] = {"subjects": n.texts("subjects"), "predicates": n.texts("predicates")}
    n.done()
    banned = {w.lower() for w in (*out["values"], *out["answers"].values(), out["field"])}
    for key in ("subjects", "predicates"):
        for t in out["notes"][key]:
            hit = sorted(banned & {w.lower() for w in re.findall(r"[A-Za-z_]+", t)})
            if hit:
                n.fail(key, f"{t!r} mentions {hit}: notes must carry nothing the rule reads (no value, answer or "
                            f"the field's name)")
    out["control"] = _control(d, (*out["values"], *out["answers"].values()))
    return out


def _close_frame(f: _Doc, fr: dict, out: dict, values: list, what: str) -> None:
    """Check a frame's answers (distinct first characters, none of them one of the task's `values`), refuse keys
    nothing read, and add the frame to `out`. Raises DataError naming the file and key."""
    _first_chars(f, "answers", fr["answers"])
    clash = sorted({w.lower() for w in fr["answers"]} & {w.lower() for w in values})
    if clash:
        f.fail("answers", f"{clash} are also {what} names; an answer must not be a {what} name")
    f.done()
    out["frames"].append(fr)


def _parse_multihop(d: _Doc) -> dict:
    out = {"locations": d.words("locations", min_n=2), "order_id": _order_id(d), "frames": []}
    for f in d.subs("frames"):
        fr = {"key": f.word("key"), "field": f.word("field"), "owners": f.texts("owners", allow=("oid",)),
              "items": f.texts("items"), "headers": f.texts("headers"),
              "stored": f.texts("stored", need=("location",), allow=("owner", "item"), value="location"),
              "directory_headers": f.texts("directory_headers"),
              "entries": f.texts("entries", need=("location", "answer")),
              "questions": f.texts("questions", allow=("owner", "item")),
              "answers": f.words("answers", min_n=2)}
        _close_frame(f, fr, out, out["locations"], "location")
    _common(d, out, [w for fr in out["frames"] for w in fr["answers"]] + list(out["locations"]))
    out["instructions"] = d.texts("instructions")
    return out


def _parse_rag(d: _Doc) -> dict:
    out = {"names": d.words("names", min_n=2), "order_id": _order_id(d), "frames": []}
    for f in d.subs("frames"):
        fr = {"key": f.word("key"), "field": f.word("field"), "directory_headers": f.texts("directory_headers"),
              "entries": f.texts("entries", need=("name", "answer"), allow=("other",)),
              "others": f.words("others"), "session_header": f.text("session_header"),
              "duty": f.texts("duty", need=("name",), allow=("oid",), value="name"),
              "questions": f.texts("questions"), "instructions": f.texts("instructions"),
              "answers": f.words("answers", min_n=2)}
        _close_frame(f, fr, out, out["names"], "person")
    _common(d, out, [w for fr in out["frames"] for w in fr["answers"]] + list(out["names"]))
    return out


def _parse_natural(d: _Doc) -> dict:
    out = {"order_id": _order_id(d), "openers": d.texts("openers"), "frames": []}
    taken = []
    for f in d.subs("frames"):
        a = f.sub("answers")
        answers = {"allow": a.word("allow"), "refuse": a.word("refuse")}
        a.done()
        if answers["allow"][0].lower() == answers["refuse"][0].lower():
            f.fail("answers", "the two answers must start with different characters (else they share a first token)")
        pairs = f.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            f.fail("pairs", "must be a list of [allowed, refused] value pairs")
        for p in pairs:
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(w, str) and _WORD.match(w) for w in p)
                    and p[0] != p[1]):
                f.fail("pairs", f"{p!r} is not a pair [allowed, refused] of two different words")
        fr = {"key": f.word("key"), "field": f.word("field"), "answers": answers,
              "pairs": [tuple(p) for p in pairs], "topics": f.texts("topics", allow=("oid",)),
              "states": f.texts("states", need=("value",), value="value"),
              "rules": f.texts("rules", need=("allowed", "refused"), allow=("allow", "refuse")),
              "asks": f.texts("asks")}
        f.done()
        out["frames"].append(fr)
        taken += [*answers.values(), *(w for p in fr["pairs"] for w in p)]
    _unique_frames(d, out["frames"])
    out.update(chatter=d.texts("chatter", min_n=0),
               instructions=d.texts("instructions", need=("first", "second")), cue=d.text("cue"),
               control=_control(d, taken), defaults=_defaults(d, ("n_filler",)))
    return out


def _unique_frames(d: _Doc, frames: list) -> None:
    keys = [fr["key"] for fr in frames]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        d.fail("frames", f"frame keys {dup} occur twice; a frame's key names its cluster and its instance ids")


def _common(d: _Doc, out: dict, taken) -> None:
    """The keys multihop and rag_lookup share: filler lines, the question header, the cue, the control line and the
    default counts."""
    _unique_frames(d, out["frames"])
    out.update(filler=d.texts("filler", min_n=0), question_header=d.text("question_header"), cue=d.text("cue"),
               control=_control(d, taken), defaults=_defaults(d, ("n_entries", "n_filler")))


def _defaults(d: _Doc, keys) -> dict:
    """The task's default counts (`defaults: {n_entries: [lo, hi], n_filler: [lo, hi]}`), each a count or a range."""
    s = d.sub("defaults")
    out = {}
    for key in keys:
        try:
            out[key] = _count(s.get(key), key, lo_min=2 if key == "n_entries" else 0)
        except ValueError as e:
            s.fail(key, str(e))
    s.done()
    return out


PARSERS = {"family_c": _parse_family_c, "multihop": _parse_multihop, "rag_lookup": _parse_rag,
           "natural": _parse_natural}


def load_task(name: str, data_dir=None) -> dict:
    """The checked content of `<data_dir>/<name>.yaml` (default scenarios/offtemplate/), name in family_c, multihop,
    rag_lookup, natural (paper_spec §1.4, §1.5). Raises DataError naming the file and the key for a missing file,
    invalid YAML, a missing or unknown key, or a value that breaks the schema (the shipped files document it)."""
    if name not in PARSERS:
        raise ValueError(f"no task file kind {name!r}; known: {sorted(PARSERS)}")
    path = Path(data_dir or DATA_DIR).expanduser() / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"{path}: no such task file (data_dir={str(data_dir)!r}; the shipped files are in {DATA_DIR})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    d = _Doc(doc, str(path))
    out = PARSERS[name](d)
    d.done()
    return {**out, "source": str(path)}


# ---------------------------------------------------------------- drawing
def _count(value, name: str, lo_min: int = 0) -> tuple:
    """A count param as an inclusive range: n -> (n, n); [lo, hi] as given. ValueError names the param."""
    rng = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else None
    if rng is None or len(rng) != 2 or not all(isinstance(x, int) for x in rng) or not lo_min <= rng[0] <= rng[1]:
        raise ValueError(f"{name} is a count or a range [lo, hi] of integers with {lo_min} <= lo <= hi, got {value!r}")
    return rng


def _oid(rng: random.Random, spec: dict) -> str:
    return rng.choice(spec["letters"]) + f"{rng.randrange(10 ** spec['digits']):0{spec['digits']}d}"


def _distinct_first(rng: random.Random, pool, n: int, where: str) -> list:
    """`n` words of `pool` whose first characters differ (case-insensitively), so that no two answers of an instance
    share a first token. DataError when the pool has fewer first characters than that."""
    by_first = {}
    for w in pool:
        by_first.setdefault(w[0].lower(), []).append(w)
    if len(by_first) < n:
        raise DataError(f"{where}: {n} answers with different first characters are needed, the pool has "
                        f"{len(by_first)} first characters ({sorted(by_first)}); add answers or lower n_entries")
    return [rng.choice(by_first[c]) for c in rng.sample(sorted(by_first), n)]


def _split(template: str, name: str, **fmt) -> tuple[str, str]:
    """The template's text before and after its {name} placeholder, each filled in with `fmt`."""
    before, _, after = template.partition("{" + name + "}")
    return before.format(**fmt), after.format(**fmt)


def _valued(t: Text, template: str, name: str, value: str, changing: bool, label: str, **fmt) -> Text:
    """Write `template` with {name} = value: the value as the changing `field` when `changing`, else plain."""
    before, after = _split(template, name, **fmt)
    t.add(before, label)
    if changing:
        t.add_value(value)
    else:
        t.add(value, label)
    return t.add(after, label)


def _instance(texts_old, texts_new, **kw) -> Instance:
    """An Instance from the two arms' (role, Text) lists; checks that they differ in the marked value only."""
    (mi, s, e), n_old = marks_of(texts_old)
    (mj, s2, e2), n_new = marks_of(texts_new)
    old, new = messages_of(texts_old), messages_of(texts_new)
    a, b = old[mi]["content"], new[mj]["content"]
    if not (mi == mj and a[:s] == b[:s2] and a[e:] == b[e2:] and a[s:e] == kw["old_value"]
            and b[s2:e2] == kw["new_value"] and all(x == y for i, (x, y) in enumerate(zip(old, new)) if i != mi)):
        raise AssertionError(f"{kw['id']}: the two prompts differ beyond the marked value")
    return Instance(old_messages=old, new_messages=new, spans=tuple(t.spans() for _, t in texts_old),
                    value_at=((mi, s, e), (mj, s2, e2)), note_at=((n_old, n_new) if n_old is not None else ()), **kw)


# ---------------------------------------------------------------- Family C: the cancel/deny gate
def gate_answer(field_value: str, trigger: str, answers: dict) -> str:
    """The rule of Family C (paper_spec §1.4): answers["allow"] (cancel) if the order_status equals the trigger, else
    answers["refuse"] (deny)."""
    return answers["allow"] if field_value == trigger else answers["refuse"]


def _surface_c(rng: random.Random, d: dict, k: int, n_notes: tuple, seed: int) -> dict:
    """Every surface draw of Family C instance k. The draws do not depend on `pair` or `order`, so the field and
    trigger pairs (and both orders) of one seed share their wording, oid and values."""
    values = d["values"]
    base = values[(k // 2) % len(values)]   # the held value cycles; the other is drawn
    combos = [f"{s} {p}" for s in d["notes"]["subjects"] for p in d["notes"]["predicates"]]
    n = rng.randint(*n_notes)
    if n > len(combos):
        raise ValueError(f"n_notes={n}: the note pools of {d['source']} make {len(combos)} distinct notes "
                         f"(subjects x predicates); add subjects or predicates, or ask for fewer")
    return {"oid": _oid(rng, d["order_id"]), "base": base, "other": rng.choice([x for x in values if x != base]),
            "role": rng.randrange(len(d["roles"])), "rule": rng.randrange(len(d["rules"])),
            "notes_header": rng.randrange(len(d["notes_headers"])),
            "note_prefix": rng.randrange(len(d["note_prefixes"])), "n_notes": n,
            "notes": rng.sample(range(len(combos)), n),
            "request": rng.randrange(len(d["requests"])), "answer_line": rng.randrange(len(d["answer_lines"])),
            "controls": rng.sample(d["control"]["values"], 2), "seed": seed}


def _render_c(d: dict, v: dict, field_value: str, trigger: str, channel: str, changing: str, order: str) -> list:
    """[(role, Text)] of one arm: one user message. changing: "field", "trigger" or "control" (which value is
    marked: the order_status value, the rule's trigger word, the channel). order: rule_first = role, rule, notes,
    order_status + channel lines, request; field_first = role, order_status + channel lines, rule, notes, request."""
    ans = d["answers"]
    fmt = {"oid": v["oid"], "field": d["field"], "allow": ans["allow"], "refuse": ans["refuse"]}
    role = Text().add(d["roles"][v["role"]] + "\n\n", "role")
    before, after = _split(d["rules"][v["rule"]], "trigger", **fmt)
    rule = Text().add(before, "gate")
    if changing == "trigger":
        rule.add_value(trigger, "trigger")
    else:
        rule.add(trigger, "gate")
    rule.add(after + "\n\n", "gate")
    combos = [f"{s} {p}" for s in d["notes"]["subjects"] for p in d["notes"]["predicates"]]
    prefix = d["note_prefixes"][v["note_prefix"]]
    notes = Text().add(d["notes_headers"][v["notes_header"]] + "\n", "filler_rules")
    for i, c in enumerate(v["notes"]):
        notes.add(prefix.format(i=i + 1) + " " + combos[c] + "\n", "filler_rules")
    notes.add("\n", "filler_rules")
    state = Text()
    lab = {"field": "field_line", "trigger": "fixed_field"}.get(changing, "record")
    state.add(f"{d['field']}: ", lab)
    if changing == "field":
        state.add_value(field_value)
    else:
        state.add(field_value, lab)
    state.add("\n", lab)
    ctl = d["control"]
    _valued(state, ctl["line"], "value", channel, changing == "control",
            "field_line" if changing == "control" else "record")
    state.add("\n\n", "field_line" if changing == "control" else "record")
    ask = Text().mark_note().add(d["requests"][v["request"]].format(**fmt) + "\n", "conversation")
    ask.add(d["answer_lines"][v["answer_line"]].format(**fmt), "task")
    blocks = [role, rule, notes, state, ask] if order == "rule_first" else [role, state, rule, notes, ask]
    body = Text()
    for b in blocks:
        body.extend(b)
    return [("user", body)]


def make_family_c(n_instances: int, seed: int, pair: str = "field", order: str = "rule_first",
                  n_notes: int | list = 24, controls: int | None = None, data_dir: str | None = None
                  ) -> list[Instance]:
    """Family C (paper_spec §1.4; the pairs of §3.15 D6): `n_instances` gated pairs plus `controls` (default
    n_instances) control pairs, from `<data_dir>/family_c.yaml` (default scenarios/offtemplate/).

    pair: "field" (primary: order_status changes, the trigger is held) or "trigger" (dissoc: the rule's trigger
    changes, the order_status line is held). Instance k holds the value values[(k // 2) % len(values)] and draws the
    other; even k go cancel -> deny (the old arm has field == trigger), odd k deny -> cancel. The cluster (scenario)
    is `cancel_<pair>_<held value>`. order: "rule_first" (the paper's) or "field_first". n_notes: the number of
    reference notes (a count, or a range [lo, hi] drawn per instance; the paper's is 24). Controls change only the
    `channel` line (below the order_status line in every instance); their field equals the trigger on even k.

    Returns the instances (gated first). Raises ValueError naming the accepted values for a bad pair, order or count,
    and DataError naming the file and key for a broken task file."""
    if pair not in PAIRS:
        raise ValueError(f"pair must be one of {PAIRS} (field: the order_status value changes; trigger: the rule's "
                         f"trigger changes), got {pair!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (rule_first: the paper's, the field after the notes; "
                         f"field_first: the order_status line before the rule), got {order!r}")
    if not isinstance(n_instances, int) or n_instances < 0:
        raise ValueError(f"n_instances must be an integer >= 0, got {n_instances!r}")
    if controls is not None and (not isinstance(controls, int) or controls < 0):
        raise ValueError(f"controls must be an integer >= 0 or null (= n_instances), got {controls!r}")
    notes = _count(n_notes, "n_notes")
    d = load_task("family_c", data_dir)
    ans = d["answers"]
    common = {"safe": ans["refuse"], "unsafe": ans["allow"], "candidates": (ans["allow"], ans["refuse"]),
              "suffix": d["suffix"]}
    out = []
    for k in range(n_instances):
        v = _surface_c(random.Random(f"family_c:{seed}:{k}"), d, k, notes, seed)
        old, new = (v["base"], v["other"]) if k % 2 == 0 else (v["other"], v["base"])
        held = v["base"]
        if pair == "field":
            arms = [(x, held) for x in (old, new)]           # (field, trigger)
        else:
            arms = [(held, x) for x in (old, new)]
        texts = [_render_c(d, v, f, t, v["controls"][0], pair, order) for f, t in arms]
        v.update(pair=pair, order=order, field_old=arms[0][0], field_new=arms[1][0], trigger_old=arms[0][1],
                 trigger_new=arms[1][1], direction="allow->refuse" if k % 2 == 0 else "refuse->allow")
        scenario = f"cancel_{pair}_{held}"
        out.append(_instance(*texts, id=f"{scenario}/{k:03d}", scenario=scenario, kind="gated",
                             field=d["field"] if pair == "field" else "trigger", old_value=old, new_value=new,
                             expected_old=gate_answer(*arms[0], ans), expected_new=gate_answer(*arms[1], ans),
                             variant=v, **common))
    ctl = d["control"]
    for k in range(n_instances if controls is None else controls):
        v = _surface_c(random.Random(f"family_c-control:{seed}:{k}"), d, k, notes, seed)
        trigger = v["base"] if k % 2 == 0 else v["other"]
        c_old, c_new = v["controls"]
        texts = [_render_c(d, v, v["base"], trigger, c, "control", order) for c in (c_old, c_new)]
        v.update(pair=pair, order=order, field_old=v["base"], field_new=v["base"], trigger_old=trigger,
                 trigger_new=trigger)
        answer = gate_answer(v["base"], trigger, ans)
        scenario = f"control_{ctl['field']}"
        out.append(_instance(*texts, id=f"{scenario}/{k:03d}", scenario=scenario, kind="control",
                             field=ctl["field"], old_value=c_old, new_value=c_new, expected_old=answer,
                             expected_new=answer, variant=v, **common))
    return out


# ---------------------------------------------------------------- Family D: the off-template tasks
def _filler(rng: random.Random, pool, n_filler: tuple, where: str) -> list:
    n = rng.randint(*n_filler)
    if n > len(pool):
        raise ValueError(f"n_filler={n}: {where} holds {len(pool)} filler lines; add lines or ask for fewer")
    return rng.sample(range(len(pool)), n)


def _ask(t: Text, blank: str, header: str, question: str, instruction: str, cue: str) -> Text:
    """A blank line (labelled `blank`, the block it closes), then the question block: the note site, the header and
    question (conversation), the answer instruction and the cue (task)."""
    t.add("\n", blank)
    t.mark_note().add(f"{header}\n{question}", "conversation")
    return t.add(f" {instruction}\n{cue}", "task")


def _surface_multihop(rng, d, fr, n_entries, n_filler, seed) -> dict:
    n = rng.randint(*n_entries)
    if n > len(d["locations"]):
        raise ValueError(f"n_entries={n}: {d['source']} has {len(d['locations'])} locations; add locations or ask "
                         f"for fewer")
    where = f"{d['source']}: frames `{fr['key']}` answers"
    return {"frame": fr["key"], "oid": _oid(rng, d["order_id"]), "n_entries": n,
            "locations": rng.sample(d["locations"], n), "answers": _distinct_first(rng, fr["answers"], n, where),
            "order": rng.sample(range(n), n), "owner": rng.randrange(len(fr["owners"])),
            "item": rng.randrange(len(fr["items"])), "header": rng.randrange(len(fr["headers"])),
            "stored": rng.randrange(len(fr["stored"])), "directory_header": rng.randrange(len(fr["directory_headers"])),
            "entry": rng.randrange(len(fr["entries"])), "question": rng.randrange(len(fr["questions"])),
            "instruction": rng.randrange(len(d["instructions"])),
            "filler": _filler(rng, d["filler"], n_filler, d["source"]),
            "controls": rng.sample(d["control"]["values"], 2), "seed": seed}


def _render_multihop(d, fr, v, location, control, changing) -> list:
    """SECURITY RECORD-like block (the stored sentence = the field's line, the control line), the directory, filler,
    the question."""
    owner = fr["owners"][v["owner"]].format(oid=v["oid"])
    fmt = {"owner": owner, "item": fr["items"][v["item"]]}
    t = Text().add(fr["headers"][v["header"]] + "\n", "record")
    lab = "field_line" if changing == "field" else "record"
    _valued(t, fr["stored"][v["stored"]], "location", location, changing == "field", lab, **fmt).add("\n", lab)
    lab = "field_line" if changing == "control" else "record"
    _valued(t, d["control"]["line"], "value", control, changing == "control", lab).add("\n", lab)
    t.add("\n" + fr["directory_headers"][v["directory_header"]] + "\n", "record")
    entry = fr["entries"][v["entry"]]
    for i in v["order"]:
        t.add(entry.format(location=v["locations"][i], answer=v["answers"][i]) + "\n", "record")
    for i in v["filler"]:
        t.add(d["filler"][i] + "\n", "filler_rules")
    _ask(t, "filler_rules" if v["filler"] else "record", d["question_header"],
         fr["questions"][v["question"]].format(**fmt), d["instructions"][v["instruction"]], d["cue"])
    return [("user", t)]


def _surface_rag(rng, d, fr, n_entries, n_filler, seed) -> dict:
    n = rng.randint(*n_entries)
    if n > len(d["names"]):
        raise ValueError(f"n_entries={n}: {d['source']} has {len(d['names'])} names; add names or ask for fewer")
    where = f"{d['source']}: frames `{fr['key']}` answers"
    return {"frame": fr["key"], "oid": _oid(rng, d["order_id"]), "n_entries": n, "names": rng.sample(d["names"], n),
            "others": [rng.randrange(len(fr["others"])) for _ in range(n)],
            "answers": _distinct_first(rng, fr["answers"], n, where), "order": rng.sample(range(n), n),
            "directory_header": rng.randrange(len(fr["directory_headers"])), "entry": rng.randrange(len(fr["entries"])),
            "duty": rng.randrange(len(fr["duty"])), "question": rng.randrange(len(fr["questions"])),
            "instruction": rng.randrange(len(fr["instructions"])),
            "filler": _filler(rng, d["filler"], n_filler, d["source"]),
            "controls": rng.sample(d["control"]["values"], 2), "seed": seed}


def _render_rag(d, fr, v, name, control, changing) -> list:
    """The directory, filler, the session block (the on-duty line = the field's line, the control line), the
    question."""
    t = Text().add(fr["directory_headers"][v["directory_header"]] + "\n", "record")
    entry = fr["entries"][v["entry"]]
    for i in v["order"]:
        t.add(entry.format(name=v["names"][i], other=fr["others"][v["others"][i]], answer=v["answers"][i]) + "\n",
              "record")
    for i in v["filler"]:
        t.add(d["filler"][i] + "\n", "filler_rules")
    t.add("\n" + fr["session_header"] + "\n", "record")
    lab = "field_line" if changing == "field" else "record"
    _valued(t, fr["duty"][v["duty"]], "name", name, changing == "field", lab, oid=v["oid"]).add("\n", lab)
    lab = "field_line" if changing == "control" else "record"
    _valued(t, d["control"]["line"], "value", control, changing == "control", lab).add("\n", lab)
    _ask(t, "record", d["question_header"], fr["questions"][v["question"]], fr["instructions"][v["instruction"]],
         d["cue"])
    return [("user", t)]


def _surface_natural(rng, d, fr, n_entries, n_filler, seed) -> dict:
    return {"frame": fr["key"], "oid": _oid(rng, d["order_id"]), "pair": list(rng.choice(fr["pairs"])),
            "opener": rng.randrange(len(d["openers"])), "topic": rng.randrange(len(fr["topics"])),
            "state": rng.randrange(len(fr["states"])), "rule": rng.randrange(len(fr["rules"])),
            "ask": rng.randrange(len(fr["asks"])), "instruction": rng.randrange(len(d["instructions"])),
            "allow_first": rng.random() < 0.5, "chatter": _filler(rng, d["chatter"], n_filler, d["source"]),
            "controls": rng.sample(d["control"]["values"], 2), "seed": seed}


def _render_natural(d, fr, v, state, control, changing) -> list:
    """One conversational paragraph: opener + topic, the control sentence, small talk, the state (the field's
    sentence), the rule in passing (gate), the ask, the answer instruction and cue."""
    ans = fr["answers"]
    t = Text().add(f"{d['openers'][v['opener']]} {fr['topics'][v['topic']].format(oid=v['oid'])} ", "conversation")
    lab = "field_line" if changing == "control" else "conversation"
    _valued(t, d["control"]["line"], "value", control, changing == "control", lab).add(" ", lab)
    for i in v["chatter"]:
        t.add(d["chatter"][i] + " ", "filler_rules")
    lab = "field_line" if changing == "field" else "record"
    _valued(t, fr["states"][v["state"]], "value", state, changing == "field", lab).add(" ", lab)
    allowed, refused = v["pair"]
    t.add(fr["rules"][v["rule"]].format(allowed=allowed, refused=refused, **ans) + " ", "gate")
    t.mark_note().add(fr["asks"][v["ask"]] + " ", "conversation")
    first, second = (ans["allow"], ans["refuse"]) if v["allow_first"] else (ans["refuse"], ans["allow"])
    t.add(d["instructions"][v["instruction"]].format(first=first, second=second) + "\n" + d["cue"], "task")
    return [("user", t)]


def _pick_multihop(v):   # (old value, new value, old answer, new answer) of a gated pair
    return v["locations"][0], v["locations"][1], v["answers"][0], v["answers"][1]


def _pick_rag(v):
    return v["names"][0], v["names"][1], v["answers"][0], v["answers"][1]


TASK_FNS = {"multihop": (_surface_multihop, _render_multihop, _pick_multihop),
            "rag_lookup": (_surface_rag, _render_rag, _pick_rag),
            "natural": (_surface_natural, _render_natural, None)}


def _natural_pick(fr, v, k, n_frames):
    """Natural pairs alternate allowed -> refused and refused -> allowed over each round of frames."""
    allowed, refused = v["pair"]
    ans = fr["answers"]
    if (k // n_frames) % 2 == 0:
        return allowed, refused, ans["allow"], ans["refuse"]
    return refused, allowed, ans["refuse"], ans["allow"]


def make_instances(n_instances: int, seed: int, task: str | list | None = None, n_entries: int | list | None = None,
                   n_filler: int | list | None = None, controls: int | None = None, data_dir: str | None = None
                   ) -> list[Instance]:
    """Family D (paper_spec §1.5; the pairs of §3.14 D5): per task, `n_instances` gated pairs plus `controls`
    (default n_instances) control pairs, from `<data_dir>/<task>.yaml` (default scenarios/offtemplate/).

    task: "multihop", "rag_lookup", "natural", a list of them, or None (all three). Instance k of a task takes frame
    k % len(frames) of its file (the cluster `<task>_<frame>`) and draws everything else from
    random.Random(f"offtemplate:{seed}:{task}:{k}"). n_entries: directory size (multihop: locations, rag_lookup:
    people; the two of the pair plus distractors), a count or a range [lo, hi], lo >= 2; natural has no directory
    (asking for n_entries with task natural alone is an error). n_filler: filler lines (multihop, rag_lookup) or
    small-talk sentences (natural), a count or a range. Either one None: the task file's `defaults`. Gated pairs
    change the field (the stored location / the on-duty person / the account state); controls change only the file's
    control line, and the answer stays. Answers: one word; direction_known=False, safe / unsafe = the new / old
    answer (m = logit(new) - logit(old)); candidates (old answer, new answer); no forced suffix. Controls: safe = the
    answer the pair's other value would give, unsafe = the answer that holds in both arms.

    Returns the instances (per task: gated, then controls). Raises ValueError naming the accepted values for a bad
    task or count, and DataError naming the file and key for a broken task file."""
    tasks = list(TASKS) if task is None else [task] if isinstance(task, str) else list(task)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"task must be one of {TASKS}, a list of them, or null (all three), got {task!r}")
    if not isinstance(n_instances, int) or n_instances < 0:
        raise ValueError(f"n_instances must be an integer >= 0, got {n_instances!r}")
    if controls is not None and (not isinstance(controls, int) or controls < 0):
        raise ValueError(f"controls must be an integer >= 0 or null (= n_instances), got {controls!r}")
    if n_entries is not None and tasks == ["natural"]:
        raise ValueError("n_entries: task natural has no directory; leave n_entries null")
    given_entries = None if n_entries is None else _count(n_entries, "n_entries", lo_min=2)
    given_filler = None if n_filler is None else _count(n_filler, "n_filler")
    out = []
    for name in tasks:
        d = load_task(name, data_dir)
        entries = given_entries or d["defaults"].get("n_entries")
        filler = given_filler or d["defaults"]["n_filler"]
        surface, render, pick = TASK_FNS[name]
        frames, ctl = d["frames"], d["control"]
        for k in range(n_instances):
            fr = frames[k % len(frames)]
            v = surface(random.Random(f"offtemplate:{seed}:{name}:{k}"), d, fr, entries, filler, seed)
            old, new, a_old, a_new = pick(v) if pick else _natural_pick(fr, v, k, len(frames))
            texts = [render(d, fr, v, x, v["controls"][0], "field") for x in (old, new)]
            v["task"] = name
            scenario = f"{name}_{fr['key']}"
            out.append(_instance(*texts, id=f"{scenario}/{k:03d}", scenario=scenario, kind="gated", field=fr["field"],
                                 old_value=old, new_value=new, safe=a_new, unsafe=a_old, expected_old=a_old,
                                 expected_new=a_new, candidates=(a_old, a_new), suffix="", direction_known=False,
                                 variant=v))
        for k in range(n_instances if controls is None else controls):
            fr = frames[k % len(frames)]
            v = surface(random.Random(f"offtemplate-control:{seed}:{name}:{k}"), d, fr, entries, filler, seed)
            held, _, answer, other = pick(v) if pick else _natural_pick(fr, v, k, len(frames))
            c_old, c_new = v["controls"]
            texts = [render(d, fr, v, held, c, "control") for c in (c_old, c_new)]
            v.update(task=name, held=held)
            scenario = f"{name}_control_{ctl['field']}"
            out.append(_instance(*texts, id=f"{scenario}/{k:03d}", scenario=scenario, kind="control",
                                 field=ctl["field"], old_value=c_old, new_value=c_new, safe=other, unsafe=answer,
                                 expected_old=answer, expected_new=answer, candidates=(answer, other), suffix="",
                                 direction_known=False, variant=v))
    return out
