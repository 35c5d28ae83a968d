"""D1 / D2 on Family B trigger pairs (paper_spec §3.10, §3.11, §8 W13): the logit lens at the decision token and the
commit layer (probes/decodability.py), the trigger-pair targets and the disagreeing samples, the layer sweep of the
notes alone (probes/layers.py positions=downstream), and `run.py -m experiment=deep_d1` end to end on tiny-llama."""
import json

import numpy as np
import pytest
import torch
import yaml

import run as run_module
from kvnotes import kv
from kvnotes.engine import unembed
from kvnotes.models import REPO_ROOT
from probes import decodability as dec
from probes import layers as layers_probe
from probes import locality
from scenarios import diverse, make_instances
from test_run import _cfg
from conftest import assert_write_minus_commit, config_domains, run_py

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")
TRIGGER_PARAMS = yaml.safe_load((REPO_ROOT / "configs" / "scenario" / "diverse_trigger.yaml").read_text())["params"]
N_TRIGGER = len(config_domains("diverse_trigger"))


def _trigger_instances(n_instances=1):
    return make_instances("diverse", n_instances=n_instances, seed=0, **TRIGGER_PARAMS)


def _token_ids(lm, inst) -> list:
    from kvnotes.readout import candidate_tokens
    return sorted({t for lst in candidate_tokens(lm.tokenizer, list(inst.candidates)).values() for _, t, _ in lst})


# ---------------------------------------------------------------------------------------------- the logit lens
@pytest.fixture
def shaped_norm():
    """shaped_norm(model): the model's final norm weights perturbed for one test (restored after). A random-init
    norm has unit gains, so applying it twice changes almost nothing; with uneven gains a lens that normed twice, or
    not at all, is caught."""
    saved = []

    def shape(model):
        weight = dec.final_norm(model).weight
        saved.append((weight, weight.detach().clone()))
        with torch.no_grad():
            weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    yield shape
    with torch.no_grad():
        for weight, before in saved:
            weight.copy_(before)


def test_logit_lens_at_the_last_layer_is_the_models_own_decision(tiny, get_pair, shaped_norm, single_thread):
    pair = get_pair(tiny, "diverse")
    model = tiny.model
    shaped_norm(model)
    anchors = dec.anchor_positions(pair)
    res, logits, stream = dec.anchor_residuals(model, pair.old_ids, anchors)
    n_layers = model.config.num_hidden_layers
    assert stream.shape == (n_layers + 1, model.config.hidden_size) and res.shape[1] == n_layers + 1
    lens = dec.logit_lens(model, stream)                                   # [n_layers + 1, vocab]
    ref = kv.full_forward_last_logits(model, pair.old_ids)                # an independent forward
    scale = float(ref.abs().max())
    assert float((lens[-1] - ref).abs().max()) <= 1e-5 * scale
    assert float((lens[-1] - logits).abs().max()) <= 1e-5 * scale
    # earlier indices are other readings (the comparison is not of a row with itself)
    assert float((lens[0] - ref).abs().max()) > 1e-3 * scale
    # indices below n_layers are HF's hidden_states at the decision position, the last one the final norm's input:
    # HF's own last entry is the norm's *output*; reading it through the norm again, or the input without the norm,
    # gives other logits
    with torch.inference_mode():
        hs = model(input_ids=pair.old_ids[None], output_hidden_states=True).hidden_states
        assert torch.allclose(stream[:-1], torch.stack([h[0, -1] for h in hs[:-1]]), atol=1e-6)
        assert torch.allclose(dec.final_norm(model)(stream[-1]), hs[-1][0, -1], atol=1e-5)
        twice = unembed(model, dec.final_norm(model)(hs[-1][0, -1:]))[0]
        unnormed = unembed(model, stream[-1:])[0]
    assert float((twice - ref).abs().max()) > 1e-3 * scale
    assert float((unnormed - ref).abs().max()) > 1e-3 * scale
    # the candidate-token rows measure() keeps are the same lens, token order sorted
    ids = [5, 9, 17]
    assert torch.allclose(dec.logit_lens(model, stream, ids), lens[:, ids])


def test_logit_lens_follows_gemma_soft_capping_and_tied_embeddings(tiny_by_name, get_pair, monkeypatch,
                                                                   single_thread):
    lm = tiny_by_name("tiny-gemma3")
    model = lm.model
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    pair = get_pair(lm, "diverse")
    monkeypatch.setattr(model.config, "final_logit_softcapping", 0.5)   # small, so that capping moves the logits
    _, logits, stream = dec.anchor_residuals(model, pair.old_ids, dec.anchor_positions(pair))
    assert float(logits.abs().max()) <= 0.5                             # the model's forward capped its logits
    lens = dec.logit_lens(model, stream)
    assert float((lens[-1] - logits).abs().max()) < 1e-5
    with torch.inference_mode():
        uncapped = model.get_output_embeddings()(dec.final_norm(model)(stream[-1:]))[0].float()
    assert float((uncapped - logits).abs().max()) > 1e-2                  # without the cap the lens would be wrong


# ---------------------------------------------------------------------------------------------- commit layer
@pytest.mark.parametrize("signs, expected, want", [
    ([-1, 1, -1, 1, 1], 1, 3),          # right from index 3 on (the flip at index 1 does not last)
    ([1, 1, 1, 1, 1], 1, 0),            # right everywhere: commits at the embeddings
    ([1, 1, 1, 1, -1], 1, None),        # wrong at the last layer: never commits
    ([1, -1, -1, 1, -1], -1, 4),        # permissive: m < 0 expected
    ([-1, -1, 0, -1, -1], -1, 3),       # a margin of exactly 0 has no sign
    ([1, 1, 1, 1, 0], 1, None),
])
def test_commit_layer_of_synthetic_margin_paths(signs, expected, want):
    m = [0.7 * s for s in signs]
    assert dec.commit_layer(m, expected) == want


def test_commit_layer_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="expected must be"):
        dec.commit_layer([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="non-empty"):
        dec.commit_layer([], 1)


def test_commit_summary_counts_never_committing_arms_by_class():
    def row(rid, scen, c_old, c_new):     # conclusion of old = 1 (restrictive), of new = 0
        return {"id": rid, "scenario": scen, "commit_layer": {"old": c_old, "new": c_new},
                "labels": {"old": {"conclusion": 1}, "new": {"conclusion": 0}}}
    rows = [row("a1", "a", 2, None), row("a2", "a", 4, 1), row("b1", "b", None, None), row("c1", "c", 3, 4)]
    out = dec.commit_summary(rows, 4, {"n_boot": 200, "alpha": 0.05, "seed": 0})
    assert (out["n_arms"], out["n_committed"], out["n_never"]) == (8, 5, 3)
    assert out["never_by_class"] == {"conclusion=1 (restrictive)": {"never": 1, "arms": 4},
                                     "conclusion=0 (permissive)": {"never": 2, "arms": 4}}
    assert (out["rate"]["k"], out["rate"]["n"], out["rate"]["n_clusters"]) == (5, 8, 3)
    assert out["layer"]["mean"] == pytest.approx(np.mean([2, 4, 1, 3, 4]))
    assert out["depth"]["mean"] == pytest.approx(np.mean([2, 4, 1, 3, 4]) / 4)
    assert out["depth"]["n_clusters"] == 2       # scenario b has no committed arm: no cluster in the mean
    assert out["depth"]["ci"][0] <= out["depth"]["mean"] <= out["depth"]["ci"][1]
    wmc = dec._write_minus_commit({"layer": 1, "depth": 0.25}, out, 4)
    assert wmc["depth"] == pytest.approx(0.25 - out["depth"]["mean"])
    assert wmc["ci_depth"] == pytest.approx([0.25 - out["depth"]["ci"][1], 0.25 - out["depth"]["ci"][0]])
    assert dec._write_minus_commit({"layer": None, "depth": None}, out, 4)["depth"] is None


# ---------------------------------------------------------------------------------------------- trigger targets
def test_trigger_targets_are_what_the_variants_say():
    insts = [i for i in _trigger_instances(4) if i.kind == "gated"]
    table = diverse.domain_table()
    cells = set()
    for inst in insts:
        d = table[inst.scenario]
        named_disallowed = int(diverse.named_value(d) == d.disallowed)
        for arm in ("old", "new"):
            lab = dec.arm_labels(inst, arm)
            trig = inst.variant[f"trigger_{arm}"]
            assert lab["value"] == trig and lab["field"] == inst.variant["field_value"]
            assert lab["trigger"] == int(trig == d.allowed)
            assert lab["field_value"] == int(inst.variant["field_value"] == d.allowed)
            expected = inst.expected_old if arm == "old" else inst.expected_new
            assert lab["conclusion"] == int(expected == d.refuse)
            # the algebra of a one-trigger rule (module docstring): conclusion = field XOR trigger XOR named
            assert lab["conclusion"] == lab["field_value"] ^ lab["trigger"] ^ named_disallowed
            cells.add((lab["field_value"], lab["trigger"]))
        # within a pair the field is fixed and the trigger and the conclusion flip
        old, new = dec.arm_labels(inst, "old"), dec.arm_labels(inst, "new")
        assert old["field_value"] == new["field_value"] and old["trigger"] != new["trigger"]
        assert old["conclusion"] != new["conclusion"]
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 1)}
    field_pairs = [i for i in make_instances("diverse", n_instances=1, seed=0) if i.kind == "gated"]
    assert dec.design_of(insts) == "trigger" and dec.design_of(field_pairs) == "polarity"
    with pytest.raises(ValueError, match="mix trigger pairs and field pairs"):
        dec.design_of(insts[:1] + field_pairs[:1])


def test_trigger_labels_refuse_a_pair_the_domain_files_do_not_imply():
    import dataclasses
    inst = next(i for i in _trigger_instances(1) if i.kind == "gated")
    flipped = dataclasses.replace(inst, expected_old=inst.expected_new)
    with pytest.raises(ValueError, match="not the one the instances were made from"):
        dec.arm_labels(flipped, "old")
    unknown = dataclasses.replace(inst, variant={**inst.variant, "domain": "no_such_domain"})
    with pytest.raises(ValueError, match="does not hold"):
        dec.arm_labels(unknown, "old")


# ---------------------------------------------------------------------------------------------- disagreement
def test_disagreement_counts_on_a_constructed_example():
    c = [1, 0, 1, 0, 1, 0, 1, 0]
    o = [0, 1, 0, 1, 0, 1, 1, 0]             # conclusion = 1 - o on 6 samples, = o on the last 2
    d = dec.disagreement(c, o, "trigger")
    assert d["relation"] == "conclusion = 1 - trigger" and d["holds_on"] == 6
    assert d["mask"] == [False] * 6 + [True, True]
    d = dec.disagreement(c, [1, 0, 1, 0, 1, 0, 0, 1], "x")     # the opposite majority
    assert d["relation"] == "conclusion = x" and d["mask"] == [False] * 6 + [True, True]
    tie = dec.disagreement([1, 0, 1, 0], [1, 0, 0, 1])
    assert tie["relation"] is None and tie["mask"] == [False, False, True, True]
    with pytest.raises(ValueError, match="0/1 label vectors"):
        dec.disagreement([1, 0], [1, 2])

    # the dissociation block on those labels: counts, pairs and scenarios of the disagreeing samples, and each
    # probe's held-out accuracy on them (at its best layer) and beside them on the agreeing ones
    ys = {"conclusion": c, "trigger": o}
    groups = ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4"]
    pairs = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    correct = {"conclusion": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool),
               "trigger": torch.ones(2, 8, dtype=torch.bool)}
    out = dec.dissociation(ys, correct, {"conclusion": 1, "trigger": 0}, groups, pairs, "trigger")
    assert (out["n_samples"], out["n_pairs"], out["n_scenarios"], out["n_agreeing"]) == (2, 1, 1, 6)
    assert (out["accuracy"]["conclusion"]["k"], out["accuracy"]["conclusion"]["n"]) == (1, 2)
    assert out["accuracy"]["conclusion"]["layer"] == 1 and out["accuracy"]["conclusion"]["warning"]   # G = 1
    assert [p["k"] for p in out["accuracy_by_layer"]["conclusion"]] == [0, 1]
    assert out["agreeing_accuracy"]["conclusion"] == {"layer": 1, "k": 5, "n": 6, "mean": 5 / 6}
    # nothing disagrees, or the other target is constant: counts and a note, no accuracies
    same = dec.dissociation({"conclusion": c, "trigger": c}, correct, {"conclusion": 1, "trigger": 0}, groups, pairs,
                            "trigger")
    assert same["n_samples"] == 0 and not same["accuracy"] and "cannot be measured" in same["note"]
    const = dec.dissociation({"conclusion": c, "field_value": [1] * 8}, correct, {"conclusion": 1}, groups, pairs,
                             "field_value")
    assert const["n_samples"] == 4 and not const["accuracy"] and "constant" in const["note"]


# ---------------------------------------------------------------------------------------------- layers: notes only
def test_spliced_positions_of_the_two_options():
    assert layers_probe.spliced_positions((10, 12), 20, "all") == range(10, 20)
    assert layers_probe.spliced_positions((10, 12), 20, "downstream") == range(12, 20)
    with pytest.raises(ValueError, match="positions must be one of"):
        layers_probe.spliced_positions((10, 12), 20, "notes")
    with pytest.raises(ValueError, match="is empty"):
        layers_probe.spliced_positions((10, 12), 12, "downstream")


def test_downstream_sweep_splices_only_the_notes_and_its_last_upto_is_the_locality_notes_splice(
        tiny_by_name, align_for, single_thread):
    lm = tiny_by_name("tiny-llama")
    inst = next(i for i in _trigger_instances(1) if i.kind == "gated")
    pair = align_for(lm, inst)
    a, b = pair.span
    d = pair.dpos
    assert b < pair.line_end < d
    ids = _token_ids(lm, inst)
    raw = layers_probe.measure(lm, pair, ids, positions="downstream")
    n = raw["n_layers"]
    rows = torch.tensor(raw["rows"])                          # [3 n, tokens]: single, upto, from; layer-major
    assert raw["positions"] == "downstream" and rows.shape == (3 * n, len(ids))
    # single layer l = kv.splice of [b, dpos) in layer l alone, decoded (the materialised path, not the engine)
    stale, oracle = kv.prefill(lm.model, pair.old_ids[:d]), kv.prefill(lm.model, pair.new_ids[:d])
    last = int(pair.old_ids[d])
    for li in range(n):
        want = kv.decode(lm.model, [kv.splice(stale, oracle, range(b, d), layers=[li])], last)[0, ids]
        assert torch.allclose(rows[li], want, atol=2e-5)
    # upto[last] = from[0] = the locality probe's downstream-only (notes) splice of the same pair
    loc = locality.measure(lm, pair, ids)
    notes = torch.tensor([loc["states"]["downstream"]["logits"][str(t)] for t in ids])
    oracle_logits = torch.tensor([loc["states"]["oracle"]["logits"][str(t)] for t in ids])
    assert torch.allclose(rows[2 * n - 1], notes, atol=2e-5) and torch.allclose(rows[2 * n], notes, atol=2e-5)
    # ... which is not the full splice: the trigger's own K/V are left stale (else the check could not fail)
    assert float((notes - oracle_logits).abs().max()) > 1e-4
    full = torch.tensor(layers_probe.measure(lm, pair, ids)["rows"])
    assert torch.allclose(full[2 * n - 1], oracle_logits, atol=2e-5)
    assert float((full[2 * n - 1] - rows[2 * n - 1]).abs().max()) > 1e-4


def test_positions_all_leaves_the_layers_record_as_it_was(tmp_path, single_thread):
    rec = run_module.run(_cfg(tmp_path / "all", "probe=layers", "model=tiny-llama", "scenario=diverse_trigger",
                              *RELAXED))
    notes = run_module.run(_cfg(tmp_path / "notes", "experiment=deep_timing", "model=tiny-llama", *RELAXED))
    assert rec["config"]["probe"]["positions"] == "all" and notes["config"]["probe"]["positions"] == "downstream"
    # positions=all: the keys and checks of the records made before the option (test_sweeps checks the values)
    assert set(rec["summary"]) == {"n_total", "n_gated", "n_included", "n_excluded", "n_controls", "n_layers",
                                   "scenarios_included", "finding"}
    assert set(rec["sanity"]) == {"full_splice_recovery_range", "note"}
    for row in rec["instances"]:
        assert set(row["raw"]) == {"states", "token_ids", "n_layers", "rows"}
        assert row["full_recovery_check"] == pytest.approx([1, 1], abs=1e-3 / abs(row["delta_m"]))
    # positions=downstream: said in the summary and in each row, and upto[last] is a finding, not 1
    assert notes["summary"]["positions"] == "downstream" and "all_layers_recovery_range" in notes["sanity"]
    assert all(r["raw"]["positions"] == "downstream" for r in notes["instances"])
    by_id = {r["id"]: r for r in rec["instances"]}
    assert any(abs(r["upto"][-1] - by_id[r["id"]]["upto"][-1]) > 1e-3 for r in notes["instances"])
    for r in notes["instances"]:
        lo, hi = r["all_layers_recovery_check"]
        assert lo == pytest.approx(hi, abs=1e-4 / abs(r["delta_m"]))
    # a re-analysis reads the option back from the rows
    again = run_module.run(_cfg(tmp_path / "notes", "experiment=deep_timing", "model=tiny-llama", *RELAXED,
                                "reanalyse=true"))
    assert again["summary"]["positions"] == "downstream"
    assert [r["upto"] for r in again["instances"]] == [r["upto"] for r in notes["instances"]]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def deep_d1(tmp_path_factory):
    results = tmp_path_factory.mktemp("deep_d1")
    run_py("experiment=deep_d1", "model=tiny-llama", "n_instances=1", f"results_dir={results}", "make_figures=false",
           "stats.n_boot=200", *RELAXED, hydra_dir=results / ".hydra", multirun=True)
    return {p: json.loads((results / p / "tiny-llama" / "diverse_trigger.json").read_text())
            for p in ("locality", "decodability")}


def test_deep_d1_sweep_writes_the_trigger_only_notes_and_decodability_records(deep_d1):
    loc, rec = deep_d1["locality"], deep_d1["decodability"]
    assert loc["summary"]["n_gated"] == rec["summary"]["n_gated"] == N_TRIGGER
    for row in loc["instances"]:         # the field-only splice is the trigger word: the span of each pair
        assert row["variant"]["changes"] == "trigger" and row["tokens"]["span"][1] - row["tokens"]["span"][0] >= 1
    assert loc["sanity"]["full_equals_oracle_max_abs"] < 1e-4
    agg = rec["aggregate"]
    assert agg["design"] == "trigger" and rec["paper_refs"] == ["P8", "§3.8", "§3.10", "§3.11"]
    # one instance per domain: every field holds the allowed value, so field_value is constant and said to be
    assert list(agg["not_probed"]) == ["field_value"] and agg["method"]["targets"] == ["conclusion", "trigger"]
    assert set(agg["best_layer"]["decision"]) == {"conclusion", "trigger"}
    assert agg["best_layer"]["decision"]["trigger"]["null"]["n_perm"] == dec.N_PERM
    n_layers = agg["n_layers"]
    rows = rec["instances"]
    assert len(rows) == N_TRIGGER and agg["n_samples"] == 2 * N_TRIGGER
    # labels as the variants say; commit layers as commit_layer reads the stored margins
    table = diverse.domain_table()
    for row in rows:
        d = table[row["scenario"]]
        for arm in ("old", "new"):
            lab = row["labels"][arm]
            assert lab["trigger"] == int(row["variant"][f"trigger_{arm}"] == d.allowed) and lab["field_value"] == 1
            assert len(row["lens_margin"][arm]) == n_layers + 1
            assert row["commit_layer"][arm] == dec.commit_layer(row["lens_margin"][arm], 1 if lab["conclusion"] else -1)
    # the lens's last layer is the decision: its margin is the record's m_stale / m_oracle
    for row in rows:
        assert row["lens_margin"]["old"][-1] == pytest.approx(row["m_stale"], abs=1e-4)
        assert row["lens_margin"]["new"][-1] == pytest.approx(row["m_oracle"], abs=1e-4)
    assert rec["sanity"]["lens_vs_logits_max_abs"] < 1e-4
    # commit: every arm counted, none dropped; write and commit on the same index
    commit = agg["commit"]["included"]
    layers_all = [row["commit_layer"][arm] for row in rows for arm in ("old", "new")]
    never = sum(c is None for c in layers_all)
    assert (commit["n_arms"], commit["n_never"], commit["n_committed"]) == (2 * N_TRIGGER, never, 2 * N_TRIGGER - never)
    assert sum(v["never"] for v in commit["never_by_class"].values()) == never
    assert (commit["rate"]["k"], commit["rate"]["n"]) == (2 * N_TRIGGER - never, 2 * N_TRIGGER)
    if commit["n_committed"]:
        done = [c for c in layers_all if c is not None]
        assert commit["layer"]["mean"] == pytest.approx(np.mean(done))
        assert commit["depth"]["mean"] == pytest.approx(np.mean(done) / n_layers)
    assert_write_minus_commit(agg, commit, n_layers, dec.ANCHORS)
    for anchor in dec.ANCHORS:
        # the disagreeing samples, recounted from the rows' labels
        for other in ("field_value", "trigger"):
            c = [row["labels"][arm]["conclusion"] for row in rows for arm in ("old", "new")]
            o = [row["labels"][arm][other] for row in rows for arm in ("old", "new")]
            want = dec.disagreement(c, o, other)
            got = agg["dissociation"][anchor][other]
            assert got["n_samples"] == sum(want["mask"]) and got["n_agreeing"] == len(c) - sum(want["mask"])
        trig = agg["dissociation"][anchor]["trigger"]
        assert trig["n_samples"] > 0 and trig["accuracy"]["conclusion"]["n"] == trig["n_samples"]
    assert "never" in rec["summary"]["finding"] and "trigger" in rec["summary"]["finding"]
