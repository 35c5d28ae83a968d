"""One-word gated decisions across many domains (data: scenarios/domains/*.yaml, pools: scenarios/pools.yaml).

Each domain is a rule that allows one action only for one value of a categorical field; the model answers with one
word (the action or the domain's refusal word). Prompt structure is a set of named factors:

* `layout` — where the rule (R) and the record with the field (F) go, see LAYOUTS: `rule_first` (R->F, the policy
  in the system message and record + request in the user message; the default and the steps 1-3 prompts) and
  `rule_first_user`, against five F->R renderings (`field_first_system`, `field_first_user`,
  `record_system_rule_user`, `record_assistant_turn`, `family_a_blocks`). The old `placement` option is an alias:
  after_rule = rule_first, before_rule = field_first_system.
* `question` — the request "last" (after the record, default) or "first" (right before the record; the answer line
  stays last).
* `n_gates` — 1, or K gates on K different fields of K domains in one policy and one record (the request names which
  applies), so that the field cannot know which rule will be asked.
* `n_filler` — unique record lines (or notes) after the field, `filler_style` record | note.
* `n_filler_rules` — neutral policy rules around the gate(s); `polarity` — the rule's two values swapped or not.

Surface variation is seeded per instance (names, ids, request paraphrase, which filler lines, rule order, flip
direction). With the default factors, the original ten domains render byte-identically to the steps 1-3 generator
for the same seed (tests/test_scenarios.py holds the fingerprints), so committed records stay valid.
"""
from __future__ import annotations

import itertools
import random
import re
from functools import lru_cache
from pathlib import Path

import yaml

from scenarios.base import Instance, Text, marks_of, messages_of
from scenarios.domains import Domain, load_domains

POOLS_PATH = Path(__file__).resolve().parent / "pools.yaml"
POLARITIES = ("normal", "inverted", "mixed")
QUESTIONS = ("last", "first")
FILLER_STYLES = ("record", "note")
# layout -> rule order; the rendering is `_assemble` below (a new layout needs Python; a new domain does not)
LAYOUTS = {
    "rule_first": "R->F",              # system: role + policy | user: record + request
    "rule_first_user": "R->F",         # system: role | user: policy + record + request
    "field_first_system": "F->R",      # system: role + record + policy | user: request
    "field_first_user": "F->R",        # system: role | user: record + policy + request
    "record_system_rule_user": "F->R",  # system: role + record | user: policy + request
    "record_assistant_turn": "F->R",   # system: role | user: look-up | assistant: record | user: policy + request
    "family_a_blocks": "F->R",         # one user message: role, record, policy, request (Family A's block order)
}
PLACEMENTS = {"after_rule": "rule_first", "before_rule": "field_first_system"}   # the steps 1-3 option


@lru_cache(maxsize=1)
def pools() -> dict:
    return yaml.safe_load(POOLS_PATH.read_text())


def domains(domain_dirs=None) -> dict:
    """{key: Domain} of the given directories (default: scenarios/domains/)."""
    return domain_table(domain_dirs)


def domain_table(domain_dirs=None) -> dict:
    """`domains()` under a name that make_instances' `domains` argument does not shadow (loaded once per dirs)."""
    return _domains(tuple(str(d) for d in domain_dirs) if domain_dirs else None)


@lru_cache(maxsize=8)
def _domains(dirs):
    return load_domains(list(dirs) if dirs else None)


def polarity_of(polarity: str, k: int) -> str:
    """The rule polarity of gated instance k: "mixed" inverts when (k // 2) % 2 == 1, so that with the flip direction
    alternating on k % 2, every (value, polarity) cell occurs in each domain once n_instances >= 3."""
    if polarity == "mixed":
        return "inverted" if (k // 2) % 2 == 1 else "normal"
    return polarity


# ---------------------------------------------------------------- filler
_SLOT = re.compile(r"\{(int|pick):([^}]*)\}")


def _fill(template: str, rng: random.Random) -> str:
    """Draw a pool template's placeholders in order: {int:LO:HI[:W]} and {pick:a|b|c}."""
    def draw(m):
        kind, arg = m.groups()
        if kind == "pick":
            return rng.choice(arg.split("|"))
        lo, hi, *w = arg.split(":")
        v = rng.randint(int(lo), int(hi))
        return f"{v:0{int(w[0])}d}" if w else str(v)
    return _SLOT.sub(draw, template)


def filler_lines(rng: random.Random, style: str, k: int) -> list[str]:
    """`k` unique filler lines ("key: value" record lines or "Note: ..." lines) that carry nothing a rule uses.

    The pool's `base` entries are all drawn and shuffled first (the steps 1-3 draws, so prompts with k <= len(base)
    are unchanged); more lines come from `extra` (record) or from subject x predicate compositions (note).
    Raises ValueError when more lines are asked for than the pools hold, naming the limit."""
    if style not in FILLER_STYLES:
        raise ValueError(f"filler_style must be one of {FILLER_STYLES}, got {style!r}")
    if style == "note":
        p = pools()["note_filler"]
        base = list(p["base"])
        rng.shuffle(base)
        out = base[:k]
        if k > len(base):
            combos = [f"Note: {s} {v}." for s, v in itertools.product(p["subjects"], p["predicates"])]
            if k - len(base) > len(combos):
                raise ValueError(f"{k} note lines asked for; the note pools hold {len(base) + len(combos)}")
            out += rng.sample(combos, k - len(base))
    else:
        p = pools()["record_filler"]
        base = [_fill(t, rng) for t in p["base"]]
        rng.shuffle(base)
        out = base[:k]
        if k > len(base):
            if k - len(base) > len(p["extra"]):
                raise ValueError(f"{k} record filler lines asked for; the pools hold {len(base) + len(p['extra'])} "
                                 f"(add entries to record_filler.extra in {POOLS_PATH})")
            extra = [_fill(t, rng) for t in p["extra"]]
            rng.shuffle(extra)
            out += extra[:k - len(base)]
    if len(out) != k or len(set(out)) != k:
        raise AssertionError(f"filler: asked for {k} unique lines, made {len(set(out))}")
    return out


# ---------------------------------------------------------------- record formats
def _pair(line: str) -> tuple[str, str]:
    key, _, value = line.partition(": ")
    return key, value


class Item:
    """One entry of a record: `key` (None for a prose sentence or a note), its `value`, the region `label` of its
    line (record | field_line | other_field), whether the value is the one that changes between the arms, and for
    prose the sentence around the value."""

    def __init__(self, key, value, label="record", changing=False, around=("", "")):
        self.key, self.value, self.label, self.changing, self.around = key, value, label, changing, around


def record_text(d: Domain, items: list) -> Text:
    """The record block in the domain's format (key_value | json | table | prose), ending with a newline.

    Labels: the header and the other lines `record`; the line of the changing value `field_line` (the value itself
    `field`); other gates' fields `other_field`. In a table row or a prose paragraph the text after the changing
    value through the newline is `field_line`, as in the other formats a field's line runs to its newline."""
    t = Text()
    t.add(d.header + "\n", "record")

    def val(it, default_label):
        if it.changing:
            t.add_value(it.value, "field")
        else:
            t.add(it.value, default_label)

    if d.format == "key_value":
        for it in items:
            lab = "field_line" if it.changing else it.label
            t.add(f"{it.key}: " if it.key is not None else "", lab)
            val(it, lab)
            t.add("\n", lab)
    elif d.format == "json":
        t.add("{\n", "record")
        for i, it in enumerate(items):
            lab = "field_line" if it.changing else it.label
            end = ",\n" if i < len(items) - 1 else "\n"
            t.add(f'  "{it.key}": "', lab)
            val(it, lab)
            t.add('"' + end, lab)
        t.add("}\n", "record")
    elif d.format == "table":
        t.add("| " + " | ".join(it.key for it in items) + " |\n", "record")
        t.add("|" + "---|" * len(items) + "\n", "record")
        t.add("|", "record")
        after = False   # past the changing value: the rest of the row is its line
        for it in items:
            lab = "field_line" if (after or it.changing) else it.label
            t.add(" ", lab)
            val(it, lab)
            t.add(" |", lab)
            after = after or it.changing
        t.add("\n", "field_line" if after else "record")
    elif d.format == "prose":
        para = [it for it in items if it.key is None and it.label == "record" and not it.around == ("", "\n")]
        rest = [it for it in items if it not in para]
        after = False
        for i, it in enumerate(para):
            sep = " " if i < len(para) - 1 else "\n"
            lab = "field_line" if after else "record"
            t.add(it.around[0], lab)
            val(it, lab)
            after = after or it.changing
            t.add(it.around[1] + sep, "field_line" if after else "record")
        for it in rest:
            lab = "field_line" if it.changing else it.label
            t.add(it.around[0], lab)
            val(it, lab)
            t.add(it.around[1], lab)
    else:
        raise ValueError(f"unknown record format {d.format!r}")
    return t


def _record_items(d: Domain, v: dict, channel: str, changing_channel: bool, fields: list, filler: list) -> list:
    """Items of one arm's record: the domain's other lines, the field(s) ([(field, value, label, changing, domain)]),
    the filler lines."""
    fmt = {"name": v["name"], "oid": v["oid"]}
    items = []
    for tmpl in d.lines:
        if d.format == "prose":
            before, sep, after = tmpl.partition("{channel}")
            if sep:
                items.append(Item(None, channel, "record", changing_channel,
                                  (before.format(**fmt), after.format(**fmt))))
            else:
                items.append(Item(None, tmpl.format(**fmt), "record"))
        else:
            key, value = _pair(tmpl)
            if "{channel}" in value:
                if value != "{channel}":
                    raise ValueError(f"domain {d.key!r} ({d.source}): the control field's line must be "
                                     f"'key: {{channel}}', got {tmpl!r}")
                items.append(Item(key, channel, "record", changing_channel))
            else:
                items.append(Item(key, value.format(**fmt)))
    for f, value, label, changing, owner in fields:
        if d.format == "prose":
            text = owner.field_text if owner.format == "prose" else "The {field} is {value}."
            before, _, after = text.replace("{field}", f.replace("_", " ") if owner is not d else f) \
                .partition("{value}")
            items.append(Item(f, value, label, changing, (before, after + "\n")))
        else:
            items.append(Item(f, value, label, changing))
    for i, line in enumerate(filler):
        if line.startswith("Note: "):
            if d.format in ("key_value", "prose"):
                items.append(Item(None, line, "record", False, ("", "\n") if d.format == "prose" else ("", "")))
            else:
                items.append(Item(f"note_{i + 1}", line[len("Note: "):]))
        elif d.format == "prose":
            key, value = _pair(line)
            items.append(Item(None, f"The {key.replace('_', ' ')} is {value}.", "record", False, ("", "\n")))
        else:
            items.append(Item(*_pair(line)))
    return items


# ---------------------------------------------------------------- layouts
def _policy(rules: list) -> Text:
    """"Policy:" and one "- rule" line per (text, label), no trailing newline."""
    t = Text().add("Policy:\n", "filler_rules")
    for i, (text, label) in enumerate(rules):
        t.add(f"- {text}" + ("\n" if i < len(rules) - 1 else ""), label)
    return t


def _assemble(layout: str, question: str, role: Text, policy: Text, record: Text, request: str, answer: str,
              lookup: str) -> list:
    """[(role, Text)] of one arm: the layout's blocks in order; the update-note site is marked at the ask."""
    def ask(prefix: Text | None = None) -> Text:
        t = prefix or Text()
        t.mark_note()
        if question == "last":
            t.add(request + "\n", "conversation")
        return t.add(answer, "task")

    def rec() -> Text:   # the record, preceded by the request when the question comes first
        if question == "first" and layout != "record_assistant_turn":
            return Text().add(request + "\n\n", "conversation").extend(record)
        return record

    if layout == "rule_first":
        return [("system", role.add("\n", "role").extend(policy)), ("user", ask(rec().add("\n", "record")))]
    if layout == "rule_first_user":
        return [("system", role), ("user", ask(policy.add("\n\n", "filler_rules").extend(rec()).add("\n", "record")))]
    if layout == "field_first_system":
        return [("system", role.add("\n", "role").extend(rec()).add("\n", "record").extend(policy)),
                ("user", ask())]
    if layout == "field_first_user":
        return [("system", role), ("user", ask(rec().add("\n", "record").extend(policy).add("\n\n", "filler_rules")))]
    if layout == "record_system_rule_user":
        return [("system", role.add("\n", "role").extend(rec()).strip_newline()),
                ("user", ask(policy.add("\n\n", "filler_rules")))]
    if layout == "record_assistant_turn":
        first = Text().add(request if question == "first" else lookup, "conversation")
        return [("system", role), ("user", first), ("assistant", record.strip_newline()),
                ("user", ask(policy.add("\n\n", "filler_rules")))]
    if layout == "family_a_blocks":
        body = role.add("\n\n", "role").extend(rec()).add("\n", "record").extend(policy).add("\n\n", "filler_rules")
        return [("user", ask(body))]
    raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")


def render(d: Domain, value: str, channel: str, v: dict, changing: str, others: tuple = ()) -> list:
    """[(role, Text)] of one arm. `changing`: "field" (gated pairs) or "channel" (control pairs); `others`: the
    other gates as (Domain, value) when n_gates > 1."""
    gate = (d.rule_text(v.get("polarity", "normal")), "gate")
    neutral = pools()["neutral_rules"]
    rules = [gate] + [(neutral[i], "filler_rules") for i in v["filler_rules"]] + \
            [(o.rule_text("normal"), "other_gate") for o, _ in others]
    policy = _policy([rules[i] for i in v["rule_order"]])
    fields = [(d.field, value, "field_line" if changing == "field" else "record", changing == "field", d)]
    fields += [(o.field, ov, "other_field", False, o) for o, ov in others]
    fields = [fields[i] for i in v.get("field_order", range(len(fields)))]
    items = _record_items(d, v, channel, changing == "channel", fields, v["filler"])
    record = record_text(d, items)
    request = d.requests[v["request_variant"]].format(name=v["name"], oid=v["oid"])
    answer = f"Answer with one word, {d.allow} or {d.refuse}."
    lookup = f"Please pull up the record for reference {v['oid']}."
    return _assemble(v["layout"], v["question"], Text().add(f"You are {d.agent}.", "role"), policy, record,
                     request, answer, lookup)


def _instance(texts_old, texts_new, **kw) -> Instance:
    v_old, n_old = marks_of(texts_old)
    v_new, n_new = marks_of(texts_new)
    return Instance(old_messages=messages_of(texts_old), new_messages=messages_of(texts_new),
                    spans=tuple(t.spans() for _, t in texts_old), value_at=(v_old, v_new),
                    note_at=(n_old, n_new) if n_old is not None else (), **kw)


# ---------------------------------------------------------------- the family
def make_instances(n_instances: int, seed: int, domains: list | None = None, layout: str | None = None,
                   placement: str | None = None, question: str = "last", n_gates: int = 1,
                   n_filler: tuple | int = (0, 6), filler_style: str = "record", n_filler_rules: tuple | int = (0, 2),
                   controls: int | None = None, polarity: str = "normal", domain_dirs: list | None = None
                   ) -> list[Instance]:
    """`n_instances` gated pairs per domain (flip direction alternates), plus `controls` (default n_instances)
    control pairs in which only the unused `channel` field changes (domains taken in turn).

    domains: keys to use, in this order (None: every domain in `domain_dirs`, pools.yaml's `domain_order` first, the
    rest sorted); domain_dirs: directories of
    domain YAML files (None: scenarios/domains/). layout / placement: see LAYOUTS / PLACEMENTS (default
    rule_first). question: "last" | "first". n_gates: 1, or K >= 2 gates on K different fields. polarity: "normal",
    "inverted" (the rule's values swapped) or "mixed" (see `polarity_of`); unless "normal", each instance's
    `variant["polarity"]` records its polarity (controls keep the normal rule).

    Raises ValueError naming the option and the accepted values for anything unknown, and DomainError for a broken
    domain file."""
    if n_instances < 0:
        raise ValueError("n_instances must be >= 0")
    # an exact count (a sweep's D) is the range [n, n]: the same draws as writing [n, n]
    n_filler = (n_filler, n_filler) if isinstance(n_filler, int) else tuple(n_filler)
    n_filler_rules = (n_filler_rules, n_filler_rules) if isinstance(n_filler_rules, int) else tuple(n_filler_rules)
    if not (len(n_filler) == 2 and 0 <= int(n_filler[0]) <= int(n_filler[1])):
        raise ValueError(f"n_filler is a count or a range [lo, hi] with 0 <= lo <= hi, got {n_filler!r}")
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    if placement is not None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be 'after_rule' or 'before_rule', got {placement!r}")
        if layout is not None and layout != PLACEMENTS[placement]:
            raise ValueError(f"placement={placement!r} means layout={PLACEMENTS[placement]!r}; got layout={layout!r}"
                             f" as well: give one of the two")
        layout = PLACEMENTS[placement]
    layout = layout or "rule_first"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if filler_style not in FILLER_STYLES:
        raise ValueError(f"filler_style must be one of {FILLER_STYLES}, got {filler_style!r}")
    if int(n_gates) < 1:
        raise ValueError(f"n_gates must be >= 1, got {n_gates}")
    table = domain_table(domain_dirs)
    first = [k for k in pools().get("domain_order", []) if k in table]
    keys = list(domains) if domains else first + [k for k in table if k not in first]
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {sorted(table)} (add scenarios/domains/<key>.yaml)")
    if not keys:
        raise ValueError("no domains to generate from")
    p = pools()
    names, letters, neutral = p["names"], p["id_letters"], p["neutral_rules"]
    ctl = p["control_field"]
    order = LAYOUTS[layout]

    def surface(rng: random.Random, d: Domain) -> dict:
        k_fill = rng.randint(int(n_filler[0]), int(n_filler[1]))
        k_rules = rng.randint(int(n_filler_rules[0]), int(n_filler_rules[1]))
        filler_rules = rng.sample(range(len(neutral)), k_rules)
        v = {"domain": d.key, "name": rng.choice(names), "oid": f"{rng.choice(letters)}{rng.randint(1000, 99999)}",
             "request_variant": rng.randrange(len(d.requests)),
             "placement": "after_rule" if order == "R->F" else "before_rule", "filler_style": filler_style,
             "n_filler": k_fill}
        v["filler"] = filler_lines(rng, filler_style, k_fill)
        v.update({"n_filler_rules": k_rules, "filler_rules": filler_rules,
                  "rule_order": rng.sample(range(k_rules + 1), k_rules + 1), "seed": seed,
                  "layout": layout, "order": order, "question": question, "format": d.format})
        return v

    def gates(d: Domain, v: dict, key: str) -> tuple:
        """K - 1 other gates (their own PRNG, so the K = 1 draws stay the steps 1-3 ones)."""
        if int(n_gates) == 1:
            return ()
        rng = random.Random(f"diverse-gates:{key}")
        taken = {d.field, ctl["name"], *(_pair(x)[0] for x in d.lines)}
        pool = [o for o in table.values() if o.key != d.key and o.field not in taken]
        chosen = []
        for o in rng.sample(pool, len(pool)):
            if o.field not in taken:
                chosen.append(o)
                taken.add(o.field)
            if len(chosen) == int(n_gates) - 1:
                break
        if len(chosen) < int(n_gates) - 1:
            raise ValueError(f"n_gates={n_gates}: only {len(chosen) + 1} domains with distinct fields are available")
        others = tuple((o, rng.choice([o.allowed, o.disallowed])) for o in chosen)
        n_rules = v["n_filler_rules"] + int(n_gates)
        v.update({"n_gates": int(n_gates), "other_gates": [o.key for o in chosen],
                  "other_values": [ov for _, ov in others],
                  "rule_order": rng.sample(range(n_rules), n_rules),
                  "field_order": rng.sample(range(int(n_gates)), int(n_gates))})
        return others

    out = []
    for key in keys:
        d = table[key]
        for k in range(n_instances):
            rng = random.Random(f"diverse:{seed}:{key}:{k}")
            v = surface(rng, d)
            others = gates(d, v, f"{seed}:{key}:{k}")
            old, new = (d.allowed, d.disallowed) if k % 2 == 0 else (d.disallowed, d.allowed)
            v["direction"] = "allowed->disallowed" if k % 2 == 0 else "disallowed->allowed"
            pol = polarity_of(polarity, k)
            if polarity != "normal":
                v["polarity"] = pol
            implied = {d.allowed: d.allow, d.disallowed: d.refuse} if pol == "normal" else \
                {d.allowed: d.refuse, d.disallowed: d.allow}
            out.append(_instance(
                render(d, old, ctl["old"], v, "field", others), render(d, new, ctl["old"], v, "field", others),
                id=f"{key}/{k:03d}", scenario=key, kind="gated", field=d.field, old_value=old, new_value=new,
                safe=d.refuse, unsafe=d.allow, expected_old=implied[old], expected_new=implied[new],
                candidates=(d.allow, d.refuse), suffix="", variant=v))
    n_controls = n_instances if controls is None else controls
    for k in range(n_controls):
        rng = random.Random(f"diverse-control:{seed}:{k}")
        d = table[keys[k % len(keys)]]
        v = surface(rng, d)
        value = rng.choice([d.allowed, d.disallowed])
        others = gates(d, v, f"control:{seed}:{k}")
        v["gating_value"] = value
        if polarity != "normal":
            v["polarity"] = "normal"
        implied = d.allow if value == d.allowed else d.refuse
        out.append(_instance(
            render(d, value, ctl["old"], v, "channel", others), render(d, value, ctl["new"], v, "channel", others),
            id=f"control_{ctl['name']}/{k:03d}", scenario=f"control_{ctl['name']}", kind="control",
            field=ctl["name"], old_value=ctl["old"], new_value=ctl["new"], safe=d.refuse, unsafe=d.allow,
            expected_old=implied, expected_new=implied, candidates=(d.allow, d.refuse), suffix="", variant=v))
    return out


def rule_text(domain: str, polarity: str = "normal") -> str:
    """The gate rule of `domain` (a key of scenarios/domains/) in the given polarity (see Domain.rule_text)."""
    return domains()[domain].rule_text(polarity)
