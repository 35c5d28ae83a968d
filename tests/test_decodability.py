"""P8 decodability: the polarity option of the diverse family, the LOSO probes on synthetic data (planted signal,
shuffled labels, no training on the held-out scenario, the logistic optimum), the pair-level permutation of
pair-constant targets, the contract's designs (Family C's cancel design: labels, contract, a run.py record), the
anchor residuals against an independent forward, and the probe end to end on tiny-llama (the trigger design, the
logit lens and the commit depth: tests/test_deep_timing.py)."""
import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import run as run_module
from probes import decodability as dec
from probes.base import ProbeConfigError, load_probe
from scenarios import diverse, offtemplate
from test_run import _cfg
from conftest import N_DIVERSE, assert_write_minus_commit, config_domains, run_py

RELAXED = ("exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0")


def _fingerprint(insts) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(i) for i in insts], sort_keys=True).encode()).hexdigest()


def _keys(obj) -> set:
    """Every dict key anywhere in a JSON object."""
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_keys(v) for v in obj))
    return set()


ORIGINAL = tuple(config_domains("diverse"))   # the ten steps 1-3 domains, whose rules read "only if X is A"


def _gate_value(inst, arm) -> str:
    """The value after "only if ... is" in the arm's rendered gate rule."""
    msgs = inst.old_messages if arm == "old" else inst.new_messages
    text = "\n".join(m["content"] for m in msgs)
    rule = next(line for line in text.splitlines() if "only if" in line)
    return re.search(r"only if [^.]*? is (\w+)\.", rule).group(1)


# ---------------------------------------------------------------------------------------------- polarity
def test_normal_polarity_leaves_the_instances_unmarked():
    # byte-identity of the prompts with the steps 1-3 generator: tests/test_scenarios.py (STEP3 fingerprints)
    assert all("polarity" not in i.variant for i in diverse.make_instances(2, 0))


def test_inverted_polarity_swaps_the_rule_and_the_implied_decisions():
    normal, inverted = diverse.make_instances(2, 0), diverse.make_instances(2, 0, polarity="inverted")
    assert len(normal) == len(inverted)
    for n, i in zip(normal, inverted):
        if n.kind == "control":       # controls keep the normal rule
            assert i.old_messages == n.old_messages and i.variant["polarity"] == "normal"
            continue
        d = diverse.domains()[n.scenario]
        allowed, disallowed, allow = d.allowed, d.disallowed, d.allow
        assert (i.old_value, i.new_value) == (n.old_value, n.new_value) and i.variant["polarity"] == "inverted"
        text_n = "\n".join(m["content"] for m in n.old_messages)
        text_i = "\n".join(m["content"] for m in i.old_messages)
        assert d.rule in text_n and d.rule_text("inverted") in text_i and d.rule_text("inverted") != d.rule
        if n.scenario in ORIGINAL:   # their rules read "only if <field> is <allowed>"
            assert _gate_value(n, "old") == allowed and _gate_value(i, "old") == disallowed
        assert (i.expected_old, i.expected_new) == (n.expected_new, n.expected_old)  # each value now implies the other
        assert i.expected_old == (allow if i.old_value == disallowed else d.refuse)
        # only the rule line differs; the rest of the prompt (surface, record, request) is the same
        for mn, mi in zip(n.old_messages, i.old_messages):
            diff = [(a, b) for a, b in zip(mn["content"].splitlines(), mi["content"].splitlines()) if a != b]
            assert len(diff) <= 1 and all(a == f"- {d.rule}" for a, _ in diff)


def test_rule_inversion_matches_whole_words_only():
    from scenarios.domains import parse_domain
    doc = {"agent": "an agent", "record": {"header": "REC", "lines": ["channel: {channel}"]}, "field": "flag",
           "values": {"allowed": "yes", "disallowed": "no"}, "answers": {"allow": "go", "refuse": "deny"},
           "rule": "Go only if flag is yes. Do not note it; if flag is no, deny.", "requests": ["a", "b", "c"]}
    assert parse_domain("toy", doc).rule_text("inverted") == \
        "Go only if flag is no. Do not note it; if flag is yes, deny."
    with pytest.raises(ValueError, match="names neither"):
        parse_domain("bad", {**doc, "rule": "Always go."}).rule_text("inverted")
    assert parse_domain("own", {**doc, "rule": "Always go.", "rule_inverted": "Never go."}).rule_text("inverted") \
        == "Never go."
    with pytest.raises(ValueError, match="polarity must be one of"):
        diverse.make_instances(1, 0, polarity="upside_down")


def test_mixed_polarity_fills_every_cell_and_decorrelates_the_targets():
    insts = diverse.make_instances(4, 0, polarity="mixed")
    labels = [dec.arm_labels(i, arm) for i in insts if i.kind == "gated" for arm in ("old", "new")]
    for domain in diverse.domains():
        cells = {(lab["value"], lab["polarity"]) for i in insts if i.scenario == domain
                 for lab in (dec.arm_labels(i, "old"), dec.arm_labels(i, "new"))}
        assert len(cells) == 4, (domain, cells)
    c = np.array([x["conclusion"] for x in labels])
    f = np.array([x["field_value"] for x in labels])
    assert abs(np.corrcoef(c, f)[0, 1]) < 1e-12
    normal = [dec.arm_labels(i, arm) for i in diverse.make_instances(2, 0) if i.kind == "gated"
              for arm in ("old", "new")]
    assert all(x["conclusion"] != x["field_value"] for x in normal)   # normal polarity: the targets coincide
    assert all(i.variant["polarity"] == "normal" for i in insts if i.kind == "control")


# ---------------------------------------------------------------------------------------------- probes, synthetic
def _synthetic(seed=0, n_groups=8, per_group=8, d=200, signal=1.5):
    g = torch.Generator().manual_seed(seed)
    groups = [f"s{k % n_groups}" for k in range(n_groups * per_group)]
    y = torch.tensor([(k // n_groups) % 2 for k in range(len(groups))], dtype=torch.float64)
    x = 3 * torch.randn(len(groups), d, generator=g, dtype=torch.float64)
    x[:, :40] += signal * (2 * y - 1)[:, None]
    return x, y, groups


def _acc(prob, y):
    return float(((prob > 0.5).to(torch.float64) == y).to(torch.float64).mean())


def test_loso_probes_recover_a_planted_signal_and_give_chance_on_shuffled_labels(single_thread):
    x, y, groups = _synthetic()
    assert _acc(dec.loso_logistic(x, y, groups)[0, 0], y) >= 0.9
    assert float(((dec.loso_diff_means(x, y, groups)[0, 0] > 0).to(torch.float64) == y).to(torch.float64).mean()) >= 0.9
    shuffled = []
    for s in range(4):
        ys = torch.from_numpy(dec.permute_within(y.numpy(), groups, 1, s)[0]).to(torch.float64)
        shuffled.append(_acc(dec.loso_logistic(x, ys, groups)[0, 0], ys))
    assert 0.3 <= np.mean(shuffled) <= 0.7, shuffled


def test_loso_never_trains_on_the_held_out_scenario(single_thread):
    groups = ["a", "b", "a", "c", "b", "c", "a"]
    seen = set()
    for g, tr, te in dec.loso_folds(groups):
        assert all(groups[i] == g for i in te) and all(groups[i] != g for i in tr)
        assert len(tr) + len(te) == len(groups)
        seen.add(g)
    assert seen == {"a", "b", "c"}
    # behaviour: each scenario's label lives in a feature private to it, so only a model that trained on the
    # held-out scenario could predict it; LOSO must be at chance while in-sample fitting is perfect
    n_groups, per = 6, 6
    groups = [f"s{k // per}" for k in range(n_groups * per)]
    y = torch.tensor([k % 2 for k in range(len(groups))], dtype=torch.float64)
    x = torch.randn(len(groups), 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, :n_groups] = 0                                          # features 0..5: private, exactly 0 elsewhere
    for k, g in enumerate(groups):
        x[k, int(g[1:])] = 2 * y[k] - 1
    assert _acc(dec.loso_logistic(x, y, groups)[0, 0], y) <= 0.7
    w, b = dec.fit_logistic(x, y)
    assert float((((x @ w + b) > 0).to(torch.float64) == y).to(torch.float64).mean()) == 1.0


def test_logistic_fit_is_the_regularised_optimum(single_thread):
    x, y, _ = _synthetic(seed=3, d=30, signal=0.3)
    w, b = dec.fit_logistic(x, y, c=1.0)
    p = torch.sigmoid(x @ w + b)
    assert float((w + x.T @ (p - y)).abs().max()) < 1e-6      # d/dw [0.5|w|^2 + sum log-loss] = 0
    assert abs(float((p - y).sum())) < 1e-6                     # unpenalised intercept
    wr = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    br = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([wr, br], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = x @ wr + br
        loss = 0.5 * (wr ** 2).sum() + (torch.nn.functional.softplus(f) - y * f).sum()
        loss.backward()
        return loss
    opt.step(closure)
    assert torch.allclose(w, wr.detach(), atol=1e-5) and abs(b - float(br.detach())) < 1e-5


def test_permutations_stay_within_scenario_and_bad_input_is_refused():
    y = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    groups = ["a", "a", "a", "b", "b", "b", "c", "c"]
    perm = dec.permute_within(y, groups, 50, 0)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        assert all(sorted(row[idx]) == sorted(y[idx]) for row in perm)
    assert len({tuple(r) for r in perm}) > 1
    with pytest.raises(ValueError, match="at least 2 scenarios"):
        dec.loso_logistic(torch.zeros(4, 3), [0, 1, 0, 1], ["a"] * 4)
    with pytest.raises(ValueError, match="0 or 1"):
        dec.loso_logistic(torch.zeros(4, 3), [0, 2, 0, 1], ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="groups for"):
        dec.loso_diff_means(torch.zeros(4, 3), [0, 1, 0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="dtype, shape and b64"):
        dec.decode_array({"b64": ""})


def test_batched_newton_gives_the_one_problem_at_a_time_fit(single_thread):
    # the solver batches label vectors and layers, shares the Hessian product, and retires converged problems
    x, y, groups = _synthetic(seed=5, n_groups=4, per_group=6, d=30, signal=0.8)
    g = torch.Generator().manual_seed(6)
    xs = torch.stack([x, 0.5 * x + torch.randn(x.shape, generator=g, dtype=torch.float64)])     # 2 "layers"
    labels = torch.from_numpy(dec.permute_within(y.numpy(), groups, 6, 1)).to(torch.float64)
    batch = dec.loso_logistic(xs, labels, groups)
    for p in range(len(labels)):
        for layer in range(2):
            one = dec.loso_logistic(xs[layer], labels[p], groups)[0, 0]
            assert torch.allclose(batch[p, layer], one, rtol=0, atol=1e-8)


def test_pair_constant_labels_are_permuted_pair_by_pair():
    # a trigger pair's field value: both arms of a pair share the label; the null permutes whole pairs in a scenario
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
    groups = ["a"] * 8 + ["b"] * 4
    pairs = ["a0", "a0", "a1", "a1", "a2", "a2", "a3", "a3", "b0", "b0", "b1", "b1"]
    perm = dec.permute_within(y, groups, 200, 0, blocks=pairs)
    assert perm.shape == (200, 12)
    assert all(row[i] == row[i + 1] for row in perm for i in range(0, 12, 2))          # pairs stay whole
    assert all(row[:8].sum() == 4 and row[8:].sum() == 2 for row in perm)              # within scenario
    assert len({tuple(r) for r in perm}) > 1
    assert not all(row[i] == row[i + 1] for row in dec.permute_within(y, groups, 200, 0) for i in range(0, 12, 2))
    with pytest.raises(ValueError, match="share one label"):
        dec.permute_within(np.array([1, 0, 1, 0]), list("aabb"), 5, 0, blocks=["p", "p", "q", "q"])
    # its orbit is its own: one null sample does not serve a target permuted arm by arm
    assert dec.permutation_orbit(y, groups, pairs) != dec.permutation_orbit(y, groups)
    assert dec.permutation_orbit(y, groups, pairs) == dec.permutation_orbit(1 - y, groups, pairs)


def test_the_contract_accepts_either_design_and_names_both_when_neither_is_met():
    spec = dec.CONTRACT
    assert spec.scenario_problems("diverse", {"polarity": "mixed"}) == []
    assert spec.scenario_problems("diverse", {"polarity": "mixed", "changes": "field"}) == []
    assert spec.scenario_problems("diverse", {"changes": "trigger"}) == []
    assert spec.scenario_problems("diverse", {"changes": "trigger", "polarity": "normal"}) == []
    for params in ({}, {"polarity": "normal"}, {"changes": "trigger", "polarity": "mixed"}):
        (msg,) = spec.scenario_problems("diverse", params)
        assert "one of 2 designs" in msg and "scenario.params.polarity in ['mixed']" in msg
        assert "scenario.params.changes in ['trigger']" in msg
    assert "family 'diverse' or 'family_c'" in spec.scenario_problems("offtemplate", {"task": "multihop"})[0]
    # a single-design contract reads as before
    from probes.base import ProbeSpec
    one = ProbeSpec(name="x", paper_refs=("x",), options={"batch_size": 1}, not_reanalysable="x",
                    scenarios={"diverse": {"polarity": ("mixed",)}})
    assert one.scenario_problems("diverse", {}) == [
        "on family 'diverse' it needs scenario.params.polarity in ['mixed'], not None"]


def test_null_layer_grid_is_fixed_by_the_depth_and_skips_the_embedding(monkeypatch):
    assert dec.null_layers(28, 7) == [4, 8, 12, 16, 20, 24, 28]
    assert dec.null_layers(2, 7) == [1, 2]
    assert dec.null_layers(28) == dec.null_layers(28, dec.N_NULL_LAYERS)
    for n_layers in (5, 12, 28, 36, 61):
        grid = dec.null_layers(n_layers, 7)
        assert grid[-1] == n_layers and 0 not in grid and len(grid) <= 7
    monkeypatch.setattr(dec, "N_NULL_LAYERS", None)
    assert dec.null_layers(4) == [0, 1, 2, 3, 4]


def test_both_targets_have_the_same_permutation_null():
    insts = diverse.make_instances(4, 0, polarity="mixed")
    arms = [(i.scenario, dec.arm_labels(i, arm)) for i in insts if i.kind == "gated" for arm in ("old", "new")]
    groups = [g for g, _ in arms]
    conclusion = [lab["conclusion"] for _, lab in arms]
    value = [lab["field_value"] for _, lab in arms]
    assert conclusion != value
    assert dec.permutation_orbit(conclusion, groups) == dec.permutation_orbit(value, groups)
    assert dec.permutation_orbit([1, 0, 1, 1], list("aabb")) != dec.permutation_orbit([1, 0, 1, 0], list("aabb"))


def test_max_over_layers_null_puts_the_layer_choice_inside_the_test(single_thread):
    g = torch.Generator().manual_seed(2)
    n_groups, per = 5, 8
    groups = [f"s{k % n_groups}" for k in range(n_groups * per)]
    y = torch.tensor([(k // n_groups) % 2 for k in range(len(groups))], dtype=torch.float64)
    x = torch.randn(5, len(groups), 12, generator=g, dtype=torch.float64)        # layers 0-3: noise
    x[4, :, :3] += 1.5 * (2 * y - 1)[:, None]                                      # layer 4: a planted signal
    assert dec.N_PERM >= 2000
    per_layer = dec.permutation_null(x, y.numpy(), groups, [0, 1, 2, 3, 4], dec.N_PERM, seed=0)
    assert per_layer.shape == (dec.N_PERM, 5)
    # chunks of permutations run on worker threads: the result does not depend on how many
    assert np.array_equal(per_layer, dec.permutation_null(x, y.numpy(), groups, [0, 1, 2, 3, 4], dec.N_PERM, seed=0,
                                                          workers=2))
    prob = dec.loso_logistic(x, y, groups)[0]
    accs = ((prob > 0.5).to(torch.float64) == y).to(torch.float64).mean(-1).tolist()
    signal = dec.max_over_layers_test(accs, [0, 1, 2, 3, 4], per_layer.max(1))
    assert signal["observed_layer"] == 4 and signal["observed"] == max(accs) >= 0.9
    assert signal["p_value"] == signal["p_floor"] == 1 / (dec.N_PERM + 1) and "warning" not in signal
    noise = dec.max_over_layers_test(accs, [0, 1, 2, 3], per_layer[:, :4].max(1))
    assert noise["p_value"] > 0.05 and noise["observed_layer"] != 4
    # the same accuracy tested at its layer alone (the old, in-sample choice) has the smaller, optimistic p-value
    best = noise["observed_layer"]
    alone = dec.max_over_layers_test(accs, [best], per_layer[:, best])
    assert alone["p_value"] <= noise["p_value"] and noise["p95"] >= alone["p95"]
    with pytest.raises(ValueError, match="at least one layer"):
        dec.null_layers(28, 0)


# ---------------------------------------------------------------------------------------------- real forward
def test_anchor_residuals_equal_an_independent_forward(tiny, get_pair, single_thread):
    pair = get_pair(tiny, "diverse")
    raw = dec.measure(tiny, pair, [5, 6])
    anchors = raw["anchors"]
    assert anchors["field_line_end"] == pair.line_end - 1 and anchors["decision"] == pair.dpos
    assert anchors["pre_decision"] == pair.dpos - 1 and anchors["downstream_mean"] == [pair.line_end, pair.dpos]
    assert "\n" in tiny.tokenizer.decode([int(pair.old_ids[pair.line_end - 1])])
    assert raw["decode_vs_forward_max_abs"] < 1e-4
    for arm, ids in (("old", pair.old_ids), ("new", pair.new_ids)):
        got = torch.from_numpy(dec.decode_array(raw["residuals"][arm]))
        with torch.inference_mode():
            hs = torch.stack([h[0] for h in tiny.model(input_ids=ids[None], output_hidden_states=True).hidden_states])
        e, d = pair.line_end, pair.dpos
        want = torch.stack([hs[:, e - 1], hs[:, e:d].mean(1), hs[:, d - 1], hs[:, d]])
        assert got.shape == want.shape == (4, tiny.model.config.num_hidden_layers + 1, tiny.model.config.hidden_size)
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_anchor_positions_refuse_a_layout_without_downstream_line(tiny, get_pair):
    pair = get_pair(tiny, "diverse")
    bad = dataclasses.replace(pair, line_end=pair.span[1])
    with pytest.raises(ValueError, match="no newline"):
        dec.anchor_positions(bad)


def test_end_to_end_record_on_tiny_llama(tmp_path, monkeypatch, single_thread):
    monkeypatch.setattr(dec, "N_PERM", 20)      # the real default (2000) is exercised on real runs; keep this fast
    rec = run_module.run(_cfg(tmp_path, "probe=decodability", "model=tiny-llama", "scenario=diverse_polarity",
                              "n_instances=4", *RELAXED))
    path = tmp_path / "decodability" / "tiny-llama" / "diverse_polarity.json"
    assert path.exists() and path.stat().st_size < 3e6
    assert rec["paper_refs"] == ["P8", "§3.8", "§3.10", "§3.11"]
    for key in ("instances", "excluded", "controls", "aggregate", "sanity", "summary"):
        assert key in rec
    assert not {"b64", "residuals"} & _keys(json.loads(path.read_text()))    # no raw residual arrays in the record
    agg, s = rec["aggregate"], rec["summary"]
    assert s["n_included"] == 4 * N_DIVERSE and agg["n_samples"] == s["n_samples"] == 8 * N_DIVERSE
    assert abs(agg["targets"]["correlation"]) < 1e-9 and "decorrelated" in s["finding"]
    n_layers = agg["n_layers"]
    for anchor in dec.ANCHORS:
        for target in dec.TARGETS:
            for probe in ("logistic", "diff_means"):
                curve = agg[probe][anchor][target]
                assert [pt["layer"] for pt in curve] == list(range(n_layers + 1))
                assert all(pt["n"] == 8 * N_DIVERSE and pt["n_clusters"] == N_DIVERSE and pt["ci"][0] <= pt["mean"] <= pt["ci"][1]
                           for pt in curve)
            best = agg["best_layer"][anchor][target]
            curve = agg["logistic"][anchor][target]
            assert best["accuracy"] == max(pt["mean"] for pt in curve)
            null = best["null"]
            assert null["n_perm"] == 20 and null["p_floor"] == 1 / 21 and null["p_floor"] <= null["p_value"] <= 1
            assert null["layers"] == dec.null_layers(n_layers) == agg["method"]["null_layers"]
            assert null["observed"] == max(curve[li]["mean"] for li in null["layers"]) <= best["accuracy"]
            assert null["observed_layer"] in null["layers"] and null["labels_permuted"] == "conclusion"
            assert "20 permutations" in null["warning"] and "p_value_bonferroni_layers" not in null
        # one permutation sample serves both targets (same per-scenario label counts)
        nulls = [agg["best_layer"][anchor][t]["null"] for t in dec.TARGETS]
        assert [nl["p95"] for nl in nulls] == [nulls[0]["p95"]] * 2
        assert set(agg["write_depth"][anchor]) >= {"layer", "depth", "threshold"}
    # layer 0 is the token embedding: at a single-token anchor every sample is the same vector -> exactly chance
    for anchor, accs in rec["sanity"]["layer0_pointwise_accuracy"].items():
        assert accs == {"conclusion": 0.5, "field_value": 0.5}, anchor
    assert rec["sanity"]["decode_vs_forward_max_abs"] < 1e-4
    row = rec["instances"][0]
    assert set(row["heldout_p_at_best_layer"]) == set(dec.ANCHORS)
    assert {row["labels"]["old"]["conclusion"], row["labels"]["new"]["conclusion"]} == {0, 1}
    assert set(agg["inclusion_by_polarity"]) == set(agg["decisions_by_polarity"]) == {"normal", "inverted"}
    for pol, d in agg["decisions_by_polarity"].items():
        assert d["follows_rule"]["n"] == 20 and set(d) == {"follows_rule", "follows_opposite_rule", "no_flip"}
    # relaxed inclusion keeps the 20 inverted pairs: both arms of each have conclusion == field value
    assert agg["minority_arms"] == dec.minority_arms(rec["instances"])
    assert agg["minority_arms"]["n_arms"] == 40 and agg["minority_arms"]["n_pairs"] == 20
    # the polarity design has no trigger target; its dissociation from the field value is measured on both halves
    # (here balanced: the relation is a tie, so the disagreeing samples are the 40 normal-rule arms, c != value)
    assert agg["design"] == "polarity" and agg["not_probed"] == {} and "trigger_depth" not in agg
    for anchor in dec.ANCHORS:
        d = agg["dissociation"][anchor]
        assert list(d) == ["field_value"]
        assert (d["field_value"]["n_samples"], d["field_value"]["n_agreeing"]) == (40, 40)
        assert d["field_value"]["relation"].startswith("none")
    # the commit depth: every included arm counted, on the hidden_states index write_depth uses
    commit = agg["commit"]["included"]
    assert commit["n_arms"] == 8 * N_DIVERSE == commit["n_committed"] + commit["n_never"]
    assert set(agg["write_minus_commit"]) == set(dec.ANCHORS)
    assert rec["sanity"]["lens_vs_logits_max_abs"] < 1e-4
    assert all(len(r["lens_margin"]["old"]) == n_layers + 1 for r in rec["instances"])


def test_confounded_targets_are_reported_as_such():
    assert "decorrelated" in dec._confounding(0.0)
    msg = dec._confounding(-1.0, {"normal": {"k": 8, "n": 20}, "inverted": {"k": 0, "n": 20}})
    assert "confounded" in msg and "inverted pairs included 0/20" in msg
    assert "polarity mixed" in dec._confounding(1.0)


def test_minority_arms_score_only_the_arms_where_the_targets_agree():
    def row(rid, pol, p_conc, p_val):   # a normal pair's arms are (1, 0) / (0, 1); an inverted pair's (1, 1) / (0, 0)
        labels = {"old": {"conclusion": 1, "field_value": 0 if pol == "normal" else 1},
                  "new": {"conclusion": 0, "field_value": 1 if pol == "normal" else 0}}
        held = {a: {"conclusion": {"old": p_conc, "new": 1 - p_conc}, "field_value": {"old": p_val, "new": 1 - p_val}}
                for a in dec.ANCHORS}
        return {"id": rid, "scenario": rid[0], "labels": labels, "heldout_p_at_best_layer": held}

    # a value-reading probe that follows the majority relation (value = not conclusion) is wrong on every minority arm
    rows = [row("a1", "normal", 0.9, 0.1), row("b1", "inverted", 0.9, 0.1), row("c1", "inverted", 0.2, 0.9)]
    out = dec.minority_arms(rows)
    assert out["n_arms"] == 4 and out["n_pairs"] == 2
    acc = out["accuracy"]["decision"]
    assert (acc["conclusion"]["k"], acc["conclusion"]["n"]) == (2, 4)     # right on b1's arms, wrong on c1's
    assert (acc["field_value"]["k"], acc["field_value"]["n"]) == (2, 4)   # wrong on b1's, right on c1's
    assert dec.minority_arms([row("a1", "normal", 0.9, 0.1)]) == {
        "n_arms": 0, "n_pairs": 0, "arms": "conclusion == field_value (rule inverted and followed)",
        "accuracy": {a: {} for a in dec.ANCHORS}}


# ---------------------------------------------------------------------------------------------- Family C: cancel design
FAMILY_C_ANSWERS = {"allow": "cancel", "refuse": "deny"}     # scenarios/offtemplate/family_c.yaml


@pytest.mark.parametrize("pair", ["field", "trigger"])
def test_family_c_arm_labels_are_what_the_gate_implies(pair):
    insts = offtemplate.make_family_c(8, 0, pair=pair)
    gated = [i for i in insts if i.kind == "gated"]
    assert len(gated) == 8 and dec.design_of(insts) == "cancel"       # the controls do not count
    per_cluster = {}
    for inst in gated:
        v = inst.variant
        assert inst.safe == "deny"
        for arm in ("old", "new"):
            lab = dec.arm_labels(inst, arm)
            field, trigger = v[f"field_{arm}"], v[f"trigger_{arm}"]
            want = offtemplate.gate_answer(field, trigger, FAMILY_C_ANSWERS)
            assert lab["conclusion"] == int(want == "deny") == int(field != trigger)
            assert (lab["pair"], lab["field"], lab["trigger_word"], lab["implied"]) == (pair, field, trigger, want)
            assert lab["value"] == (field if pair == "field" else trigger)
            assert not {"field_value", "trigger"} & set(lab)       # no second target on this design
            per_cluster.setdefault(inst.scenario, []).append(lab["conclusion"])
        # the arms of a pair imply the two actions
        assert {dec.arm_labels(inst, "old")["conclusion"], dec.arm_labels(inst, "new")["conclusion"]} == {0, 1}
    # four clusters, each holding one value and balanced in conclusion
    assert len(per_cluster) == 4 and all(c.startswith(f"cancel_{pair}_") for c in per_cluster)
    assert all(sum(v) * 2 == len(v) for v in per_cluster.values())
    # a pair whose decisions the rule does not imply cannot be labelled
    bad = dataclasses.replace(gated[0], expected_old=gated[0].expected_new)
    with pytest.raises(ValueError, match="implies"):
        dec.arm_labels(bad, "old")
    wrong = dataclasses.replace(gated[0], old_value="nonsense")
    with pytest.raises(ValueError, match="changing value"):
        dec.arm_labels(wrong, "old")


def test_design_of_names_family_c_cancel_and_refuses_a_mix():
    field, trigger = offtemplate.make_family_c(2, 0), offtemplate.make_family_c(2, 0, pair="trigger")
    assert dec.design_of(field) == dec.design_of(trigger) == dec.design_of(field + trigger) == "cancel"
    polarity = diverse.make_instances(1, 0, polarity="mixed")
    diverse_trigger = diverse.make_instances(1, 0, changes="trigger", domains=["order_cancel"])
    assert dec.design_of(polarity) == "polarity" and dec.design_of(diverse_trigger) == "trigger"
    for other in (polarity, diverse_trigger):
        with pytest.raises(ValueError, match="mix .*Family C pairs.*run each as its own scenario"):
            dec.design_of(field + other)
    with pytest.raises(ValueError, match="mix trigger pairs and field pairs"):    # the diverse mix, as before
        dec.design_of(polarity + diverse_trigger)


def test_contract_accepts_family_c_and_refuses_multihop_with_the_fix(tmp_path):
    spec = dec.CONTRACT
    for params in ({}, {"pair": "field"}, {"pair": "trigger"}, {"pair": "field", "order": "field_first"}):
        assert spec.scenario_problems("family_c", params) == [], params
    (msg,) = spec.scenario_problems("family_c", {"pair": "both"})
    assert "scenario.params.pair in [None, 'field', 'trigger']" in msg
    probe = load_probe("decodability")
    for scenario in ("family_c", "family_c_field_first", "family_c_trigger"):
        conf = OmegaConf.to_container(_cfg(tmp_path, "probe=decodability", f"scenario={scenario}",
                                           "model=tiny-llama"), resolve=True)
        assert run_module.check_probe(probe, conf)["name"] == "decodability"
    conf = OmegaConf.to_container(_cfg(tmp_path, "probe=decodability", "scenario=offtemplate_multihop",
                                       "model=tiny-llama"), resolve=True)
    with pytest.raises(ProbeConfigError) as err:
        run_module.check_probe(probe, conf)
    msg = str(err.value)
    assert "scenario 'offtemplate_multihop'" in msg and "family 'diverse' or 'family_c'" in msg
    assert "Fix:" in msg and "scenario=family_c_trigger" in msg and "scenario=diverse_trigger" in msg


def test_family_c_record_through_run_py_has_the_cancel_design(tmp_path):
    out = tmp_path / "results"
    run_py("probe=decodability", "scenario=family_c_trigger", "model=tiny-llama", "n_instances=8",
           f"results_dir={out}", "make_figures=false", "stats.n_boot=200", *RELAXED, hydra_dir=tmp_path / "hydra")
    rec = json.loads((out / "decodability" / "tiny-llama" / "family_c_trigger.json").read_text())
    agg, rows = rec["aggregate"], rec["instances"]
    assert rec["summary"]["n_included"] == len(rows) == 8 and rec["summary"]["n_controls"] == 8
    assert agg["design"] == "cancel" and agg["targets"]["design"] == "cancel"
    assert agg["method"]["targets"] == ["conclusion"] and agg["not_probed"] == {}
    assert agg["n_samples"] == 16 and agg["n_scenarios"] == 4
    # labels as Family C's rule implies them from each row's variant
    for row in rows:
        v = row["variant"]
        assert v["pair"] == "trigger" and row["scenario"] == f"cancel_trigger_{v['field_old']}"
        for arm in ("old", "new"):
            want = offtemplate.gate_answer(v[f"field_{arm}"], v[f"trigger_{arm}"], FAMILY_C_ANSWERS)
            assert row["labels"][arm]["conclusion"] == int(want == "deny")
    assert agg["targets"]["held_value"] == {r["scenario"]: r["variant"]["field_old"] for r in rows}
    assert agg["targets"]["cells"] == {"conclusion=0": 8, "conclusion=1": 8}
    # the conclusion curves at every anchor, with the max-over-layers null; no other target anywhere
    n_layers = agg["n_layers"]
    for anchor in dec.ANCHORS:
        for probe in ("logistic", "diff_means"):
            assert list(agg[probe][anchor]) == ["conclusion"]
            curve = agg[probe][anchor]["conclusion"]
            assert [pt["layer"] for pt in curve] == list(range(n_layers + 1))
            assert all(pt["n"] == 16 and pt["n_clusters"] == 4 for pt in curve)
        best = agg["best_layer"][anchor]["conclusion"]
        assert best["accuracy"] == max(pt["mean"] for pt in agg["logistic"][anchor]["conclusion"])
        assert best["null"]["n_perm"] == dec.N_PERM and best["null"]["layers"] == dec.null_layers(n_layers)
        w = agg["write_depth"][anchor]
        reach = [pt["layer"] for pt in agg["logistic"][anchor]["conclusion"] if pt["mean"] >= dec.WRITE_THRESHOLD]
        assert w["layer"] == (reach[0] if reach else None)
    for key in ("field_value_depth", "trigger_depth", "minority_arms"):
        assert key not in agg
    # no second target: no dissociation, said so in the aggregate, the targets block and the finding
    assert agg["dissociation"] == {a: {} for a in dec.ANCHORS}
    assert agg["dissociation_note"].startswith("none") and "no second target" in agg["dissociation_note"]
    assert agg["method"]["dissociation"] == agg["dissociation_note"]
    assert agg["targets"]["correlation"] is None and agg["targets"]["correlations"] == {}
    assert "no second target" in agg["targets"]["correlation_note"]
    assert "No dissociation is measured" in rec["summary"]["finding"]
    # the commit block: every included arm counted, never-committing arms by class; write - commit per anchor
    commit = agg["commit"]["included"]
    layers = [r["commit_layer"][arm] for r in rows for arm in ("old", "new")]
    for r in rows:
        for arm in ("old", "new"):
            sign = 1 if r["labels"][arm]["conclusion"] else -1
            assert r["commit_layer"][arm] == dec.commit_layer(r["lens_margin"][arm], sign)
            assert len(r["lens_margin"][arm]) == n_layers + 1
    never = sum(c is None for c in layers)
    assert (commit["n_arms"], commit["n_never"], commit["n_committed"]) == (16, never, 16 - never)
    assert sum(v["never"] for v in commit["never_by_class"].values()) == never
    assert set(agg["write_minus_commit"]) == set(dec.ANCHORS)
    assert_write_minus_commit(agg, commit, n_layers, dec.ANCHORS)
    assert rec["sanity"]["lens_vs_logits_max_abs"] < 1e-4
    assert all(v == {"conclusion": 0.5} for v in rec["sanity"]["layer0_pointwise_accuracy"].values())
