"""Scenarios as data: domain YAML files, layouts as a factor, unique filler, generator labels, value-span alignment.

Nothing here hard-codes the number of domains: tests read it from scenarios/domains/ or write their own domains to a
temp directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

import scenarios
from scenarios import diverse
from scenarios.base import Text
from scenarios.domains import DOMAIN_DIR, DomainError, load_domains
from scenarios.regions import LABELS, char_labels, check_spans
from scenarios.render import AlignmentError, align
from conftest import run_py

REPO = Path(__file__).resolve().parents[1]
ORIGINAL = ["order_cancel", "account_delete", "password_reset", "loyalty_discount", "item_return", "plan_upgrade",
            "data_export", "card_replace", "class_booking", "rx_refill"]


def _fingerprint(insts) -> str:
    """Hash of everything a prompt pair is made of (not the surface record `variant`)."""
    return hashlib.sha256(json.dumps([[i.id, i.scenario, i.kind, i.field, i.old_value, i.new_value,
                                       list(i.old_messages), list(i.new_messages), i.safe, i.unsafe, i.expected_old,
                                       i.expected_new, list(i.candidates), i.suffix] for i in insts],
                                     sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- byte-identical prompts
# Computed with the steps 1-3 generator (scenarios/diverse.py and family_a.py at 0053489) before domains became
# data: the ten original domains (and Family A) must render exactly these prompts, so committed records stay valid.
STEP3 = {
    ("diverse", 4, 0, ()): "101cf2e6f80ae71e44e1c990534eff9dd8aefeef491cfddf43a28e0141cc60a6",
    ("diverse", 6, 0, ()): "b4da0c94306eee5937c46424d38986c6316fae4f189a2160142a9ac05ebe531b",
    ("diverse", 3, 5, (("placement", "before_rule"),)): "7b7218a929bf4f24431bcec24a0165db94739880a2f20cfa75d0a5cee85f34a1",
    ("diverse", 4, 0, (("polarity", "mixed"),)): "9fbff6fc29ae1ac86b36960acbe216e3daecfbccc562de4e8ce63824b837e5ee",
    ("diverse", 6, 0, (("polarity", "mixed"),)): "155d7893d497ac11a3a4a6921830e340f71c6937bed4be77fc8da90988b68a70",
    ("diverse_dose", 6, 0, ()): "70809a84788c523f319e7ada0a127cf9de6440def0f1bee90a90021044896f94",
    ("family_a", 4, 0, ()): "4f81da9e2758039f7a65e7fd677eee1a5cadfd635b1fbb1e1550f092ce7f4a6b",
    ("family_a", 4, 0, (("vary_surface", False),)): "f255cb923210212bd5d5133e389f6f0580e36635209af5ee35e9f3eff0215c39",
}


@pytest.mark.parametrize("key", list(STEP3), ids=lambda k: f"{k[0]}-n{k[1]}-s{k[2]}-{dict(k[3])}")
def test_original_domains_render_the_step3_prompts_byte_identically(key):
    family, n, seed, extra = key
    params = dict(extra)
    if family != "family_a":
        params["domains"] = ORIGINAL
    assert _fingerprint(scenarios.make_instances(family, n_instances=n, seed=seed, **params)) == STEP3[key]


def test_the_main_scenario_config_is_the_ten_original_domains():
    cfg = yaml.safe_load((REPO / "configs" / "scenario" / "diverse.yaml").read_text())
    assert cfg["params"]["domains"] == ORIGINAL


def test_every_domain_by_default_with_the_original_ones_first_in_their_order():
    insts = scenarios.make_instances("diverse", n_instances=1, seed=0)
    keys = [i.scenario for i in insts if i.kind == "gated"]
    assert keys[:len(ORIGINAL)] == ORIGINAL
    assert set(keys) == set(load_domains())
    assert keys[len(ORIGINAL):] == sorted(keys[len(ORIGINAL):])


# ------------------------------------------------------------------------------------------- the domain files
def test_every_shipped_domain_file_is_valid_and_rich_enough():
    table = load_domains()
    assert len(table) >= 30, "the issue asks for at least 30 domains"
    formats = {d.format for d in table.values()}
    assert formats == {"key_value", "table", "json", "prose"}
    refusals = [d.refuse for d in table.values()]
    assert len(set(refusals)) >= 4 and sum(r == "deny" for r in refusals) < len(refusals)
    fields = [d.field for d in table.values()]
    assert len(set(fields)) == len(fields), "field names must be unique (multi-gate records hold several)"
    for d in table.values():
        assert len(d.requests) >= 3
        assert d.rule_text("inverted") != d.rule


def _write_domain(tmp: Path, key: str, **over) -> Path:
    doc = {"agent": "a parking-garage assistant",
           "record": {"format": "key_value", "header": "PERMIT FILE",
                      "lines": ["customer: {name}", "reference: {oid}", "channel: {channel}"]},
           "field": "membership", "values": {"allowed": "active", "disallowed": "expired"},
           "answers": {"allow": "book", "refuse": "deny"},
           "rule": "Book a space only if the membership is active. If the membership is expired, deny it.",
           "requests": ["Please book a space for {oid}.", "Can you book me in, {name}?", "Book {oid} for tomorrow."]}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    path = tmp / f"{key}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_domain_added_as_one_yaml_file_in_another_directory(tmp_path):
    _write_domain(tmp_path, "garage_permit")
    dirs = [str(DOMAIN_DIR), str(tmp_path)]
    insts = scenarios.make_instances("diverse", n_instances=2, seed=0, domains=["garage_permit"], domain_dirs=dirs,
                                     controls=1)
    gated = [i for i in insts if i.kind == "gated"]
    assert [i.id for i in gated] == ["garage_permit/000", "garage_permit/001"]
    assert "PERMIT FILE" in gated[0].old_messages[1]["content"]
    assert {gated[0].expected_old, gated[0].expected_new} == {"book", "deny"}


@pytest.mark.parametrize("over, match", [
    ({"colour": "red"}, r"unknown keys \['colour'\]"),
    ({"values": {"allowed": "active", "disallowed": "active"}}, "the two values are equal"),
    ({"record": {"format": "yaml"}}, "record.format 'yaml' is not one of"),
    ({"record": {"lines": ["customer: {name}"]}}, r"\{channel\} exactly once"),
    ({"requests": ["Book it."]}, "at least three"),
    ({"requests": ["Book {thing}.", "a", "b"]}, r"placeholders \['thing'\]"),
    ({"answers": {"allow": "book", "refuse": "book"}}, "two different single words"),
    ({"values": {"allowed": "on hold ", "disallowed": "x"}}, "without surrounding spaces"),
])
def test_a_broken_domain_file_names_the_file_and_the_fault(tmp_path, over, match):
    path = _write_domain(tmp_path, "broken", **over)
    with pytest.raises(DomainError, match=match) as e:
        load_domains(tmp_path)
    assert str(path) in str(e.value)


def test_a_domain_defined_twice_is_refused_not_replaced(tmp_path):
    _write_domain(tmp_path, "order_cancel")
    with pytest.raises(DomainError, match="defined twice"):
        load_domains([DOMAIN_DIR, tmp_path])


def test_unknown_domain_layout_and_options_are_named():
    with pytest.raises(ValueError, match="unknown domains"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, domains=["no_such_domain"])
    with pytest.raises(ValueError, match="unknown layout 'sideways'"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, layout="sideways")
    with pytest.raises(ValueError, match="question must be one of"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, question="middle")
    with pytest.raises(ValueError, match="give one of the two"):
        scenarios.make_instances("diverse", n_instances=1, seed=0, placement="after_rule", layout="field_first_user")


# ------------------------------------------------------------------------------------------- filler
@pytest.mark.parametrize("style, k", [("record", 0), ("record", 12), ("record", 48), ("note", 8), ("note", 30)])
def test_filler_is_unique_and_of_the_requested_count(style, k):
    import random
    lines = diverse.filler_lines(random.Random(1), style, k)
    assert len(lines) == k == len(set(lines))


def test_diverse_long_gets_the_notes_it_asks_for():
    cfg = yaml.safe_load((REPO / "configs" / "scenario" / "diverse_long.yaml").read_text())["params"]
    lo, hi = cfg["n_filler"]
    for inst in scenarios.make_instances("diverse", n_instances=2, seed=0, domains=ORIGINAL[:3], controls=0,
                                         n_filler=(lo, hi), filler_style="note"):
        content = inst.old_messages[1]["content"]
        notes = [ln for ln in content.split("\n") if ln.startswith("Note: ")]
        assert lo <= len(notes) <= hi and len(set(notes)) == len(notes) == inst.variant["n_filler"]


def test_too_much_filler_is_an_error_naming_the_limit():
    import random
    with pytest.raises(ValueError, match="the pools hold"):
        diverse.filler_lines(random.Random(0), "record", 10_000)


# ------------------------------------------------------------------------------------------- layouts and labels
def _formats_dir(tmp_path) -> list:
    """One domain per record format, in a temp dir beside the shipped ones."""
    for fmt in ("key_value", "table", "json", "prose"):
        rec = {"format": fmt, "header": f"FILE {fmt.upper()}"}
        if fmt == "prose":
            rec["lines"] = ["{name} wrote to us by {channel} about reference {oid}.", "The request is routine."]
            rec["field_text"] = "The membership is {value} today."
        _write_domain(tmp_path, f"fmt_{fmt}", record=rec, field=f"member_{fmt}" if fmt != "prose" else "membership")
    return [str(DOMAIN_DIR), str(tmp_path)]


@pytest.mark.parametrize("layout", list(diverse.LAYOUTS))
@pytest.mark.parametrize("question", diverse.QUESTIONS)
def test_every_layout_and_format_is_labelled_by_the_generator(tmp_path, layout, question):
    dirs = _formats_dir(tmp_path)
    keys = ["fmt_key_value", "fmt_table", "fmt_json", "fmt_prose"]
    for inst in scenarios.make_instances("diverse", n_instances=2, seed=3, domains=keys, domain_dirs=dirs,
                                         layout=layout, question=question, n_filler=(2, 3), controls=4):
        check_spans(inst.old_messages, inst.spans, inst.id)
        (mi, s, e), (mj, s2, e2) = inst.value_at
        assert inst.old_messages[mi]["content"][s:e] == inst.old_value
        assert inst.new_messages[mj]["content"][s2:e2] == inst.new_value
        labels = {lab for sp in inst.spans for _, _, lab in sp}
        assert {"role", "gate", "record", "task", "field"} <= labels <= set(LABELS)
        # the value's characters carry the `field` label, and only they
        text = "".join(m["content"] for m in inst.old_messages)
        chars = char_labels(text, inst.old_messages, inst.spans)
        off = sum(len(m["content"]) for m in inst.old_messages[:mi])
        assert set(chars[off + s:off + e]) == {"field"} and chars.count("field") == e - s
        # R->F: the gate comes before the field in reading order; F->R: after it
        gate_at = chars.index("gate")
        assert (gate_at < off + s) == (diverse.LAYOUTS[layout] == "R->F")
        # the note site starts a paragraph before the answer line in the last user message
        (ni, at), _ = inst.note_at
        assert inst.old_messages[ni]["role"] == "user" and inst.old_messages[ni]["content"][at:].rstrip().endswith(
            f"{inst.candidates[1]}.")


def test_old_and_new_prompts_differ_only_in_the_value(tmp_path):
    dirs = _formats_dir(tmp_path)
    for inst in scenarios.make_instances("diverse", n_instances=2, seed=0, domains=["fmt_json", "fmt_table"],
                                         domain_dirs=dirs, n_gates=3, controls=2):
        (mi, s, e), (_, s2, e2) = inst.value_at
        old, new = inst.old_messages[mi]["content"], inst.new_messages[mi]["content"]
        assert old[:s] == new[:s2] and old[e:] == new[e2:]
        assert [m for i, m in enumerate(inst.old_messages) if i != mi] == \
            [m for i, m in enumerate(inst.new_messages) if i != mi]


def test_several_gates_put_k_fields_in_one_record_and_k_rules_in_one_policy():
    for inst in scenarios.make_instances("diverse", n_instances=2, seed=0, domains=ORIGINAL[:4], n_gates=4,
                                         controls=0):
        table = load_domains()
        others = [table[k] for k in inst.variant["other_gates"]]
        assert len(others) == 3 and len({o.field for o in others} | {inst.field}) == 4
        text = "\n".join(m["content"] for m in inst.old_messages)
        for o, ov in zip(others, inst.variant["other_values"]):
            assert f"{o.field}: {ov}" in text and o.rule in text
        labels = {lab for sp in inst.spans for _, _, lab in sp}
        assert {"other_gate", "other_field"} <= labels


def test_labels_come_from_the_generator_not_from_header_patterns(tmp_path):
    # a header the steps 1-3 regex did not know ("PATIENT CHART") is still a record; a request that names the field
    # (rx_refill's) is still the conversation
    _write_domain(tmp_path, "chart", record={"header": "PATIENT CHART"},
                  requests=["Is the membership fine for {oid}?", "Is the membership fine, {name}?",
                            "Is the membership fine? Ref {oid}."])
    inst = scenarios.make_instances("diverse", n_instances=1, seed=0, domains=["chart"],
                                    domain_dirs=[str(DOMAIN_DIR), str(tmp_path)], controls=0)[0]
    user = inst.old_messages[1]["content"]
    spans = {user[s:e]: lab for s, e, lab in inst.spans[1]}
    assert any(t.startswith("PATIENT CHART") and lab == "record" for t, lab in spans.items())
    req = [lab for s, e, lab in inst.spans[1] if "membership fine" in user[s:e]]
    assert req == ["conversation"]


def test_unlabelled_characters_are_an_error():
    msgs = ({"role": "user", "content": "abc"},)
    with pytest.raises(ValueError, match="unlabelled"):
        check_spans(msgs, (((0, 2, "role"),),), "x")
    with pytest.raises(ValueError, match="unknown region label"):
        check_spans(msgs, (((0, 3, "mystery"),),), "x")


def test_text_builder_tracks_value_and_note():
    t = Text().add("a: ", "record").add_value("v").add("\n", "record").mark_note().add("ask", "task")
    assert t.content == "a: v\nask" and t.value == (3, 4) and t.note == 5
    assert t.spans() == ((0, 3, "record"), (3, 4, "field"), (4, 5, "record"), (5, 8, "task"))


# ------------------------------------------------------------------------------------------- value-span alignment
def _ws_tokenizer(texts, newlines_apart: bool = True):
    """A word-level tokenizer that splits on spaces only, so punctuation and newlines stick to their word (the
    merges a BPE tokenizer makes with a value's neighbours, in their simplest form)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.Split(" ", behavior="removed")
    if newlines_apart:
        pre = pre_tokenizers.Sequence([pre, pre_tokenizers.Split("\n", behavior="isolated")])
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def _pair_with(before_value: str, after_value: str, old="pending", new="shipped"):
    """A minimal instance whose value sits between the given neighbours."""
    from scenarios.base import Instance, marks_of, messages_of
    arms = []
    for v in (old, new):
        t = Text().add("RECORD\nstatus:" + before_value, "record").add_value(v).add(after_value + "\n", "field_line")
        t.add("\nplease decide now\nanswer yes or no", "task")
        arms.append([("user", t)])
    (vo, _), (vn, _) = marks_of(arms[0]), marks_of(arms[1])
    return Instance(id="x/000", scenario="x", kind="gated", field="status", old_value=old, new_value=new,
                    old_messages=messages_of(arms[0]), new_messages=messages_of(arms[1]), safe="no", unsafe="yes",
                    expected_old="yes", expected_new="no", candidates=("yes", "no"),
                    spans=(arms[0][0][1].spans(),), value_at=(vo, vn))


def _plain(tok):
    tok.chat_template = None
    return {"user": "{content}", "generation": "\nA:"}


@pytest.mark.parametrize("before, after, ok", [
    (" ", "", True),            # the word-boundary space before the value may ride on its token
    (" ", ".", False),          # punctuation merged on the right ("pending." vs "shipped.")
    (" ", "!", False),
    ("", "", False),            # merged with the key on the left ("status:pending")
    (" ", " soon", True),       # a separate next word
])
def test_alignment_refuses_a_differing_span_that_leaves_the_value(before, after, ok):
    inst = _pair_with(before, after)
    texts = [m["content"] for m in inst.old_messages + inst.new_messages]
    tok = _ws_tokenizer([t + "\nA:" for t in texts])
    plain = _plain(tok)
    if ok:
        pair = align(inst, tok, False, plain)
        assert pair.span[1] - pair.span[0] == 1
    else:
        with pytest.raises(AlignmentError, match=r"outside the value 'pending'.*'pending'.*'shipped'|outside the "
                                                 r"value"):
            align(inst, tok, False, plain)


def test_alignment_refuses_a_value_glued_to_its_newline():
    # the space-split tokenizer keeps "\n" on the word before it: the differing token is 'pending\nplease'
    inst = _pair_with(" ", "")
    texts = [m["content"].replace("\n\nplease", "\nplease") + "\nA:" for m in inst.old_messages + inst.new_messages]
    tok = _ws_tokenizer([m["content"] + "\nA:" for m in inst.old_messages + inst.new_messages] + texts, False)
    with pytest.raises(AlignmentError, match=r"outside the value"):
        align(inst, tok, False, _plain(tok))


def test_real_tokenizer_pending_dot_vs_bang_is_refused():
    """The issue's case on the default model's tokenizer (Qwen2.5: 'pending.\\n\\n' -> 'Ġpending', '.ĊĊ'), when its
    model cache exists on this machine (it is not installed for CI)."""
    from transformers import AutoTokenizer
    from kvnotes.models import default_cache_dir
    found = sorted((default_cache_dir() / "hf").glob("qwen2.5-coder-1.5b-*"))
    if not found:
        pytest.skip("qwen2.5-coder-1.5b's tokenizer is not cached here (make weights + one run build it)")
    tok = AutoTokenizer.from_pretrained(str(found[0]))
    inst = _pair_with(" ", "", old="pending.", new="pending!")
    with pytest.raises(AlignmentError, match=r"differing tokens \['.ĊĊ'\].*outside the value 'pending.'"):
        align(inst, tok, False, None)


# ------------------------------------------------------------------------------------------- end to end, no Python
def test_a_new_domain_runs_through_run_py_with_no_other_change(tmp_path):
    """The issue's 'adding a domain touches one YAML file': a domain in a temp directory, picked up by run.py through
    the scenario config alone (tiny model, words the tiny tokenizer knows)."""
    dom = tmp_path / "domains"
    dom.mkdir()
    _write_domain(dom, "garage_permit")
    out = tmp_path / "results"
    run_py("model=tiny-llama", "scenario=diverse_all", "n_instances=2",
           f"scenario.params.domain_dirs=[{DOMAIN_DIR},{dom}]", "scenario.params.domains=[garage_permit]",
           f"results_dir={out}", "make_figures=false", hydra_dir=tmp_path / "hydra", timeout=600)
    rec = json.loads((out / "locality" / "tiny-llama" / "diverse_all.json").read_text())
    assert {r["scenario"] for r in rec["instances"] + rec["excluded"]} == {"garage_permit"}


def test_an_exact_filler_count_is_the_range_of_one_value():
    """A sweep's D (scenario.params.n_filler=16) draws exactly what [16, 16] draws; a bad count is refused."""
    a = scenarios.make_instances("diverse", n_instances=1, seed=3, n_filler=16, layout="field_first_user")
    assert a == scenarios.make_instances("diverse", n_instances=1, seed=3, n_filler=[16, 16],
                                         layout="field_first_user")
    assert {len(i.variant["filler"]) for i in a} == {16}
    with pytest.raises(ValueError, match="n_filler is a count or a range"):
        scenarios.make_instances("diverse", n_instances=1, seed=3, n_filler=[5, 2])
