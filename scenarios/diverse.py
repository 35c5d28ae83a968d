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
* `changes` — what differs between the arms of a gated pair: "field" (the field's value; everything above) or
  "trigger" (paper_spec §1.3 Family B, the polarity 2x2): the field value is held byte-identical and the one word of
  the rule that names a value (the trigger) changes, so the conclusion is f(field, trigger) (`conclusion`). Only
  domains whose rule names exactly one of its two values, once, can do that (`trigger_domains`).
* `same_conclusion` — same-conclusion controls (kind "control"): a value change the rule's "anything else" clause
  maps to the same action (a domain's `other_values`, scenarios/domains.py), a second negative control.

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
from scenarios.domains import Domain, load_domains, word_count

POOLS_PATH = Path(__file__).resolve().parent / "pools.yaml"
POLARITIES = ("normal", "inverted", "mixed")
QUESTIONS = ("last", "first")
FILLER_STYLES = ("record", "note")
CHANGES = ("field", "trigger")      # what differs between the arms of a gated pair
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


def default_keys(table: dict) -> list:
    """The domains of `table` in the default order: pools.yaml's `domain_order` first, the rest sorted."""
    first = [k for k in pools().get("domain_order", []) if k in table]
    return first + [k for k in table if k not in first]


# ---------------------------------------------------------------- Family B: the rule's trigger word
def trigger_problem(d: Domain) -> str | None:
    """Why domain `d` cannot make a trigger pair (changes="trigger"), or None if it can: its rule must name exactly
    one of its two values, exactly once (whole words), since the pair changes that one word and nothing else."""
    named = {v: n for v, n in d.rule_mentions().items() if v in (d.allowed, d.disallowed) and n}
    if len(named) == 1 and sum(named.values()) == 1:
        return None
    said = " and ".join(f"{v!r} {n}x" for v, n in named.items()) or f"neither {d.allowed!r} nor {d.disallowed!r}"
    return (f"domain {d.key!r} cannot make a trigger pair: its rule names {said}, and a trigger pair changes exactly "
            f"one word of the rule, so the rule must name exactly one of its two values, once. Fix: pass "
            f"domains=[...] with eligible ones (scenarios.diverse.trigger_domains()), or give {d.source} a rule that "
            f"names one value once")


def named_value(d: Domain) -> str:
    """The value the normal rule of `d` names (its trigger). Raises ValueError (see `trigger_problem`) for a rule
    that names both values, neither, or one more than once."""
    problem = trigger_problem(d)
    if problem:
        raise ValueError(problem)
    return d.allowed if word_count(d.rule, d.allowed) else d.disallowed


def conclusion(d: Domain, field_value: str, trigger: str) -> str:
    """The action word the rule of `d`, with `trigger` in place of the value it names, implies for a record whose
    field holds `field_value` (paper_spec §1.3: conclusion = f(field, trigger); "SAFE iff field == trigger" there).

    The normal rule names one value, `named`, and gives it `act_named` (d.allow if named is the allowed value, else
    d.refuse); every other value gets the other action (the "anything else" / "otherwise" clause). Hence: act_named if
    field_value == trigger, else the other action. With trigger == named this is the normal rule (allowed -> allow,
    disallowed -> refuse, an other value -> the action of the value the rule does not name).
    Raises ValueError for a domain that cannot make a trigger pair (`trigger_problem`)."""
    named = named_value(d)
    act_named = d.allow if named == d.allowed else d.refuse
    other = d.refuse if act_named == d.allow else d.allow
    return act_named if field_value == trigger else other


def trigger_domains(domain_dirs=None) -> list[str]:
    """The keys of the domains in `domain_dirs` (None: scenarios/domains/) that can make trigger pairs (their rule
    names exactly one of its two values, once: `trigger_problem`), in the default order (pools.yaml's domain_order
    first, the rest sorted). What make_instances(changes="trigger", domains=None) uses (paper_spec §1.3).
    Raises DomainError for a broken domain file."""
    table = domain_table(domain_dirs)
    return [k for k in default_keys(table) if trigger_problem(table[k]) is None]


def trigger_rule(d: Domain, trigger: str) -> Text:
    """The gate rule of `d` with `trigger` written in place of the value it names, as a Text whose changing value
    is that word (label `trigger`, the rest `gate`). trigger == the named value gives the normal rule's text, the
    other value the rule with that one word swapped (= Domain.rule_text("inverted") unless the file gives its own
    `rule_inverted`, which a trigger pair does not use: it changes one word). Raises ValueError as `named_value`."""
    m = re.search(rf"\b{re.escape(named_value(d))}\b", d.rule)
    return Text().add(d.rule[:m.start()], "gate").add_value(trigger, "trigger").add(d.rule[m.end():], "gate")


def trigger_cell(d: Domain, k: int) -> tuple[str, str, str]:
    """(field value, old trigger, new trigger) of trigger pair k of `d`. k % 2 sets the flip direction as in the
    field mode (even: the old arm implies the allow action, the new arm the refuse one), (k // 2) % 2 the field value
    (allowed, then disallowed), so k = 0..3 take each (field, trigger) cell of the 2x2 as the old arm once."""
    f = d.allowed if (k // 2) % 2 == 0 else d.disallowed
    other = d.disallowed if f == d.allowed else d.allowed
    act_old = d.allow if k % 2 == 0 else d.refuse
    t_old = f if conclusion(d, f, f) == act_old else other
    return f, t_old, (other if t_old == f else f)


def same_conclusion_cell(d: Domain, k: int, changes: str) -> tuple[str, str, str]:
    """(fixed value, old, new) of same-conclusion control k of `d` (needs `d.other_values`):
    changes="field": the rule as it stands, the field from the value the rule does not name to an other value
    (other_values[k % n]); the fixed value is the rule's trigger (the named value).
    changes="trigger": the field fixed at allowed (k even) or disallowed (k odd), the rule's trigger from the main
    value that is not the field value to an other value (other_values[(k // 2) % n]).
    Either way both arms imply the same action (`conclusion`). Raises ValueError for a domain without other values
    or one that cannot make a trigger pair."""
    if not d.other_values:
        raise ValueError(f"domain {d.key!r} has no other_values; same-conclusion controls need them ({d.source})")
    named = named_value(d)
    if changes == "field":
        unnamed = d.disallowed if named == d.allowed else d.allowed
        return named, unnamed, d.other_values[k % len(d.other_values)]
    f = d.allowed if k % 2 == 0 else d.disallowed
    return f, (d.disallowed if f == d.allowed else d.allowed), d.other_values[(k // 2) % len(d.other_values)]


def trigger_after_field(texts: list) -> bool:
    """Whether, in one arm's [(role, Text)], the changing word (the rule's trigger) starts after the end of the
    fixed field's line (label `fixed_field`) in reading order (message, character): read off the written text, not
    the layout's name. Raises ValueError for an arm without a `fixed_field` line (only trigger pairs have one)."""
    at = [(m, e) for m, (_, t) in enumerate(texts) for _, e, label in t.spans() if label == "fixed_field"]
    if not at:
        raise ValueError("no fixed_field line in this arm; only a trigger pair (changing='trigger') has one")
    (mi, vs, _), _ = marks_of(texts)
    return (mi, vs) >= max(at)


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
    line (record | field_line | other_field | fixed_field), whether the value is the one that changes between the
    arms, and for prose the sentence around the value."""

    def __init__(self, key, value, label="record", changing=False, around=("", "")):
        self.key, self.value, self.label, self.changing, self.around = key, value, label, changing, around


def record_text(d: Domain, items: list) -> Text:
    """The record block in the domain's format (key_value | json | table | prose), ending with a newline.

    Labels: the header and the other lines `record`; the line of the changing value `field_line` (the value itself
    `field`); other gates' fields `other_field`; in a trigger pair the gated field's line, value included,
    `fixed_field` (the value is held fixed there; the changing word is the rule's `trigger`). In a table row or a
    prose paragraph the text after the changing value through the newline is `field_line`, as in the other formats a
    field's line runs to its newline."""
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
    """"Policy:" and one "- rule" line per (text, label), no trailing newline. A rule's text may be a Text (a gate
    whose trigger word is the changing value, `trigger_rule`): its pieces keep their labels and its value mark."""
    t = Text().add("Policy:\n", "filler_rules")
    for i, (text, label) in enumerate(rules):
        end = "\n" if i < len(rules) - 1 else ""
        if isinstance(text, Text):
            t.add("- ", label).extend(text).add(end, label)
        else:
            t.add(f"- {text}" + end, label)
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


def render(d: Domain, value: str, channel: str, v: dict, changing: str, others: tuple = (),
           trigger: str | None = None) -> list:
    """[(role, Text)] of one arm. `changing`: "field" (gated pairs), "channel" (control pairs) or "trigger" (the
    rule names `trigger` in place of the value it names, and that word is the changing value; the field keeps
    `value`, labelled `fixed_field`); `others`: the other gates as (Domain, value) when n_gates > 1."""
    if (changing == "trigger") != (trigger is not None):
        raise ValueError("render: a trigger is given exactly when changing='trigger'")
    gate = (trigger_rule(d, trigger) if trigger is not None else d.rule_text(v.get("polarity", "normal")), "gate")
    neutral = pools()["neutral_rules"]
    rules = [gate] + [(neutral[i], "filler_rules") for i in v["filler_rules"]] + \
            [(o.rule_text("normal"), "other_gate") for o, _ in others]
    policy = _policy([rules[i] for i in v["rule_order"]])
    label = {"field": "field_line", "trigger": "fixed_field"}.get(changing, "record")
    fields = [(d.field, value, label, changing == "field", d)]
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
                   controls: int | None = None, polarity: str = "normal", domain_dirs: list | None = None,
                   changes: str = "field", same_conclusion: int = 0) -> list[Instance]:
    """The family's instances: `n_instances` gated pairs per domain (flip direction alternates), then `controls`
    (default n_instances) control pairs in which only the unused `channel` field changes (domains taken in turn),
    then `same_conclusion` same-conclusion control pairs per domain that has `other_values`.

    domains: keys to use, in this order (None: every domain in `domain_dirs`, pools.yaml's `domain_order` first, the
    rest sorted; with changes="trigger", exactly the domains that can make trigger pairs, `trigger_domains`, in that
    order); domain_dirs: directories of
    domain YAML files (None: scenarios/domains/). layout / placement: see LAYOUTS / PLACEMENTS (default
    rule_first). question: "last" | "first". n_gates: 1, or K >= 2 gates on K different fields. polarity: "normal",
    "inverted" (the rule's values swapped) or "mixed" (see `polarity_of`); unless "normal", each instance's
    `variant["polarity"]` records its polarity (controls keep the normal rule).

    changes: "field" (the default; the prompts of the field-flip family, byte-identical to before this option) or
    "trigger" (paper_spec §1.3 Family B, the pairs of §3.10 D1): each gated pair holds the field value fixed and
    changes the rule's trigger word, `trigger_cell` walking the 2x2 of (field, trigger) with k; old_value / new_value
    are the two triggers, value_at points at the trigger word in the rule (label `trigger`; the field's line is
    `fixed_field`), and `variant` records changes, field_value, trigger_old, trigger_new, cell_old, cell_new
    ([field, trigger]), direction (of the implied action: allowed->disallowed = allow -> refuse) and
    trigger_after_field (from the character positions: True in the F->R layouts, False in R->F, the contrast regime).
    The channel controls are made as in the field mode.
    same_conclusion: how many same-conclusion controls per domain with `other_values` (kind "control",
    variant control_type "same_conclusion"; `same_conclusion_cell`): a value change the rule maps to the same action,
    of the field (changes="field") or of the trigger (changes="trigger"), a negative control beside the channel
    controls (expected |delta m| ~ 0, as paper_spec §1.2's low-conditioning fields; §9.6). Domains without
    other_values have none to draw from and get none (the domain files say which have them); if no chosen domain has
    any, ValueError.

    Raises ValueError naming the option and the accepted values for anything unknown, naming the domain, what its
    rule names and the fix for a domain that cannot make trigger pairs, and DomainError for a broken domain file."""
    if n_instances < 0:
        raise ValueError("n_instances must be >= 0")
    if changes not in CHANGES:
        raise ValueError(f"changes must be one of {CHANGES}, got {changes!r}")
    if int(same_conclusion) < 0:
        raise ValueError(f"same_conclusion is a count of control pairs per domain, >= 0; got {same_conclusion!r}")
    if changes == "trigger" and polarity != "normal":
        raise ValueError(f"polarity={polarity!r} with changes='trigger': the trigger pairs already cross the rule's "
                         f"two polarities with the field value (the 2x2); use polarity=normal")
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
    if domains:
        keys = list(domains)
    else:
        keys = trigger_domains(domain_dirs) if changes == "trigger" else default_keys(table)
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {sorted(table)} (add scenarios/domains/<key>.yaml)")
    if not keys:
        raise ValueError("no domains to generate from")
    if changes == "trigger":
        for k in keys:
            named_value(table[k])       # ValueError naming the domain, what its rule names and the fix
    same_keys = [k for k in keys if table[k].other_values] if int(same_conclusion) else []
    if int(same_conclusion) and not same_keys:
        raise ValueError(f"same_conclusion={same_conclusion}: none of the domains {keys} lists other_values (the "
                         f"values its rule's 'anything else' clause covers); add other_values to a domain file "
                         f"(scenarios/domains.py) or choose domains that have them, e.g. "
                         f"{[k for k in default_keys(table) if table[k].other_values][:5]}")
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

    def trigger_pair(d: Domain, k: int, v: dict, others: tuple) -> Instance:
        """Gated trigger pair k of `d`: the field fixed, the rule's trigger flipped (`trigger_cell`)."""
        f, t_old, t_new = trigger_cell(d, k)
        exp_old, exp_new = conclusion(d, f, t_old), conclusion(d, f, t_new)
        arms = [render(d, f, ctl["old"], v, "trigger", others, t) for t in (t_old, t_new)]
        v.update({"changes": "trigger", "field_value": f, "trigger_old": t_old, "trigger_new": t_new,
                  "cell_old": [f, t_old], "cell_new": [f, t_new],
                  "direction": "allowed->disallowed" if exp_old == d.allow else "disallowed->allowed",
                  "trigger_after_field": trigger_after_field(arms[0])})
        return _instance(*arms, id=f"{d.key}/{k:03d}", scenario=d.key, kind="gated", field=d.field,
                         old_value=t_old, new_value=t_new, safe=d.refuse, unsafe=d.allow, expected_old=exp_old,
                         expected_new=exp_new, candidates=(d.allow, d.refuse), suffix="", variant=v)

    def same_pair(d: Domain, k: int, v: dict, others: tuple) -> Instance:
        """Same-conclusion control k of `d` (`same_conclusion_cell`): one value changes, both arms imply one action."""
        fixed, old, new = same_conclusion_cell(d, k, changes)
        v.update({"control_type": "same_conclusion", "changes": changes})
        if changes == "trigger":
            arms = [render(d, fixed, ctl["old"], v, "trigger", others, t) for t in (old, new)]
            exp_old, exp_new = conclusion(d, fixed, old), conclusion(d, fixed, new)
            v.update({"field_value": fixed, "trigger_old": old, "trigger_new": new, "cell_old": [fixed, old],
                      "cell_new": [fixed, new], "trigger_after_field": trigger_after_field(arms[0])})
        else:
            if polarity != "normal":
                v["polarity"] = "normal"
            arms = [render(d, x, ctl["old"], v, "field", others) for x in (old, new)]
            exp_old, exp_new = conclusion(d, old, fixed), conclusion(d, new, fixed)
        if exp_old != exp_new:
            raise AssertionError(f"{d.key}: same-conclusion control implies {exp_old!r} then {exp_new!r}")
        return _instance(*arms, id=f"control_same_conclusion/{d.key}/{k:03d}", scenario="control_same_conclusion",
                         kind="control", field=d.field, old_value=old, new_value=new, safe=d.refuse, unsafe=d.allow,
                         expected_old=exp_old, expected_new=exp_new, candidates=(d.allow, d.refuse), suffix="",
                         variant=v)

    out = []
    for key in keys:
        d = table[key]
        for k in range(n_instances):
            rng = random.Random(f"diverse:{seed}:{key}:{k}")
            v = surface(rng, d)
            others = gates(d, v, f"{seed}:{key}:{k}")
            if changes == "trigger":
                out.append(trigger_pair(d, k, v, others))
                continue
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
    for key in same_keys:
        d = table[key]
        for k in range(int(same_conclusion)):
            rng = random.Random(f"diverse-same:{seed}:{key}:{k}")
            v = surface(rng, d)
            others = gates(d, v, f"same:{seed}:{key}:{k}")
            out.append(same_pair(d, k, v, others))
    return out


def rule_text(domain: str, polarity: str = "normal") -> str:
    """The gate rule of `domain` (a key of scenarios/domains/) in the given polarity (see Domain.rule_text)."""
    return domains()[domain].rule_text(polarity)
