"""Family C (the cancel/deny gate, paper_spec §1.4) and the off-template tasks of Family D (§1.5) as generated
families (scenarios/offtemplate.py, data in scenarios/offtemplate/*.yaml): real surface variation, seeded draws, arms
that differ in the marked value only and token-align, the rule's answers, the controls, parameter and data errors,
and one run.py record each on the tiny model."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import scenarios
from probes.common import flip_direction
from scenarios import offtemplate
from scenarios.offtemplate import DATA_DIR, DataError, gate_answer, load_task
from scenarios.regions import LABELS, char_labels, check_spans
from scenarios.render import align
from conftest import run_py

REPO = Path(__file__).resolve().parents[1]
CASES = [("family_c", {"pair": p, "order": o}) for p in ("field", "trigger") for o in ("rule_first", "field_first")]
CASES += [("offtemplate", {"task": t}) for t in ("multihop", "rag_lookup", "natural")]
CASE_IDS = [f"{f}-{'-'.join(map(str, kw.values()))}" for f, kw in CASES]
STATUSES = ("pending", "shipped", "processing", "delivered")   # §1.4's values, typed here, not read from the module


def make(family: str, n: int = 8, seed: int = 0, **kw) -> list:
    return scenarios.make_instances(family, n_instances=n, seed=seed, **kw)


def content(inst, which: str = "old") -> str:
    msgs = inst.old_messages if which == "old" else inst.new_messages
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    return msgs[0]["content"]


def labels_of(inst) -> list:
    """One region label per character of the old arm's (single) message."""
    return char_labels(content(inst), inst.old_messages, inst.spans)


def region(inst, label: str) -> str:
    text, chars = content(inst), labels_of(inst)
    return "".join(c for c, lab in zip(text, chars) if lab == label)


def fingerprint(insts) -> list:
    return [(i.id, i.scenario, i.kind, i.field, i.old_value, i.new_value, i.old_messages, i.new_messages, i.safe,
             i.unsafe, i.expected_old, i.expected_new, i.candidates, i.suffix, i.spans, i.value_at, i.note_at)
            for i in insts]


# ------------------------------------------------------------------------------------------- counts and variation
@pytest.mark.parametrize("family, kw", CASES, ids=CASE_IDS)
def test_n_instances_and_controls_with_real_surface_variation(family, kw):
    insts = make(family, n=8, **kw)
    gated = [i for i in insts if i.kind == "gated"]
    controls = [i for i in insts if i.kind == "control"]
    assert len(gated) == 8 and len(controls) == 8 and len(insts) == 16
    assert len({i.id for i in insts}) == 16
    assert len(make(family, n=3, controls=1, **kw)) == 4
    # wording differs in more than the id: mask the order id and the pair's values, compare neighbours
    for group in (gated, controls):
        masked = []
        for i in group:
            text = content(i).replace(i.variant["oid"], "<ID>")
            masked.append(re.sub(rf"\b({re.escape(i.old_value)}|{re.escape(i.new_value)})\b", "<V>", text))
        differ = sum(a != b for a, b in zip(masked, masked[1:]))
        assert differ >= (len(masked) - 1) / 2, f"{family} {kw}: only {differ} of {len(masked) - 1} neighbours differ"
        assert len(set(masked)) >= len(masked) / 2


def _around_value(inst, width: int = 40) -> str:
    """The text on the value's line within `width` characters of it, the value and the order id masked."""
    (_, s, e), _ = inst.value_at
    text = content(inst)
    nl = text.find("\n", e)
    lo, hi = max(text.rfind("\n", 0, s) + 1, s - width), min(len(text) if nl < 0 else nl, e + width)
    return (text[lo:s] + "<V>" + text[e:hi]).replace(inst.variant["oid"], "<ID>")


@pytest.mark.parametrize("family, kw", CASES, ids=CASE_IDS)
def test_the_wording_itself_varies_within_a_cluster(family, kw):
    """Not only ids, values and filler: within one cluster (one rule / frame) the words around the value and the
    request or question line come from paraphrase pools."""
    clusters = {}
    for i in make(family, n=32, controls=0, **kw):
        clusters.setdefault(i.scenario, []).append(i)
    assert len(clusters) >= 3
    for key, group in clusters.items():
        assert len(group) >= 4
        if not (family == "family_c" and kw["pair"] == "field"):   # "order_status: <V>" has no paraphrases
            assert len({_around_value(i) for i in group}) >= 2, key
        asks = {content(i).split("\n")[-2].replace(i.variant["oid"], "<ID>") for i in group}
        assert len(asks) >= 2, key


def test_family_c_notes_are_drawn_from_a_pool_not_copies_of_one_line():
    for inst in make("family_c", n=4):
        notes = [ln for ln in region(inst, "filler_rules").split("\n")[1:] if ln]    # after the notes header
        assert len(notes) == inst.variant["n_notes"] == 24
        bodies = [re.sub(r"^\S+ \S*\d+\S* ", "", ln) for ln in notes]   # without the numbered prefix
        assert len(set(bodies)) == 24
    assert len({inst.variant["n_notes"] for inst in make("family_c", n=6, n_notes=[3, 9])}) > 1
    assert {inst.variant["n_notes"] for inst in make("family_c", n=3, n_notes=5)} == {5}


@pytest.mark.parametrize("family, kw", CASES, ids=CASE_IDS)
def test_seeded_determinism(family, kw):
    assert fingerprint(make(family, n=5, seed=3, **kw)) == fingerprint(make(family, n=5, seed=3, **kw))
    a, b = make(family, n=5, seed=3, **kw), make(family, n=5, seed=4, **kw)
    assert sum(x.old_messages != y.old_messages for x, y in zip(a, b)) >= 8
    # an instance is the same whatever else is generated with it
    assert fingerprint(make(family, n=2, seed=3, controls=0, **kw)) == fingerprint(
        [i for i in make(family, n=5, seed=3, **kw) if i.kind == "gated"][:2])


def test_family_c_pair_and_order_share_their_draws():
    """The field / trigger pairs and both orders of one seed are the same instances (wording, ids, values)."""
    ref = make("family_c", n=4)
    for kw in ({"pair": "trigger"}, {"order": "field_first"}, {"pair": "trigger", "order": "field_first"}):
        other = make("family_c", n=4, **kw)
        for a, b in zip(ref, other):
            assert (a.variant["oid"], a.variant["rule"], a.variant["notes"]) == \
                   (b.variant["oid"], b.variant["rule"], b.variant["notes"])
            if a.kind == "control" or "pair" not in kw:      # the same lines, at most reordered
                assert sorted(content(a).split("\n")) == sorted(content(b).split("\n"))
            elif "order" not in kw:   # field vs trigger pair: they share the cancel arm (field == trigger == held)
                assert (content(a) == content(b)) != (content(a, "new") == content(b, "new"))


# ------------------------------------------------------------------------------------------- the two arms
@pytest.mark.parametrize("family, kw", CASES, ids=CASE_IDS)
def test_arms_differ_in_exactly_the_marked_value(family, kw):
    for inst in make(family, n=6, **kw):
        check_spans(inst.old_messages, inst.spans, inst.id)
        (mi, s, e), (mj, s2, e2) = inst.value_at
        old, new = content(inst), content(inst, "new")
        assert mi == mj == 0 and old[s:e] == inst.old_value and new[s2:e2] == inst.new_value
        assert old[:s] == new[:s2] and old[e:] == new[e2:] and inst.old_value != inst.new_value
        chars = labels_of(inst)
        trigger_pair = kw.get("pair") == "trigger" and inst.kind == "gated"
        value_label = "trigger" if trigger_pair else "field"
        assert set(chars[s:e]) == {value_label} and chars.count(value_label) == e - s
        assert old[s - 1] == " " and not old[e:e + 1].isalnum()     # the value stands apart from its neighbours
        line_start = old.rfind("\n", 0, s) + 1
        if trigger_pair:
            assert chars[line_start] == "gate"          # the trigger's line is the rule
            assert "field" not in chars and "fixed_field" in chars
        elif kw.get("task") == "natural":
            assert chars[s - 1] == "field_line"         # the state sentence, inside the paragraph
        else:
            assert chars[line_start] == "field_line"
        used = {lab for _, _, lab in inst.spans[0]}
        assert used <= set(LABELS) and {value_label, "task"} <= used
        assert ("field_line" in used) != trigger_pair
        (_, at_old), (_, at_new) = inst.note_at
        assert at_old > e and at_new - at_old == (e2 - s2) - (e - s)     # the note site lies after the value


TINY = ("tiny-llama", "tiny-gemma3")


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("family, kw", CASES, ids=CASE_IDS)
def test_pairs_token_align_on_the_tiny_tokenizer(model, family, kw):
    """Seeds 0-2, four instances: the words the tiny tokenizer's vocabulary is built from (kvnotes/tiny.py)."""
    from kvnotes.models import load_tokenizer, model_spec
    from kvnotes.readout import candidate_tokens
    spec = model_spec(model)
    tok = load_tokenizer(spec)
    for seed in range(3):
        for inst in make(family, n=4, seed=seed, **kw):
            pair = align(inst, tok, spec["prepend_bos"], spec.get("plain_prompt"))
            a, b = pair.span
            assert b - a == 1 and tok.convert_ids_to_tokens(pair.old_ids[a:b].tolist()) == [inst.old_value]
            labels = pair.token_info(tok)["labels"]
            trigger_pair = kw.get("pair") == "trigger" and inst.kind == "gated"
            assert labels[a:b] == ["trigger" if trigger_pair else "field"] and labels[-1] == "decision"
            cands = candidate_tokens(tok, list(inst.candidates))
            assert set(cands) == set(inst.candidates)


REAL = ("qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m")


@pytest.mark.parametrize("model", REAL)
def test_pools_align_on_the_cached_real_tokenizers(model):
    """The values of every pair tokenize to equal lengths and the answers keep first tokens of their own on the real
    tokenizers (tokenizer files only, no weights), when their converted caches exist on this machine."""
    from kvnotes.models import ModelCacheMissingError, load_tokenizer, model_spec
    from kvnotes.readout import candidate_tokens
    spec = model_spec(model)
    try:
        tok = load_tokenizer(spec)
    except ModelCacheMissingError:
        pytest.skip(f"{model}'s tokenizer is not cached here")
    for family, kw in CASES:
        for seed in range(2):
            for inst in make(family, n=6, seed=seed, **kw):
                pair = align(inst, tok, spec["prepend_bos"], spec.get("plain_prompt"))
                assert pair.span[1] - pair.span[0] >= 1
                candidate_tokens(tok, list(inst.candidates))


# ------------------------------------------------------------------------------------------- Family C specifics
def _status_line(inst, which="old") -> str:
    return re.search(r"^order_status: (\S+)$", content(inst, which), re.M).group(1)


def test_family_c_trigger_pairs_hold_the_field_and_field_pairs_hold_the_rule():
    for inst in make("family_c", n=8, pair="trigger"):
        assert inst.kind == "control" or inst.field == "trigger"
        if inst.kind == "gated":
            assert _status_line(inst) == _status_line(inst, "new") == inst.variant["field_old"]
            line = f"order_status: {inst.variant['field_old']}\n"
            assert region(inst, "fixed_field") == line                 # the held field line, byte for byte
            (_, s, e), _ = inst.value_at
            assert set(labels_of(inst)[s - 3:s] + labels_of(inst)[e:e + 3]) == {"gate"}     # inside the rule
    for inst in make("family_c", n=8, pair="field"):
        rule = region(inst, "gate")
        assert rule and rule in content(inst, "new")                    # the rule, byte for byte
        if inst.kind == "gated":
            assert (_status_line(inst), _status_line(inst, "new")) == (inst.old_value, inst.new_value)


@pytest.mark.parametrize("pair", ("field", "trigger"))
def test_field_first_puts_the_field_before_the_rule_and_rule_first_after(pair):
    for order in ("rule_first", "field_first"):
        for inst in make("family_c", n=4, pair=pair, order=order):
            text = content(inst)
            field_at = text.index("order_status: ")
            gate_at = labels_of(inst).index("gate")
            notes_at = labels_of(inst).index("filler_rules")
            assert (field_at < gate_at) == (order == "field_first")
            assert (field_at > notes_at) == (order == "rule_first")


def test_expected_answers_follow_the_rule_for_every_field_trigger_combination():
    assert {(f, t): gate_answer(f, t, {"allow": "cancel", "refuse": "deny"}) for f in STATUSES for t in STATUSES} \
        == {(f, t): "cancel" if f == t else "deny" for f in STATUSES for t in STATUSES}
    seen = set()
    for pair in ("field", "trigger"):
        for inst in make("family_c", n=24, pair=pair):
            v = inst.variant
            for which, answer in (("old", inst.expected_old), ("new", inst.expected_new)):
                field_value, trigger = v[f"field_{which}"], v[f"trigger_{which}"]
                assert _status_line(inst, which) == field_value           # what the prompt says, not just the record
                rule, = [ln for ln in content(inst, which).split("\n") if "order_status" in ln
                         and not ln.startswith("order_status:")]
                assert re.search(rf" {trigger}\b", rule)
                assert answer == ("cancel" if field_value == trigger else "deny")
                seen.add((field_value, trigger))
            assert inst.suffix == "Decision:" and inst.candidates == ("cancel", "deny")
            assert (inst.safe, inst.unsafe, inst.direction_known) == ("deny", "cancel", True)
            if inst.kind == "gated":
                assert flip_direction(inst) == inst.variant["direction"]
    assert seen == {(f, t) for f in STATUSES for t in STATUSES}


# ------------------------------------------------------------------------------------------- Family D specifics
def _directory_line(inst, which: str, key: str) -> str:
    """The directory line of `key` (a location or a person): "<Vault|Shelf|Freezer> <location> ..." in multihop,
    "- <name>..." in rag_lookup; exactly one per key."""
    rows = [ln for ln in content(inst, which).split("\n") if re.match(rf"^(- {key}\b|[A-Z][a-z]+ {key}\b)", ln)]
    assert len(rows) == 1, (key, rows)
    return rows[0]


@pytest.mark.parametrize("task", ("multihop", "rag_lookup"))
def test_lookup_answers_are_the_directory_entry_of_the_field(task):
    for inst in make("offtemplate", n=9, task=task):
        held = inst.variant.get("held")
        for which, answer in (("old", inst.expected_old), ("new", inst.expected_new)):
            key = held if inst.kind == "control" else (inst.old_value if which == "old" else inst.new_value)
            assert re.search(rf"\b{re.escape(answer)}\b", _directory_line(inst, which, key))
        assert inst.expected_old[0].lower() != inst.candidates[1][0].lower() or inst.kind == "control"
        assert len(inst.candidates) == 2 and inst.candidates[0][0].lower() != inst.candidates[1][0].lower()
        assert content(inst).rstrip().endswith("Answer:") and inst.suffix == ""


def test_natural_answers_follow_the_rule_stated_in_passing():
    data = load_task("natural")
    frames = {f["key"]: f for f in data["frames"]}
    directions = set()
    for inst in make("offtemplate", n=12, task="natural"):
        fr = frames[inst.variant["frame"]]
        allowed, refused = inst.variant["pair"]
        gate = region(inst, "gate")
        assert re.search(rf" {allowed}\b", gate) and re.search(rf" {refused}\b", gate)
        implied = {allowed: fr["answers"]["allow"], refused: fr["answers"]["refuse"]}
        if inst.kind == "gated":
            assert (inst.expected_old, inst.expected_new) == (implied[inst.old_value], implied[inst.new_value])
            directions.add(inst.old_value == allowed)
        else:
            assert inst.expected_old == inst.expected_new == implied[inst.variant["held"]]
        assert set(inst.candidates) == set(fr["answers"].values())
        assert content(inst).endswith("\nAction:") and "\n" not in content(inst)[:-len("\nAction:")]
    assert directions == {True, False}


@pytest.mark.parametrize("task", offtemplate.TASKS)
def test_offtemplate_margin_is_new_minus_old_with_no_restrictive_answer(task):
    for inst in make("offtemplate", n=4, task=task):
        assert inst.direction_known is False
        if inst.kind == "gated":
            assert (inst.safe, inst.unsafe) == (inst.expected_new, inst.expected_old) != (inst.expected_old,) * 2
            assert inst.candidates == (inst.expected_old, inst.expected_new)
            assert flip_direction(inst) == "unspecified"
        else:
            assert flip_direction(inst) is None and inst.unsafe == inst.expected_old


@pytest.mark.parametrize("family, kw", CASES, ids=CASE_IDS)
def test_controls_change_an_unused_detail_and_keep_the_answer(family, kw):
    data = load_task("family_c" if family == "family_c" else kw["task"])
    ctl = data["control"]
    before = ctl["line"].split("{value}")[0]
    for inst in make(family, n=6, **kw):
        if inst.kind != "control":
            assert inst.expected_old != inst.expected_new
            continue
        assert inst.expected_old == inst.expected_new and inst.field == ctl["field"]
        assert {inst.old_value, inst.new_value} <= set(ctl["values"])
        (_, s, _), _ = inst.value_at
        assert content(inst)[s - len(before):s] == before                # the control line, nothing else
        if family == "family_c":   # the gate still reads field vs trigger
            v = inst.variant
            assert inst.expected_old == gate_answer(v["field_old"], v["trigger_old"],
                                                    {"allow": "cancel", "refuse": "deny"})
    # controls of both answers occur
    answers = {i.expected_old for i in make(family, n=6, **kw) if i.kind == "control"}
    assert len(answers) >= 2


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("family, kw, match", [
    ("family_c", {"pair": "both"}, r"pair must be one of \('field', 'trigger'\)"),
    ("family_c", {"order": "middle"}, r"order must be one of \('rule_first', 'field_first'\)"),
    ("family_c", {"n_notes": -1}, r"n_notes is a count or a range"),
    ("family_c", {"n_notes": 10_000}, r"n_notes=10000: the note pools .* make \d+ distinct notes"),
    ("family_c", {"controls": -2}, r"controls must be an integer >= 0"),
    ("offtemplate", {"task": "poetry"}, r"task must be one of \('multihop', 'rag_lookup', 'natural'\)"),
    ("offtemplate", {"task": ["multihop", "sonnet"]}, r"task must be one of"),
    ("offtemplate", {"n_entries": [1, 3]}, r"n_entries is a count or a range .* 2 <= lo"),
    ("offtemplate", {"task": "natural", "n_entries": 3}, r"task natural has no directory"),
    ("offtemplate", {"task": "multihop", "n_entries": 40}, r"n_entries=40: .* locations"),
    ("offtemplate", {"task": "rag_lookup", "n_filler": 50}, r"n_filler=50: .* filler lines"),
])
def test_a_bad_param_raises_naming_the_accepted_values(family, kw, match):
    with pytest.raises(ValueError, match=match):
        make(family, n=2, **kw)


def _edit(tmp_path: Path, name: str, change) -> Path:
    """A copy of the shipped task files with one file's parsed YAML changed by `change(doc)`."""
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    path = data / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return data


@pytest.mark.parametrize("name, change, key, match", [
    ("multihop", lambda d: d["frames"][0].pop("stored"), "frames[0].stored", "missing"),
    ("multihop", lambda d: d["frames"][1]["stored"].append("The {item} sits on shelf{location}."),
     "frames[1].stored", "must follow a space"),
    ("multihop", lambda d: d.update(colour="red"), "colour", "unknown key"),
    ("multihop", lambda d: d["frames"][0].update(answers=["Tokyo", "alpha"]), "frames[0].answers",
     "also location names"),
    ("rag_lookup", lambda d: d["frames"][0]["duty"].append("Nobody is on duty for {oid}."), "frames[0].duty",
     r"must contain \{name\} exactly once"),
    ("rag_lookup", lambda d: d.update(names=["Alice", "Bob", "Alice"]), "names", "lists a word twice"),
    ("rag_lookup", lambda d: d["frames"][1].update(key="desk"), "frames", r"frame keys \['desk'\] occur twice"),
    ("natural", lambda d: d["frames"][2].update(answers={"allow": "ship", "refuse": "send"}), "frames[2].answers",
     "different characters"),
    ("natural", lambda d: d["frames"][0]["rules"].append("Admins get refunds, {refused} get the {team}."),
     "frames[0].rules", r"\{allowed\} exactly once|placeholder"),
    ("family_c", lambda d: d["rules"].append("RULE: cancel order {oid} always."), "rules",
     r"\{trigger\} exactly once"),
    ("family_c", lambda d: d["notes"]["predicates"].append("are never pending for long."), "notes.predicates",
     r"mentions \['pending'\]"),
    ("family_c", lambda d: d["control"].update(values=["web", "deny"]), "control.values", "nothing asks for"),
    ("family_c", lambda d: d.pop("answers"), "answers", "missing"),
])
def test_a_broken_task_file_names_the_file_and_the_key(tmp_path, name, change, key, match):
    data = _edit(tmp_path, name, change)
    family, kw = ("family_c", {}) if name == "family_c" else ("offtemplate", {"task": name})
    with pytest.raises(DataError, match=match) as e:
        make(family, n=2, data_dir=str(data), **kw)
    assert str(data / f"{name}.yaml") in str(e.value) and f"`{key}`" in str(e.value)


def test_invalid_yaml_and_a_missing_file_name_the_file(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    (data / "natural.yaml").write_text("frames: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML") as e:
        make("offtemplate", n=1, task="natural", data_dir=str(data))
    assert str(data / "natural.yaml") in str(e.value)
    (data / "rag_lookup.yaml").unlink()
    with pytest.raises(DataError, match="no such task file") as e:
        make("offtemplate", n=1, task="rag_lookup", data_dir=str(data))
    assert str(data / "rag_lookup.yaml") in str(e.value)


def test_the_shipped_task_files_load_and_the_registry_knows_both_families():
    for name in ("family_c", *offtemplate.TASKS):
        assert load_task(name)["source"] == str(DATA_DIR / f"{name}.yaml")
    assert scenarios.FAMILIES["family_c"] is offtemplate.make_family_c
    assert scenarios.FAMILIES["offtemplate"] is offtemplate.make_instances
    assert {i.variant["task"] for i in make("offtemplate", n=1)} == set(offtemplate.TASKS)   # task null: all three


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("scenario", ("offtemplate_multihop", "family_c"))
def test_run_py_lands_a_locality_record(tmp_path, scenario):
    out = tmp_path / "results"
    run_py(f"scenario={scenario}", "model=tiny-llama", "n_instances=1", f"results_dir={out}", "make_figures=false",
           "exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0",
           "stats.n_boot=200", hydra_dir=tmp_path / "hydra", timeout=600)
    rec = json.loads((out / "locality" / "tiny-llama" / f"{scenario}.json").read_text())
    cfg = yaml.safe_load((REPO / "configs" / "scenario" / f"{scenario}.yaml").read_text())
    expected = make(cfg["family"], n=1, **cfg["params"])
    rows = rec["instances"] + rec["excluded"] + rec["controls"]
    assert sorted(r["id"] for r in rows) == sorted(i.id for i in expected)
    assert rec["scenario"]["family"] == cfg["family"] and rec["summary"]["n_gated"] == 1
    assert rec["summary"]["n_controls"] == 1 and "field_only_recovery" in rec["aggregate"]
    gated = next(r for r in rows if r["kind"] == "gated")
    assert gated["tokens"]["span_old"] and gated["direction"] == (
        "unspecified" if cfg["family"] == "offtemplate" else "allow->refuse")
