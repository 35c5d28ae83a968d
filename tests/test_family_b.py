"""Family B, the polarity 2x2 (paper_spec §1.3, §3.10 D1) on the one-word domains: `changes="trigger"` holds the
field value fixed and flips the one word of the rule that names a value; same-conclusion controls change a value
without changing the action. Tokenizers are the tiny word-level one (kvnotes.tiny); the run is tiny-llama.

Nothing here hard-codes how many domains can make trigger pairs: the eligible set is recounted from the rule texts,
and test domains are written to a temp directory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import scenarios
from kvnotes.tiny import build_tiny_tokenizer
from scenarios import diverse
from scenarios.domains import DOMAIN_DIR, DomainError, load_domains
from scenarios.regions import char_labels, check_spans, token_labels
from scenarios.render import align
from conftest import run_py

REPO = Path(__file__).resolve().parents[1]
F_R = [name for name, order in diverse.LAYOUTS.items() if order == "F->R"]
R_F = [name for name, order in diverse.LAYOUTS.items() if order == "R->F"]


def _names(rule: str, value: str) -> int:
    """Whole-word occurrences, counted here on their own (not with the code under test)."""
    return len(re.findall(r"(?<![A-Za-z0-9_])" + re.escape(value) + r"(?![A-Za-z0-9_])", rule))


def _domain_file(folder: Path, key: str, rule: str, **extra) -> Path:
    doc = {"agent": "a bike-share assistant",
           "record": {"format": "key_value", "header": "RIDER FILE",
                      "lines": ["rider: {name}", "reference: {oid}", "channel: {channel}"]},
           "field": f"dock_state_{key}", "values": {"allowed": "open", "disallowed": "locked"},
           "answers": {"allow": "unlock", "refuse": "deny"}, "rule": rule,
           "requests": ["Unlock a bike for {oid}.", "Can {name} take a bike?", "Release bike {oid}, please."],
           **extra}
    path = folder / f"{key}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _arm_text(messages) -> str:
    return "".join(m["content"] for m in messages)


def _gated(insts):
    return [i for i in insts if i.kind == "gated"]


# ------------------------------------------------------------------------------------------- the conclusion
def test_the_conclusion_follows_field_and_trigger_on_both_kinds_of_rule():
    table = load_domains()
    cancel, swap = table["order_cancel"], table["sim_swap"]
    # order_cancel's rule names its allowed value (pending); sim_swap's names its disallowed value (high)
    assert _names(cancel.rule, "pending") == 1 and _names(cancel.rule, "shipped") == 0
    assert _names(swap.rule, "high") == 1 and _names(swap.rule, "normal") == 0
    expect = {  # (field, trigger) -> action, read off the rule texts by hand
        (cancel, "pending", "pending"): "cancel", (cancel, "shipped", "pending"): "deny",
        (cancel, "shipped", "shipped"): "cancel", (cancel, "pending", "shipped"): "deny",
        (cancel, "delivered", "pending"): "deny",
        (swap, "high", "high"): "escalate", (swap, "normal", "high"): "swap",
        (swap, "normal", "normal"): "escalate", (swap, "high", "normal"): "swap",
        (swap, "low", "high"): "swap",
    }
    for (d, field, trigger), action in expect.items():
        assert diverse.conclusion(d, field, trigger) == action, (d.key, field, trigger)


def test_the_conclusion_of_a_rule_naming_the_disallowed_value_in_a_temp_domain(tmp_path):
    _domain_file(tmp_path, "dock", "If the dock is locked, deny the ride; otherwise unlock a bike.")
    d = load_domains(tmp_path)["dock"]
    assert [diverse.conclusion(d, f, t) for f, t in [("open", "locked"), ("locked", "locked"), ("open", "open"),
                                                     ("locked", "open")]] == ["unlock", "deny", "deny", "unlock"]


# ------------------------------------------------------------------------------------------- which domains
def test_the_eligible_domains_are_those_whose_rule_names_one_value_once():
    table = load_domains()
    mine = {k for k, d in table.items()
            if sorted([_names(d.rule, d.allowed), _names(d.rule, d.disallowed)]) == [0, 1]}
    assert set(diverse.trigger_domains()) == mine
    assert "order_cancel" in mine and "sim_swap" in mine and "card_replace" not in mine
    assert 0 < len(mine) < len(table)


def test_temp_domains_are_sorted_by_the_form_of_their_rule(tmp_path):
    _domain_file(tmp_path, "once", "Unlock a bike only if the dock is open; otherwise deny.")
    _domain_file(tmp_path, "both", "Unlock a bike only if the dock is open. If it is locked, deny.")
    _domain_file(tmp_path, "twice", "Unlock only if the dock is open, and keep it open. Otherwise deny.")
    assert diverse.trigger_domains([tmp_path]) == ["once"]


def test_the_config_lists_exactly_the_eligible_domains():
    params = yaml.safe_load((REPO / "configs" / "scenario" / "diverse_trigger.yaml").read_text())["params"]
    assert params["domains"] == diverse.trigger_domains()
    assert params["changes"] == "trigger" and params["layout"] == "field_first_user" and params["same_conclusion"] == 1
    defaults = yaml.safe_load((REPO / "configs" / "scenario" / "diverse.yaml").read_text())["params"]
    assert defaults["changes"] == "field" and defaults["same_conclusion"] == 0


def test_no_domains_given_means_exactly_the_eligible_ones():
    insts = scenarios.make_instances("diverse", n_instances=1, seed=0, changes="trigger", controls=0)
    assert [i.scenario for i in insts] == diverse.trigger_domains()


def test_an_ineligible_domain_is_refused_with_what_its_rule_names_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"'card_replace'.*names 'passed' 1x and 'failed' 1x.*domains=\[\.\.\.\].*"
                                         r"trigger_domains\(\).*names one value once"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, changes="trigger",
                                 domains=["order_cancel", "card_replace"])
    _domain_file(tmp_path, "twice", "Unlock only if the dock is open, and keep it open. Otherwise deny.")
    with pytest.raises(ValueError, match=r"'twice'.*names 'open' 2x"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, changes="trigger", domains=["twice"],
                                 domain_dirs=[str(DOMAIN_DIR), str(tmp_path)])


def test_unknown_changes_and_polarity_with_triggers_are_refused():
    with pytest.raises(ValueError, match="changes must be one of"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, changes="rule")
    with pytest.raises(ValueError, match="polarity='mixed' with changes='trigger'"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, changes="trigger", polarity="mixed")


def test_the_defaults_are_the_field_mode_without_same_conclusion_controls():
    kw = dict(n_instances=2, seed=4, domains=["order_cancel", "sim_swap"], layout="field_first_user")
    plain = scenarios.make_instances("diverse", **kw)
    assert plain == scenarios.make_instances("diverse", changes="field", same_conclusion=0, **kw)
    assert [i.variant for i in plain] == [i.variant for i in scenarios.make_instances("diverse", **kw)]
    assert not any("changes" in i.variant or "control_type" in i.variant for i in plain)


# ------------------------------------------------------------------------------------------- the 2x2
@pytest.mark.parametrize("layout", F_R + R_F)
def test_the_four_cells_differ_only_in_the_trigger_word(tok, layout):
    table = load_domains()
    insts = _gated(scenarios.make_instances("diverse", n_instances=4, seed=1, changes="trigger", layout=layout,
                                            controls=0))
    assert insts
    by_domain = {}
    for inst in insts:
        d, v = table[inst.scenario], inst.variant
        f = v["field_value"]
        by_domain.setdefault(inst.scenario, []).append(inst)
        assert v["changes"] == "trigger" and inst.field == d.field
        assert {inst.old_value, inst.new_value} == {d.allowed, d.disallowed}
        assert (v["trigger_old"], v["trigger_new"]) == (inst.old_value, inst.new_value)
        assert v["cell_old"] == [f, inst.old_value] and v["cell_new"] == [f, inst.new_value]
        # the field value is byte-identical: the record's field line is the same text in both arms
        check_spans(inst.old_messages, inst.spans, inst.id)
        old_text, new_text = _arm_text(inst.old_messages), _arm_text(inst.new_messages)
        chars = char_labels(old_text, inst.old_messages, inst.spans)
        fixed = [i for i, c in enumerate(chars) if c == "fixed_field"]
        assert fixed and fixed == list(range(fixed[0], fixed[-1] + 1))
        line = old_text[fixed[0]:fixed[-1] + 1]
        assert f in line and line in new_text and "field" not in chars and "field_line" not in chars
        # the changing characters are the trigger word inside the rule, labelled `trigger`
        (mi, s, e), (mj, s2, e2) = inst.value_at
        old_c, new_c = inst.old_messages[mi]["content"], inst.new_messages[mj]["content"]
        assert old_c[s:e] == inst.old_value and new_c[s2:e2] == inst.new_value
        assert old_c[:s] == new_c[:s2] and old_c[e:] == new_c[e2:]
        assert [m for i, m in enumerate(inst.old_messages) if i != mi] == \
            [m for i, m in enumerate(inst.new_messages) if i != mi]
        off = sum(len(m["content"]) for m in inst.old_messages[:mi])
        assert set(chars[off + s:off + e]) == {"trigger"} and chars.count("trigger") == e - s
        assert chars[off + s - 1] == "gate" and chars[off + e] == "gate"
        # token-aligned: old and new ids equal outside one span, which is the trigger inside the rule
        pair = align(inst, tok, False, None)
        a, b = pair.span
        differ = (pair.old_ids != pair.new_ids).nonzero().flatten().tolist()
        assert differ and a <= min(differ) and max(differ) < b and b - a == 1
        labels = token_labels(pair, tok, False)
        assert labels[a:b] == ["trigger"] and labels[a - 1] == "gate" and labels[b] == "gate"
        field_tokens = [p for p, lab in enumerate(labels) if lab == "fixed_field"]
        after = all(p < a for p in field_tokens)
        assert after == (diverse.LAYOUTS[layout] == "F->R") == v["trigger_after_field"]
        assert after or all(p >= b for p in field_tokens)
        # the expected actions are the rule's (the named value's action iff field == trigger, recounted here), and
        # the direction word says which way the action flips
        act_named, act_other = (d.allow, d.refuse) if _names(d.rule, d.allowed) else (d.refuse, d.allow)
        for t, got in ((inst.old_value, inst.expected_old), (inst.new_value, inst.expected_new)):
            assert got == (act_named if f == t else act_other)
        assert (inst.safe, inst.unsafe) == (d.refuse, d.allow)
        assert v["direction"] == ("allowed->disallowed" if inst.expected_new == d.refuse else "disallowed->allowed")
    for key, cells in by_domain.items():
        d = table[key]
        assert [i.id for i in cells] == [f"{key}/{k:03d}" for k in range(4)]
        assert {tuple(i.variant["cell_old"]) for i in cells} == {(f, t) for f in (d.allowed, d.disallowed)
                                                                 for t in (d.allowed, d.disallowed)}
        assert [i.variant["direction"] for i in cells] == ["allowed->disallowed", "disallowed->allowed"] * 2


def test_every_record_format_and_a_multi_gate_policy_make_trigger_pairs(tmp_path, tok):
    rule = "Unlock a bike only if the dock is open; for any other dock state, deny."
    for fmt in ("key_value", "table", "json", "prose"):
        rec = {"format": fmt, "header": f"RIDER {fmt.upper()}",
               "lines": (["{name} asked by {channel} about ride {oid}.", "The ride is routine."] if fmt == "prose"
                         else ["rider: {name}", "reference: {oid}", "channel: {channel}"])}
        _domain_file(tmp_path, f"bike_{fmt}", rule, record=rec)
    dirs = [str(DOMAIN_DIR), str(tmp_path)]
    keys = [f"bike_{fmt}" for fmt in ("key_value", "table", "json", "prose")]
    for question in diverse.QUESTIONS:
        for n_gates in (1, 3):
            for inst in scenarios.make_instances("diverse", n_instances=4, seed=2, domains=keys, domain_dirs=dirs,
                                                 changes="trigger", layout="family_a_blocks", question=question,
                                                 n_gates=n_gates, controls=0):
                check_spans(inst.old_messages, inst.spans, inst.id)
                (mi, s, e), _ = inst.value_at
                assert inst.old_messages[mi]["content"][s:e] == inst.old_value
                assert inst.variant["trigger_after_field"] is True
                labels = {lab for sp in inst.spans for _, _, lab in sp}
                assert {"trigger", "fixed_field", "gate"} <= labels and not {"field", "field_line"} & labels
                assert inst.variant["field_value"] in _arm_text(inst.old_messages)


def test_controls_on_the_channel_are_the_field_mode_ones():
    kw = dict(n_instances=1, seed=0, domains=["order_cancel", "sim_swap"], controls=3, layout="field_first_user")
    field = [i for i in scenarios.make_instances("diverse", **kw) if i.kind == "control"]
    trig = [i for i in scenarios.make_instances("diverse", changes="trigger", **kw) if i.kind == "control"]
    assert len(trig) == 3 and trig == field and [i.variant for i in trig] == [i.variant for i in field]


# ------------------------------------------------------------------------------------------- same-conclusion controls
def _same(insts):
    return [i for i in insts if i.variant.get("control_type") == "same_conclusion"]


@pytest.mark.parametrize("changes", diverse.CHANGES)
def test_same_conclusion_controls_keep_the_action_and_change_one_span(tok, changes):
    table = load_domains()
    with_others = [k for k in diverse.trigger_domains() if table[k].other_values]
    keys = ["order_cancel", "sim_swap", "ticket_transfer"]      # the first two list other values, the last does not
    assert table["order_cancel"].other_values and table["sim_swap"].other_values
    assert not table["ticket_transfer"].other_values and len(with_others) >= 10
    insts = scenarios.make_instances("diverse", n_instances=1, seed=0, domains=keys, changes=changes,
                                     layout="field_first_user", controls=1, same_conclusion=3)
    same = _same(insts)
    assert [i.id for i in same] == [f"control_same_conclusion/{k}/{n:03d}" for k in keys[:2] for n in range(3)]
    for inst in same:
        d, v = table[inst.variant["domain"]], inst.variant
        assert inst.kind == "control" and v["changes"] == changes and inst.field == d.field
        assert inst.expected_old == inst.expected_new
        assert inst.new_value in d.other_values and inst.old_value in (d.allowed, d.disallowed)
        if changes == "field":
            # the rule stands; the field goes from the value the rule does not name to an other value
            assert inst.old_value == (d.disallowed if _names(d.rule, d.allowed) else d.allowed)
            assert d.rule in _arm_text(inst.old_messages) and d.rule in _arm_text(inst.new_messages)
            want = d.refuse if _names(d.rule, d.allowed) else d.allow
        else:
            f = v["field_value"]
            assert inst.old_value != f and inst.new_value != f and v["cell_old"] == [f, inst.old_value]
            want = diverse.conclusion(d, f, inst.old_value)
        assert inst.expected_old == want
        # exactly one differing span, of the value's label
        check_spans(inst.old_messages, inst.spans, inst.id)
        (mi, s, e), (mj, s2, e2) = inst.value_at
        old_c, new_c = inst.old_messages[mi]["content"], inst.new_messages[mj]["content"]
        assert old_c[:s] == new_c[:s2] and old_c[e:] == new_c[e2:] and (old_c[s:e], new_c[s2:e2]) == (
            inst.old_value, inst.new_value)
        pair = align(inst, tok, False, None)
        a, b = pair.span
        differ = (pair.old_ids != pair.new_ids).nonzero().flatten().tolist()
        assert b - a == 1 and differ == [a]
        assert token_labels(pair, tok, False)[a] == ("trigger" if changes == "trigger" else "field")


def test_same_conclusion_on_domains_without_other_values_is_an_error():
    with pytest.raises(ValueError, match=r"same_conclusion=1: none of the domains \['ticket_transfer'\] lists "
                                         r"other_values.*add other_values"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, domains=["ticket_transfer"], same_conclusion=1)
    with pytest.raises(ValueError, match="same_conclusion is a count"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, same_conclusion=-1)


def test_every_shipped_other_value_is_outside_the_rule_and_apart_from_the_values():
    table = load_domains()
    listed = {k: d for k, d in table.items() if d.other_values}
    assert len(listed) >= 10
    for d in listed.values():
        assert d.key in diverse.trigger_domains()
        assert re.search(r"anything else|otherwise|any other|every other", d.rule, re.I), d.key
        for v in d.other_values:
            assert v not in (d.allowed, d.disallowed) and _names(d.rule, v) == 0 and re.fullmatch(r"[a-z]+", v)


@pytest.mark.parametrize("extra, match", [
    ({"other_values": ["open"]}, "must differ from the two values"),
    ({"other_values": ["full", "full"]}, "and from each other"),
    ({"other_values": ["half full"]}, "is not one word"),
    ({"other_values": "full"}, "non-empty list of words"),
    ({"other_values": ["full"], "rule": "Unlock only if the dock is open. If it is locked, deny."},
     r"names 'open' 1x, 'locked' 1x.*remove other_values"),
    ({"other_values": ["full"], "rule": "Unlock only if the dock is open; if full or anything else, deny."},
     r"other_values \['full'\] occur in the rule"),
])
def test_a_bad_other_values_entry_names_the_file_and_the_fault(tmp_path, extra, match):
    extra = dict(extra)
    rule = extra.pop("rule", "Unlock a bike only if the dock is open; otherwise deny.")
    path = _domain_file(tmp_path, "dock", rule, **extra)
    with pytest.raises(DomainError, match=match) as e:
        load_domains(tmp_path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------- end to end
def test_run_py_lands_a_locality_record_of_trigger_pairs(tmp_path):
    out = tmp_path / "results"
    run_py("scenario=diverse_trigger", "model=tiny-llama", "n_instances=1", f"results_dir={out}",
           "make_figures=false", "exclusion.require_flip=false", "exclusion.require_correct=false",
           "exclusion.min_abs_delta_m=0.0", "stats.n_boot=200", hydra_dir=tmp_path / "hydra")
    rec = json.loads((out / "locality" / "tiny-llama" / "diverse_trigger.json").read_text())
    rows = rec["instances"] + rec["excluded"]
    assert sorted(r["scenario"] for r in rows) == sorted(diverse.trigger_domains())   # one pair per domain
    for r in rows:
        v = r["variant"]
        assert v["changes"] == "trigger" and v["trigger_after_field"] is True
        assert [r["old_value"], r["new_value"]] == [v["trigger_old"], v["trigger_new"]]
        assert r["tokens"]["span_old"] == [v["trigger_old"]] and r["tokens"]["span_new"] == [v["trigger_new"]]
        a, b = r["tokens"]["span"]
        assert r["tokens"]["labels"][a:b] == ["trigger"]
        assert r["direction"] == {"allowed->disallowed": "allow->refuse", "disallowed->allowed": "refuse->allow"}[
            v["direction"]]
    same = [r for r in rec["controls"] if r["variant"].get("control_type") == "same_conclusion"]
    table = load_domains()
    assert {r["variant"]["domain"] for r in same} == {k for k in diverse.trigger_domains() if table[k].other_values}
    assert all(r["expected_old"] == r["expected_new"] for r in same)
    assert rec["config"]["scenario"]["params"]["changes"] == "trigger"
