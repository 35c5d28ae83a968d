"""The `pairs` scenario family (a researcher's own prompt pairs, scenarios/pairs.py): a generated family exported and
read back measures exactly what the family does; bad entries are named by line and reason (strict: the first stops
the run; otherwise each is recorded under `rejected` and the rest run); coarse labels always, fine labels where the
file gives regions; probes that need more than aligned pairs say so before the model loads."""
import json

import pytest
from hydra import compose, initialize_config_dir

import run as run_module
from kvnotes.models import REPO_ROOT, load_model
from probes.base import ProbeConfigError
from scenarios import pairs
from scenarios.export import ExportError, export
from scenarios.render import align

CONFIGS = str(REPO_ROOT / "configs")
RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
SYSTEM = "You are a customer-support assistant for an online store.\nPolicy:\n- Be polite and keep answers short."


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIGS):
        return compose(config_name="config", overrides=[f"results_dir={tmp_path / 'results'}", "make_figures=false",
                                                        "n_instances=1", "stats.n_boot=500", "model=tiny-llama",
                                                        *overrides])


def _pair(pid="p/1", cluster="p", old="pending", new="shipped", answers=("cancel", "deny"), **extra):
    """A valid entry in the tiny tokenizer's vocabulary (every word occurs in the domain files)."""
    def msgs(v):
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"ORDER RECORD\norder_status: {v}\nchannel: web\n\nI want order F10548 "
                                            f"cancelled, please.\nAnswer with one word, cancel or deny."}]
    return {"id": pid, "cluster": cluster, "old": msgs(old), "new": msgs(new),
            "answers": {"old": answers[0], "new": answers[1]}, **extra}


def _write(path, entries, raw_lines=()):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + "".join(r + "\n" for r in raw_lines))
    return path


def _comparable(record):
    """What must be identical between a family's record and its exported file's: every number and every row, minus
    the scenario's name / file and the run's timing and provenance."""
    r = json.loads(json.dumps(record))
    for k in ("timing", "provenance", "config", "scenario", "rejected"):
        r.pop(k, None)
    r["summary"].pop("n_rejected", None)
    for part in ("instances", "excluded", "controls"):
        for row in r[part]:
            row.pop("source", None)
    return r


# ---------------------------------------------------------------- a generated family, exported and read back
@pytest.mark.parametrize("probe", ["locality", "positions"])
def test_an_exported_family_gives_the_family_s_record(tmp_path, probe):
    path = export(["family=diverse", "n_instances=1"], tmp_path / "diverse.jsonl")
    family = run_module.run(_cfg(tmp_path, f"probe={probe}", *RELAXED))
    again = run_module.run(_cfg(tmp_path, f"probe={probe}", "scenario=pairs", f"scenario.path={path}", *RELAXED))
    assert again["rejected"] == [] and again["summary"]["n_rejected"] == 0
    assert all(r["source"].startswith("diverse.jsonl:") for r in again["instances"] + again["controls"])
    assert again["instances"], "the relaxed rule includes every gated pair"
    assert _comparable(again) == _comparable(family)           # identical numbers, rows, labels and readouts
    assert (tmp_path / "results" / probe / "tiny-llama" / "pairs-diverse.json").exists()   # tagged by the file
    assert again["scenario"]["params"]["sha256"] == pairs.file_sha256(path)
    assert again["scenario"]["n_instances_per_scenario"] is None


def test_export_round_trips_through_yaml_and_refuses_to_overwrite(tmp_path):
    yml = export(["scenario=diverse_field_first", "n_instances=1", "scenario.params.n_gates=2"], tmp_path / "ff.yaml")
    jsl = export(["scenario=diverse_field_first", "n_instances=1", "scenario.params.n_gates=2"], tmp_path / "ff.jsonl")
    a, rej_a = pairs.load(yml)
    b, rej_b = pairs.load(jsl)
    assert not rej_a and not rej_b and a == b
    assert [(i.spans, i.value_at, i.note_at, i.variant) for i in a] == [(i.spans, i.value_at, i.note_at, i.variant)
                                                                         for i in b]
    assert not any(i.partial_spans for i in a)                  # the generator's labels tile every message
    with pytest.raises(ExportError, match="exists; pass overwrite=true"):
        export(["family=diverse"], jsl)
    with pytest.raises(ExportError, match=r"\.jsonl, \.yaml or \.yml"):
        export(["family=diverse"], tmp_path / "x.csv")


# ---------------------------------------------------------------- bad entries: named by line and reason
BAD = [
    ("missing key", lambda: {k: v for k, v in _pair().items() if k != "answers"}, "missing key 'answers'"),
    ("unknown key", lambda: {**_pair(), "clustr": "x"}, "unknown key 'clustr'"),
    ("identical prompts", lambda: _pair(new="pending"), "identical"),
    ("two messages differ", lambda: {**_pair(), "new": [{"role": "system", "content": SYSTEM + " Yes."},
                                                        _pair(new="shipped")["new"][1]]}, "differ in 2 messages"),
    ("values do not cover the change", lambda: _pair(values={"old": "pend", "new": "ship"}), "do not cover"),
    ("answers not a mapping", lambda: {**_pair(), "answers": ["cancel", "deny"]}, "'answers' must be"),
    ("control without a second word", lambda: _pair(answers=("cancel", "cancel")), "needs 'candidates'"),
    ("kind contradicts the answers", lambda: _pair(kind="control"), "'kind' says 'control'"),
    ("restrictive not an answer", lambda: _pair(restrictive="hold", candidates=["cancel", "deny", "hold"]),
     "must be one of the answers"),
    ("region outside the message", lambda: _pair(regions=[[1, 0, 10_000, "record"]]), "not inside message 1"),
    ("regions overlap", lambda: _pair(regions=[[1, 0, 20, "record"], [1, 10, 30, "request"]]), "overlap"),
    ("a label that is not a name", lambda: _pair(regions=[[1, 0, 5, "my label"]]), "a label is a name"),
    ("note inside the value", lambda: _pair(note_at=[1, 29]), "before the end of the changing value"),
]


@pytest.mark.parametrize("name,make,reason", BAD, ids=[b[0] for b in BAD])
def test_a_bad_entry_is_rejected_with_its_line_and_reason(tmp_path, name, make, reason):
    path = _write(tmp_path / "p.jsonl", [_pair("ok/1"), make(), _pair("ok/2", old="shipped", new="pending",
                                                                       answers=("deny", "cancel"))])
    instances, rejected = pairs.load(path)
    assert [i.id for i in instances] == ["ok/1", "ok/2"]
    [r] = rejected
    assert r.line == 2 and r.stage == "parse" and reason in r.reason, r
    with pytest.raises(pairs.PairError, match=rf"p\.jsonl line 2.*{reason}"):
        pairs.load(path, strict=True)


def test_unreadable_lines_duplicates_and_whole_file_problems(tmp_path):
    path = _write(tmp_path / "p.jsonl", [_pair("a/1"), _pair("a/1")], raw_lines=["{not json"])
    instances, rejected = pairs.load(path)
    assert [i.id for i in instances] == ["a/1"]
    assert [r.line for r in rejected] == [2, 3] and rejected[0].reason.startswith("duplicate id 'a/1' (first on line 1)")
    assert rejected[1].reason == "not a JSON object: Expecting property name enclosed in double quotes (column 2)"
    with pytest.raises(pairs.PairsFileError, match="no pairs file at .*scenario.path="):
        pairs.load(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(pairs.PairsFileError, match="JSON Lines"):
        pairs.load(tmp_path / "p.csv")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(pairs.PairsFileError, match="holds no pairs"):
        pairs.load(tmp_path / "e.jsonl")
    (tmp_path / "m.yaml").write_text("id: x\n")
    with pytest.raises(pairs.PairsFileError, match="a list of mappings"):
        pairs.load(tmp_path / "m.yaml")
    with pytest.raises(pairs.PairsFileError, match="changed since the record"):
        pairs.load(path, sha256="0" * 64)


def test_yaml_entries_are_numbered_by_their_line(tmp_path):
    import yaml
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump([_pair("a/1"), {**_pair("a/2"), "clustr": 1}], sort_keys=False))
    instances, [r] = pairs.load(path)
    first_line_of_second = path.read_text().splitlines().index("- id: a/2") + 1
    assert [i.id for i in instances] == ["a/1"] and r.line == first_line_of_second and "clustr" in r.reason


def test_values_default_to_whole_words_and_margin_words_follow_the_file(tmp_path):
    inst = pairs.parse_entry(_pair(old="pending", new="paid"), 1)
    assert (inst.old_value, inst.new_value) == ("pending", "paid")      # not "ending" / "aid"
    assert (inst.safe, inst.unsafe, inst.direction_known) == ("deny", "cancel", False)   # m = logit(new) - logit(old)
    inst = pairs.parse_entry(_pair(restrictive="deny"), 1)
    assert (inst.safe, inst.unsafe, inst.direction_known) == ("deny", "cancel", True)
    inst = pairs.parse_entry(_pair(answers=("cancel", "cancel"), candidates=["cancel", "deny"]), 1)
    assert inst.kind == "control" and (inst.safe, inst.unsafe) == ("deny", "cancel")
    inst = pairs.parse_entry(_pair(values={"old": "status: pending", "new": "status: shipped"}), 1)
    assert inst.old_value == "status: pending"


# ---------------------------------------------------------------- tokenizer-level problems, through run.py
def test_tokenizer_problems_are_recorded_and_strict_stops(tmp_path):
    entries = [_pair("ok/1"), _pair("ok/2", old="shipped", new="pending", answers=("deny", "cancel")),
               _pair("unequal/1", new="on hold"),                              # 1 token vs 2
               _pair("unknown/1", old="qqzzq", new="zzqqz"),                    # both <unk>: the prompts tokenize alike
               _pair("leaves/1", old="pending", new="pendinx", values={"old": "g", "new": "x"}),   # token > value
               _pair("answers/1", answers=("zzqq", "qqzz"), candidates=["zzqq", "qqzz"])]       # no token of its own
    path = _write(tmp_path / "t.jsonl", entries)
    rec = run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", *RELAXED))
    got = {r["id"]: (r["line"], r["stage"], r["reason"]) for r in rec["rejected"]}
    assert set(got) == {"unequal/1", "unknown/1", "leaves/1", "answers/1"}
    assert got["unequal/1"][:2] == (3, "tokenizer") and "different lengths" in got["unequal/1"][2]
    assert "tokenize identically" in got["unknown/1"][2]
    assert "outside the value" in got["leaves/1"][2]
    assert "no first token of its own" in got["answers/1"][2]
    assert sorted(r["id"] for r in rec["instances"] + rec["excluded"]) == ["ok/1", "ok/2"]
    assert rec["summary"]["n_rejected"] == 4 and all(r["source"].startswith("t.jsonl:") for r in rec["instances"])
    with pytest.raises(pairs.PairError, match=r"t\.jsonl \(strict=true\) line 3 \(unequal/1\).*different lengths"):
        run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", "strict=true", "tag=strict"))


def test_no_usable_pair_stops_before_the_model_loads(tmp_path, monkeypatch):
    path = _write(tmp_path / "bad.jsonl", [_pair(new="pending")])
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ProbeConfigError, match=r"(?s)no usable pair.*line 1 \(p/1\).*identical"):
        run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}"))
    with pytest.raises(pairs.PairError, match=r"bad\.jsonl.*strict=true.*line 1 \(p/1\).*identical"):
        run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", "strict=true"))


# ---------------------------------------------------------------- labels, plain prompts, probes that need more
def test_coarse_labels_always_fine_labels_where_given():
    lm = load_model("tiny-llama")
    plain = align(pairs.parse_entry(_pair(), 1), lm.tokenizer, lm.spec["prepend_bos"])
    labels = plain.token_info(lm.tokenizer)["labels"]
    a, b = plain.span
    assert set(labels[:a]) <= {"prefix", "template"} and labels[a:b] == ["field"] * (b - a)
    assert set(labels[b:plain.dpos]) <= {"downstream", "template"} and labels[plain.dpos] == "decision"
    assert labels[:a].count("prefix") > 0 and labels[b:plain.dpos].count("downstream") > 0
    content = _pair()["old"][1]["content"]
    q = content.index("I want")
    fine = align(pairs.parse_entry(_pair(regions=[[1, q, len(content), "request"]]), 1), lm.tokenizer,
                 lm.spec["prepend_bos"])
    fl = fine.token_info(lm.tokenizer)["labels"]
    req = [i for i, x in enumerate(fl) if x == "request"]
    assert req and min(req) > b and fl[:req[0]] == labels[:req[0]]     # the rest keeps the coarse labels


def test_a_plain_pair_is_the_raw_text(tmp_path):
    lm = load_model("tiny-llama")
    text = "ORDER RECORD\norder_status: {}\n\nI want order F10548 cancelled, please.\nAnswer with one word, cancel or deny.\n"
    inst = pairs.parse_entry({"id": "r/1", "cluster": "r", "plain": True, "old": text.format("pending"),
                              "new": text.format("shipped"), "answers": {"old": "cancel", "new": "deny"}}, 1)
    pair = align(inst, lm.tokenizer, lm.spec["prepend_bos"])
    assert pair.text_old == text.format("pending")               # no chat template around it
    assert "template" not in pair.token_info(lm.tokenizer)["labels"][1:]


def test_wording_needs_note_sites_and_dose_needs_its_family(tmp_path, monkeypatch):
    site = _pair()["old"][1]["content"].index("I want")
    path = _write(tmp_path / "w.jsonl", [_pair("a/1", note_at=[1, site]), _pair("a/2")])
    with pytest.raises(ProbeConfigError, match=r"(?s)probe .wording. cannot use 1 of the 2 pairs.*line 2 \(a/2\).*note"):
        run_module.run(_cfg(tmp_path, "probe=wording", "scenario=pairs", f"scenario.path={path}", "strict=true"))
    insts, rejected = run_module.check_instances(run_module.load_probe("wording"), *pairs.load(path), lenient=True)
    assert [i.id for i in insts] == ["a/1"] and [(r.id, r.stage) for r in rejected] == [("a/2", "probe")]
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ProbeConfigError, match=r"probe 'dose' cannot run on scenario 'pairs'.*Fix:"):
        run_module.run(_cfg(tmp_path, "probe=dose", "scenario=pairs", f"scenario.path={path}"))


def test_a_changed_file_is_a_different_config(tmp_path):
    path = _write(tmp_path / "c.jsonl", [_pair("a/1"), _pair("a/2", old="shipped", new="pending",
                                                              answers=("deny", "cancel"))])
    run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", *RELAXED))
    _write(path, [_pair("a/1")])
    with pytest.raises(run_module.RecordConflictError, match="sha256"):
        run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", *RELAXED))
    with pytest.raises(pairs.PairsFileError, match="changed since the record"):
        run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", "reanalyse=true", "tag=c"))


def test_a_pairs_record_re_analyses_from_its_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "r.jsonl", [_pair("a/1"), _pair("a/2", old="shipped", new="pending",
                                                              answers=("deny", "cancel"))])
    first = run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", *RELAXED))
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("re-analysis loaded the model"))
    again = run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", "reanalyse=true", *RELAXED))
    assert again["config"]["scenario"]["params"]["sha256"] == first["config"]["scenario"]["params"]["sha256"]
    assert again["reanalysed"][0]["scenario_config_migrated"] == []
    assert again["aggregate"] == first["aggregate"] and again["instances"] == first["instances"]


def test_review_findings_stay_fixed(tmp_path):
    """Separate edits are not merged into one "value"; duplicate keys, YAML booleans, an empty YAML file, a byte-order
    mark, a note before the field and a note at the end of a plain prompt are all named."""
    two = _pair()
    two["new"][1]["content"] = two["new"][1]["content"].replace("web", "app")
    with pytest.raises(ValueError, match=r"more than one place \('pending' -> 'shipped'; 'web' -> 'app'\)"):
        pairs.parse_entry(two, 1)
    assert pairs.parse_entry({**two, "values": {"old": "pending\nchannel: web", "new": "shipped\nchannel: app"}},
                             1).old_value == "pending\nchannel: web"          # given as one value: taken as one
    (tmp_path / "d.jsonl").write_text('{"id": "a", "id": "b"}\n')
    [(line, err)] = pairs.read_entries(tmp_path / "d.jsonl")
    assert line == 1 and "duplicate key 'id'" in str(err)
    (tmp_path / "d.yaml").write_text("- id: a\n  cluster: x\n  cluster: y\n")
    assert "duplicate key 'cluster'" in str(pairs.read_entries(tmp_path / "d.yaml")[0][1])
    (tmp_path / "e.yaml").write_text("# nothing yet\n")
    with pytest.raises(pairs.PairsFileError, match="holds no pairs"):
        pairs.load(tmp_path / "e.yaml")
    with pytest.raises(ValueError, match="quote it"):
        pairs.parse_entry({**_pair(), "answers": {"old": True, "new": False}}, 1)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps(_pair()) + "\n", encoding="utf-8")
    assert [i.id for i in pairs.load(tmp_path / "bom.jsonl")[0]] == ["p/1"]
    with pytest.raises(ValueError, match="before the end of the changing value"):
        pairs.parse_entry(_pair(note_at=[0, 10]), 1)                 # in the system message, before the field
    text = "order_status: {}\nAnswer with one word, cancel or deny."
    with pytest.raises(ValueError, match="end of a plain prompt"):
        pairs.parse_entry({"id": "r", "cluster": "r", "plain": True, "old": text.format("pending"),
                           "new": text.format("shipped"), "answers": {"old": "cancel", "new": "deny"},
                           "note_at": [0, len(text.format("pending"))]}, 1)
    with pytest.raises(ValueError, match=r"missing key 'answers'; unknown key 'answer'"):
        pairs.parse_entry({**{k: v for k, v in _pair().items() if k != "answers"}, "answer": {}}, 1)


def test_a_model_without_a_role_layout_rejects_the_pair_with_the_reason(tmp_path):
    entry = _pair("a/2")
    entry["old"].insert(1, {"role": "assistant", "content": "Let me check."})
    entry["new"].insert(1, {"role": "assistant", "content": "Let me check."})
    path = _write(tmp_path / "a.jsonl", [_pair("a/1"), entry])
    layout = "model.plain_prompt={system: '{content} ', user: '{content} ', generation: 'Answer:'}"
    rec = run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", layout, *RELAXED))
    [r] = rec["rejected"]
    assert (r["id"], r["line"], r["stage"]) == ("a/2", 2, "tokenizer") and "role 'assistant'" in r["reason"]
    with pytest.raises(pairs.PairError, match=r"a\.jsonl \(strict=true\) line 2 \(a/2\).*role 'assistant'"):
        run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", layout, "strict=true", "tag=s"))


def test_a_duplicate_id_and_a_pair_the_probe_cannot_measure_leave_the_rest(tmp_path, monkeypatch):
    import probes.locality as locality
    real = locality.measure

    def measure(lm, pair, *a, **k):
        if pair.instance.id == "b/1":
            raise RuntimeError("b/1: this probe cannot take it")
        return real(lm, pair, *a, **k)
    monkeypatch.setattr(locality, "measure", measure)
    path = _write(tmp_path / "u.jsonl", [_pair("a/1"), _pair("a/1"), _pair("b/1"),
                                         _pair("c/1", old="shipped", new="pending", answers=("deny", "cancel"))])
    rec = run_module.run(_cfg(tmp_path, "scenario=pairs", f"scenario.path={path}", *RELAXED))
    assert sorted(r["id"] for r in rec["instances"] + rec["excluded"]) == ["a/1", "c/1"]   # the first a/1 stays
    assert [(r["line"], r["id"], r["stage"]) for r in rec["rejected"]] == [(2, "a/1", "parse"), (3, "b/1", "probe")]


@pytest.mark.parametrize("probe", ["locality", "positions", "layers", "topk", "knockout", "attribution", "wording"])
def test_every_probe_that_needs_only_aligned_pairs_runs_on_a_pairs_file(tmp_path, probe):
    site = _pair()["old"][1]["content"].index("I want")
    entries = [_pair("a/1", cluster="a", note_at=[1, site], restrictive="deny"),
               _pair("b/1", cluster="b", old="shipped", new="pending", answers=("deny", "cancel"),
                     note_at=[1, site], restrictive="deny"),
               _pair("c/1", cluster="c", note_at=[1, site], restrictive="deny")]
    path = _write(tmp_path / "all.jsonl", entries)
    rec = run_module.run(_cfg(tmp_path, f"probe={probe}", "scenario=pairs", f"scenario.path={path}", *RELAXED))
    assert rec["rejected"] == [] and rec["summary"]["n_included"] == 3
    assert sorted(r["source"] for r in rec["instances"]) == ["all.jsonl:1", "all.jsonl:2", "all.jsonl:3"]
