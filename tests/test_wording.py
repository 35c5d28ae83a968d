"""The P9 wording probe on tiny models: the note lands where it should and nothing else changes, the cached path
equals a full forward of the modified prompt, the no-note variant is the plain decode, and clear errors on bad input."""
import dataclasses
import math

import pytest
import torch

import run as run_module
from kvnotes import kv
from kvnotes.models import load_model
from kvnotes.readout import candidate_tokens
from probes import wording
from scenarios import diverse, make_instances
from scenarios.base import Instance
from scenarios.render import align, render_text, tokenize
from test_run import _cfg
from conftest import N_DIVERSE

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
OPTS = wording.load_options()
NOTE = "[STATE UPDATE] {field} has changed to {new}; this overrides any earlier value AND any earlier conclusion."


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    torch.set_num_threads(1)
    return run_module.run(_cfg(tmp_path_factory.mktemp("wording"), "probe=wording", "model=tiny-llama", *RELAXED))


def _pair(lm, family, index=0, **params):
    inst = make_instances(family, n_instances=1, seed=0, **params)[index]
    return align(inst, lm.tokenizer, bool(lm.spec.get("prepend_bos")), lm.spec.get("plain_prompt"))


def _tokens(lm, inst):
    return [t for lst in candidate_tokens(lm.tokenizer, list(inst.candidates)).values() for _, t, _ in lst]


def _request(inst) -> str:
    """The request line of a diverse instance, rebuilt from the generator's tables (not from the prompt)."""
    v = inst.variant
    return diverse.domains()[v["domain"]].requests[v["request_variant"]].format(name=v["name"], oid=v["oid"])


@pytest.mark.parametrize("setting", wording.SETTINGS)
def test_note_sits_between_record_and_request_and_nothing_else_changes(setting):
    lm = load_model("tiny-llama")
    pair = _pair(lm, "diverse")
    inst = pair.instance
    note = NOTE.format(field=inst.field, new=inst.new_value)
    plain = pair.text_old if setting == "stale" else pair.text_new
    text, ids = wording.render_variant(lm, inst, setting, note)
    value = inst.old_value if setting == "stale" else inst.new_value
    assert text.count(note) == 1
    assert text.replace(note + "\n\n", "", 1) == plain                        # the only difference is the note
    last_record_line = ([f"{inst.field}: {value}"] + inst.variant["filler"])[-1]
    assert f"{last_record_line}\n\n{note}\n\n{_request(inst)}\nAnswer with one word" in text
    assert text.index(f"{inst.field}: {value}\n") < text.index(note)           # after the field
    assert torch.equal(ids, tokenize(text, lm.tokenizer, False))
    assert wording.render_variant(lm, inst, setting, None)[0] == plain       # no note: the aligned prompt


def test_note_placement_before_rule_and_family_a():
    lm = load_model("tiny-llama")
    inst = _pair(lm, "diverse", placement="before_rule").instance
    text, _ = wording.render_variant(lm, inst, "stale", "NOTE.")
    assert f"<|im_start|>user\nNOTE.\n\n{_request(inst)}\n" in text
    assert text.replace("NOTE.\n\n", "", 1) == render_text(inst.old_messages, lm.tokenizer)
    inst = _pair(lm, "family_a").instance
    text, _ = wording.render_variant(lm, inst, "oracle", "NOTE.")
    assert "before acting.\n\nNOTE.\n\nTASK\nDecide" in text
    assert text.replace("NOTE.\n\n", "", 1) == render_text(inst.new_messages, lm.tokenizer) + inst.suffix


@pytest.mark.parametrize("family", ["diverse", "family_a"])
def test_cached_prefix_plus_note_equals_a_full_prefill(tiny, family):
    # family_a on tiny-gemma3: the insertion point lies far beyond the sliding window (24)
    pair = _pair(tiny, family)
    raw = wording.measure(tiny, pair, _tokens(tiny, pair.instance), check_decode=True)
    assert raw["cached_vs_full_prefill_max_abs"] <= 1e-4
    assert raw["no_note_vs_plain_max_abs"] <= 1e-4
    for s in wording.SETTINGS:
        lay = raw["layout"][s]
        assert pair.span[1] <= lay["insert_at"] < pair.dpos
        assert lay["note_tokens"]["none"] == 0 and all(n > 0 for k, n in lay["note_tokens"].items() if k != "none")
    # independently: the stale cache up to the insertion point, then the note and the rest, vs the full forward
    text, ids = wording.render_variant(tiny, pair.instance, "stale", NOTE.format(field="f", new="n"))
    p = raw["layout"]["stale"]["insert_at"]
    assert torch.equal(ids[:p], pair.old_ids[:p])
    cache = kv.prefill(tiny.model, ids[p:-1], past=kv.prefill(tiny.model, pair.old_ids[:p]))
    got = kv.decode(tiny.model, [cache], int(ids[-1]))[0]
    assert float((got - kv.full_forward_last_logits(tiny.model, ids)).abs().max()) <= 1e-4


def test_no_note_reproduces_the_plain_stale_and_oracle_decodes(record):
    for row in record["instances"] + record["controls"]:
        for s in wording.SETTINGS:
            assert row["wording"][s]["none"]["m"] == pytest.approx(row[f"m_{s}"], abs=1e-4)
            assert row["wording"][s]["none"]["decision"] == row[f"dec_{s}"]
            plain, none = row["raw"]["states"][s], row["raw"]["wording"][s]["none"]
            assert none["logits"].keys() == plain["logits"].keys()
            assert max(abs(none["logits"][t] - plain["logits"][t]) for t in plain["logits"]) <= 1e-4
    assert record["sanity"]["no_note_vs_plain_max_abs"] <= 1e-4
    assert record["sanity"]["cached_vs_full_prefill_max_abs"] <= 1e-4


def test_recorded_logits_equal_an_independent_full_forward(record):
    lm = load_model("tiny-llama")
    row = record["instances"][3]
    inst = next(i for i in make_instances("diverse", n_instances=1, seed=0) if i.id == row["id"])
    note = NOTE.format(field=inst.field, new=inst.new_value)
    assert row["update_text"]["override_full"] == note
    for s, msgs in (("stale", inst.old_messages), ("oracle", inst.new_messages)):
        system, user = msgs
        request = _request(inst)
        i = user["content"].index(request)
        content = user["content"][:i] + note + "\n\n" + user["content"][i:]   # built here, not by the probe
        ids = tokenize(render_text((system, {"role": "user", "content": content}), lm.tokenizer), lm.tokenizer, False)
        full = kv.full_forward_last_logits(lm.model, ids)
        got = row["raw"]["wording"][s]["override_full"]
        assert max(abs(v - float(full[int(t)])) for t, v in got["logits"].items()) <= 1e-4
        assert got["lse"] == pytest.approx(float(torch.logsumexp(full, -1)), abs=1e-4)
        ro = next(g for g in record["readout"]["per_group"] if g["unsafe"] == inst.unsafe)
        m = float(full[ro["safe_id"]] - full[ro["unsafe_id"]])
        assert row["wording"][s]["override_full"]["m"] == pytest.approx(m, abs=1e-4)


def test_unknown_variant_and_bad_options_are_clear_errors():
    table = wording.check_options(**OPTS)["variants"]
    with pytest.raises(KeyError, match="unknown wording variant 'bogus'.*conclusion"):
        wording.update_text(table, "bogus", "f", "a", "b")
    with pytest.raises(ValueError, match="baseline names the unknown variant 'nothing'"):
        wording.check_options(OPTS["variants"], "nothing", OPTS["paired_test"])
    with pytest.raises(ValueError, match="paired_test names the unknown variant 'override'"):
        wording.check_options(OPTS["variants"], "none", ["override", "conclusion"])
    with pytest.raises(ValueError, match=r"unknown placeholders \['value'\]"):
        wording.check_options({**OPTS["variants"], "x": {"label": "x", "text": "{field} = {value}"}}, "none", None)
    lm = load_model("tiny-llama")
    pair = _pair(lm, "diverse")
    with pytest.raises(ValueError, match="unknown placeholders"):
        wording.measure(lm, pair, _tokens(lm, pair.instance), variants={"none": {"label": "none", "text": None},
                                                                         "bad": {"text": "{nope}"}})


def test_unsupported_family_is_a_clear_error():
    msgs = ({"role": "user", "content": "status: open\nDo it? Answer yes or no."},)
    other = Instance("x/000", "x", "gated", "status", "open", "closed", msgs, msgs, "no", "yes", "yes", "no",
                     ("yes", "no"))
    with pytest.raises(wording.UnsupportedFamilyError, match="marked no update-note site.*supports diverse"):
        wording.insertion_site(other)
    with pytest.raises(wording.UnsupportedFamilyError, match="marked no update-note site"):
        wording.insert_update(other, other.old_messages, "NOTE.")


@pytest.mark.parametrize("layout", ["field_first_user", "record_assistant_turn", "family_a_blocks"])
def test_note_goes_before_the_request_in_every_layout(layout):
    inst = make_instances("diverse", n_instances=1, seed=0, layout=layout, domains=["order_cancel"], controls=0)[0]
    for msgs in (inst.old_messages, inst.new_messages):
        out = wording.insert_update(inst, msgs, "NOTE.")
        joined = "\n".join(m["content"] for m in out)
        assert joined.replace("NOTE.\n\n", "", 1) == "\n".join(m["content"] for m in msgs)
        assert f"NOTE.\n\n{_request(inst)}\nAnswer with one word" in joined
    assert wording.insertion_site(inst) == f"{layout}/message {inst.note_at[0][0]}"


def test_mcnemar_exact():
    t = wording.mcnemar_exact([True] * 5 + [False] * 3, [False] * 5 + [False] * 3)
    assert (t["k_first_only"], t["k_second_only"], t["n_discordant"]) == (5, 0, 5)
    assert t["p_exact_two_sided"] == pytest.approx(2 / 32) and not t["significant"]
    t = wording.mcnemar_exact([True] * 9 + [False], [False] * 9 + [True])
    assert t["p_exact_two_sided"] == pytest.approx(2 * 11 / 1024) and t["significant"]
    assert wording.mcnemar_exact([True, False], [True, False])["p_exact_two_sided"] == 1.0
    # statsmodels' exact test equals the closed form it replaced: 2 P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1
    for b in range(9):
        for c in range(9):
            t = wording.mcnemar_exact([True] * b + [False] * c + [True], [False] * b + [True] * c + [True])
            n = b + c
            want = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
            assert (t["k_first_only"], t["k_second_only"], t["n_pairs"]) == (b, c, n + 1)
            assert t["p_exact_two_sided"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="different lengths"):
        wording.mcnemar_exact([True], [True, False])


def test_record_layout(record):
    for key in ("experiment", "paper_refs", "readout", "instances", "excluded", "controls", "wording", "aggregate",
                "sanity", "summary"):
        assert key in record, key
    assert record["experiment"] == "wording" and record["paper_refs"] == ["P9", "§3.9", "Fig. 3d"]
    s = record["summary"]
    assert (s["n_gated"], s["n_included"], s["n_controls"], s["n_variants"]) == (N_DIVERSE, N_DIVERSE, 1, 5)
    keys = list(OPTS["variants"])
    assert record["wording"]["labels"] == {k: v["label"] for k, v in OPTS["variants"].items()}
    agg = record["aggregate"]
    for s in wording.SETTINGS:
        for k in keys:
            p = agg["p_decision_is_new_action"][s][k]
            assert {"mean", "ci", "ci_method", "n", "k", "per_scenario"} <= set(p) and p["n"] == N_DIVERSE
            assert p["k"] == sum(r["wording"][s][k]["decision"] == r["expected_new"] for r in record["instances"])
            by_dir = agg["p_safe_by_direction"][s][k]
            for d in ("new_implies_safe", "new_implies_permissive"):     # n_instances=1: every flip is k = 0's
                rows = [r for r in record["instances"] if r["direction"] == d]
                assert by_dir[d]["n"] == len(rows) == (10 if d == "new_implies_safe" else 0)
                assert by_dir[d]["k"] == sum(r["wording"][s][k]["decision"] == "deny" for r in rows)
            assert {"mean", "ci", "ci_method", "n_clusters"} <= set(agg["margin_shift_vs_baseline"][s][k])
        assert agg["margin_shift_vs_baseline"][s]["none"]["mean"] == 0.0
        assert set(agg["paired_tests_vs_baseline"][s]) == set(keys) - {"none"}
        w16 = agg["w16_paired_test"][s]
        assert (w16["first"], w16["second"]) == ("override_full", "conclusion")
        assert {"p_exact_two_sided", "n_discordant", "wilson_cis_overlap", "method"} <= set(w16)
        assert agg["control_p_decision_is_expected"][s]["none"]["n"] == 1
    for row in record["instances"]:
        assert set(row["wording"]["stale"]) == set(keys) and row["site"] == "rule_first/message 1"
        assert set(row["raw"]["wording"]["oracle"][keys[0]]) == {"logits", "lse"}
