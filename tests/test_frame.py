"""Reading records back as frames (kvnotes.records: load_frame, load_aggregates, load_index) from tiny synthetic
records written to tmp, and the README numbers built from them (figures/readme_numbers.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from figures import readme_numbers as rn
from kvnotes import records as R


def _row(rid, domain, kind="gated", expected=None, direction=None, layout_key=None, decisions=("go", "deny"),
         fo=0.25, **extra):
    variant = {"seed": 0, **({"direction": direction} if direction else {}), **(layout_key or {})}
    row = {"id": rid, "scenario": domain, "kind": kind, "field": "f", "old_value": "a", "new_value": "b",
           "variant": variant, "tokens": {"L": 10, "span": [1, 2]},
           "m_stale": 1.0, "m_oracle": -1.0, "delta_m": -2.0, "dec_stale": decisions[0], "dec_oracle": decisions[1],
           "m": {"stale": 1.0, "field": 0.5}, "single": [0.1, 0.2, 0.3], "raw": {"stale": {"logits": {"1": 3.0}}},
           "field_only_recovery": fo, "downstream_only_recovery": 1 - fo, "ok": True, **extra}
    if expected:
        row["expected_old"], row["expected_new"] = expected
    return row


def make_record(probe="locality", model="m1", scenario="diverse", tag=None, fo_mean=0.375, warning="only 2 scenarios"):
    instances = [
        _row("d1/000", "d1", expected=("go", "deny"), direction="allowed->disallowed",
             layout_key={"placement": "after_rule"}),
        _row("d2/000", "d2", direction="disallowed->allowed", layout_key={"layout": "F->R", "placement": "x"},
             decisions=("deny", "go"), fo=0.5),
    ]
    excluded = [_row("d1/001", "d1", decisions=("go", "go"), reasons=["no flip", "|delta m| small"])]
    controls = [_row("c/000", "c", kind="control", expected=("go", "go"), decisions=("go", "go"))]
    fo = {"mean": fo_mean, "ci": [0.25, 0.5], "ci_method": "bootstrap", "n": 2, "n_clusters": 2,
          "per_scenario": {"d1": {"mean": 0.25, "n": 1}, "d2": {"mean": 0.5, "n": 1}},
          "scenario_weighted_mean": 0.375, "scenario_weighted_ci": [0.2, 0.6]}
    if warning:
        fo["warning"] = warning
    aggregate = {
        "field_only_recovery": fo,
        "flip_rate": {"mean": 0.5, "ci": [0.2, 0.8], "n": 4, "n_clusters": 3, "k": 2, "warning": ["few", "thin"]},
        "curve": [{"mean": 0.1, "ci": None, "n": 2}, {"mean": 0.2, "ci": [0.1, 0.3], "n": 2}],
        "nested": {"a": {"mean": 1.5, "ci": [1.0, 2.0], "n": 3}, "null": {"median": 0.1, "lo": 0.0, "hi": 0.2,
                                                                          "p_cf_ge_null": 0.0004998}},
        "n_samples": 4,
        "anchors": ["x", "y"],
    }
    return {"schema_version": 1, "experiment": probe, "model": {"name": model},
            "scenario": {"name": scenario, "family": scenario.split("_")[0]},
            "config": {"tag": tag, "seed": 3}, "provenance": {"git_sha": "abc1234def", "git_dirty": False, "seed": 3},
            "readout": {"per_group": [{"safe": "deny", "unsafe": "go"}]},
            "instances": instances, "excluded": excluded, "controls": controls, "aggregate": aggregate,
            "summary": {"n_total": 4, "n_gated": 3, "n_included": 2, "n_excluded": 1, "n_controls": 1,
                        "scenarios_included": ["d1", "d2"], "ks": [1, 2]}}


def write(results: Path, **kw) -> Path:
    rec = make_record(**kw)
    name = f"{rec['scenario']['name']}-{kw['tag']}" if kw.get("tag") else rec["scenario"]["name"]
    path = results / rec["experiment"] / rec["model"]["name"] / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture()
def results(tmp_path):
    root = tmp_path / "results"
    write(root)                                                  # locality/m1/diverse.json
    write(root, model="m2", scenario="family_a")                 # locality/m2/family_a.json
    write(root, probe="topk", tag="t1")                          # topk/m1/diverse-t1.json
    (root / "locality" / "m1" / "diverse.partial.jsonl").write_text("{}\n")   # never read
    return root


# -- load_frame -------------------------------------------------------------------------------------------------------
def test_frame_columns_and_one_row_per_instance_and_metric(results):
    df = R.load_frame(results / "locality" / "m1" / "diverse.json")
    assert list(df.columns) == R.FRAME_COLUMNS
    for col in ("probe", "model", "scenario", "family", "tag", "seed", "git_sha", "path", "instance", "domain",
                "kind", "status", "flip", "layout", "delta_m", "metric", "value"):
        assert col in df.columns
    metrics = {"m_stale", "m_oracle", "delta_m", "field_only_recovery", "downstream_only_recovery"}   # not bool "ok"
    assert len(df) == 4 * len(metrics)
    assert not df.duplicated(["path", "instance", "metric", "index"]).any()
    assert set(df["metric"]) == metrics and df["index"].isna().all()
    one = df.drop_duplicates("instance").set_index("instance")
    assert dict(one["status"]) == {"d1/000": "included", "d2/000": "included", "d1/001": "excluded",
                                   "c/000": "control"}
    assert dict(one["domain"]) == {"d1/000": "d1", "d2/000": "d2", "d1/001": "d1", "c/000": "c"}
    assert one.loc["c/000", "kind"] == "control" and one.loc["d1/000", "kind"] == "gated"
    assert one.loc["d1/001", "reasons"] == "no flip; |delta m| small" and pd.isna(one.loc["d1/000", "reasons"])
    # flip direction: expected actions first, then the generator's direction, then the model's decisions
    assert one.loc["d1/000", ["flip", "flip_source"]].tolist() == ["allow->refuse", "expected"]
    assert one.loc["d2/000", ["flip", "flip_source"]].tolist() == ["refuse->allow", "variant.direction"]
    assert one.loc["d1/001", ["flip", "flip_source"]].tolist() == ["allow->allow", "decisions"]
    assert one.loc["c/000", ["flip", "flip_source"]].tolist() == ["allow->allow", "expected"]
    # layout: variant.layout, else variant.placement, else None
    assert one.loc["d2/000", "layout"] == "F->R" and one.loc["d1/000", "layout"] == "after_rule"
    assert pd.isna(one.loc["d1/001", "layout"])
    assert (df["probe"] == "locality").all() and (df["seed"] == 3).all() and (df["git_sha"] == "abc1234def").all()
    assert df["tag"].isna().all() and (df["family"] == "diverse").all()
    fo = df[(df["metric"] == "field_only_recovery") & (df["instance"] == "d2/000")]
    assert fo["value"].tolist() == [0.5] and fo["delta_m"].tolist() == [-2.0]


def test_frame_filters_and_sources(results):
    def by(**kw):
        return sorted({Path(p).relative_to(results).as_posix() for p in R.load_frame(results, **kw)["path"]})

    everything = ["locality/m1/diverse.json", "locality/m2/family_a.json", "topk/m1/diverse-t1.json"]
    assert by() == everything                                         # tag defaults to ANY
    assert by(probe="locality") == everything[:2]
    assert by(model="m1") == [everything[0], everything[2]]
    assert by(scenario="family_a") == [everything[1]]
    assert by(tag=None) == everything[:2]                             # None: untagged only
    assert by(tag="t1") == [everything[2]]
    assert by(probe=["locality", "topk"], model=["m2"]) == [everything[1]]
    assert by(scenario="nope") == []
    # a file, a glob, a list of them; explicit files are filtered on their content
    assert set(R.load_frame(results / "topk" / "m1" / "diverse-t1.json")["tag"]) == {"t1"}
    assert len(R.find_records(str(results / "*" / "m1" / "*.json"))) == 2
    assert R.load_frame([results / "locality" / "m1" / "diverse.json", str(results / "topk" / "*" / "*.json")],
                        tag=None)["probe"].unique().tolist() == ["locality"]
    with pytest.raises(R.MissingRecord):
        R.load_frame(results / "nowhere")
    assert R.load_frame(results, probe="nope").columns.tolist() == R.FRAME_COLUMNS   # empty, same columns


def test_frame_nested_flattening(results):
    df = R.load_frame(results / "locality" / "m1" / "diverse.json", nested=True)
    d1 = df[df["instance"] == "d1/000"]
    assert d1.loc[d1["metric"] == "m/field", "value"].tolist() == [0.5]
    single = d1[d1["metric"] == "single"]
    assert single["index"].tolist() == [0, 1, 2] and single["value"].tolist() == [0.1, 0.2, 0.3]
    assert not d1["metric"].str.startswith(("raw", "tokens", "variant")).any()


# -- load_aggregates / load_index ------------------------------------------------------------------------------------
def test_aggregates_pass_through_every_scalar_key(results):
    agg = R.load_aggregates(results / "locality" / "m1" / "diverse.json")
    assert list(agg.columns[:len(R.AGGREGATE_COLUMNS)]) == R.AGGREGATE_COLUMNS
    fo = agg[(agg["metric"] == "field_only_recovery") & (agg["key"] == "")].iloc[0]
    assert (fo["mean"], fo["ci_lo"], fo["ci_hi"], fo["n"], fo["n_clusters"]) == (0.375, 0.25, 0.5, 2, 2)
    # keys stats.py may add are passed through without being named in the loader
    assert fo["scenario_weighted_mean"] == 0.375 and fo["warning"] == "only 2 scenarios"
    assert (fo["scenario_weighted_ci_lo"], fo["scenario_weighted_ci_hi"]) == (0.2, 0.6)
    assert str(agg["n"].dtype) == "Int64" and agg.loc[agg["metric"] == "flip_rate", "k"].tolist() == [2]
    assert agg.loc[agg["metric"] == "flip_rate", "warning"].tolist() == ["few; thin"]
    curve = agg[agg["metric"] == "curve"]
    assert curve["key"].tolist() == ["0", "1"] and pd.isna(curve["ci_lo"].iloc[0]) and curve["ci_hi"].iloc[1] == 0.3
    assert agg.loc[(agg["metric"] == "nested") & (agg["key"] == "null"), "median"].tolist() == [0.1]
    assert agg.loc[agg["metric"] == "n_samples", "value"].tolist() == [4]
    assert "anchors" not in set(agg["metric"])                        # a list of names is not a summary
    assert not agg["key"].str.contains("per_scenario").any()
    ps = R.load_aggregates(results / "locality" / "m1" / "diverse.json", per_scenario=True)
    assert ps.loc[ps["key"] == "per_scenario/d2", "mean"].tolist() == [0.5]
    assert R.load_aggregates(results, metric="flip_rate")["model"].tolist() == ["m1", "m2", "m1"]


def test_index_has_identity_and_summary_counts(results):
    idx = R.load_index(results, tag=R.ANY).set_index("path")
    row = idx.loc[str(results / "topk" / "m1" / "diverse-t1.json")]
    assert (row["probe"], row["model"], row["scenario"], row["tag"], row["seed"]) == ("topk", "m1", "diverse", "t1", 3)
    assert (row["n_included"], row["n_gated"], row["n_scenarios"], row["ks"]) == (2, 3, 2, [1, 2])
    assert bool(row["git_dirty"]) is False and row["schema_version"] == 1


def test_a_rewritten_record_is_read_again(results):
    path = results / "locality" / "m1" / "diverse.json"
    assert R.load_aggregates(path, metric="field_only_recovery")["mean"].tolist() == [0.375]
    write(results, fo_mean=0.9)
    assert R.load_aggregates(path, metric="field_only_recovery")["mean"].tolist() == [0.9]


def test_missing_and_malformed_records_name_the_file(tmp_path):
    with pytest.raises(R.MissingRecord) as exc:
        R.read_record(tmp_path / "locality" / "m9" / "diverse-t2.json")
    assert exc.value.command == "python run.py probe=locality model=m9 scenario=diverse tag=t2"
    bad = tmp_path / "locality" / "m1" / "diverse.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(R.RecordError, match="not valid JSON") as exc:
        R.load_frame(tmp_path)
    assert str(bad) in str(exc.value) and not isinstance(exc.value, SystemExit)
    rec = make_record()
    del rec["aggregate"]
    bad.write_text(json.dumps(rec))
    with pytest.raises(R.RecordError, match="missing key 'aggregate'"):
        R.load_aggregates(bad)


def test_registered_models_are_the_gguf_configs():
    names = R.registered_models()
    yaml_names = sorted(p.stem for p in R.MODEL_CONFIG_DIR.glob("*.yaml"))
    assert names and set(names) < set(yaml_names) and not any(n.startswith("tiny") for n in names)
    assert "qwen2.5-coder-1.5b" in names and "llama3.1-8b-ndif" not in names


@pytest.mark.skipif(not (R.DEFAULT_RESULTS / "locality").is_dir(), reason="no committed records")
def test_every_committed_record_loads():
    """Every committed record goes through the frame loaders (no timing bound here: a timed test fails on a busy
    machine; the step-5 map alone adds some fifty records)."""
    R._TABLES.clear()
    frame, agg, idx = R.load_frame(), R.load_aggregates(), R.load_index()
    assert set(frame["path"]) <= set(idx["path"]) and set(agg["path"]) == set(idx["path"])
    loc = frame[(frame["probe"] == "locality") & (frame["model"] == "qwen2.5-coder-1.5b")
                & (frame["scenario"] == "diverse") & (frame["metric"] == "field_only_recovery")]
    mean = agg[(agg["probe"] == "locality") & (agg["model"] == "qwen2.5-coder-1.5b") & (agg["scenario"] == "diverse")
               & (agg["metric"] == "field_only_recovery") & (agg["key"] == "")]["mean"].item()
    assert loc["status"].eq("included").sum() == 28
    assert loc.loc[loc["status"] == "included", "value"].mean() == pytest.approx(mean)


# -- README numbers -------------------------------------------------------------------------------------------------
BLOCKS = {
    "loc-m1": {"records": [("locality", "m1", "diverse")],
               "rows": [("field_only_recovery", "", "field-only"), ("flip_rate", "", "flips"),
                        ("nested", "null", "p vs null", "p_cf_ge_null")]},
    "loc-both": {"records": [("locality", "m1", "diverse"), ("locality", "m2", "family_a")],
                 "rows": [("nested", "null", "null band", "median", "lo", "hi")], "format": "sentence"},
}


def test_readme_numbers_fill_and_check(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\ntext before\n<!-- numbers:loc-m1 -->\nold numbers typed by hand\n<!-- /numbers -->\n"
                      "between\n<!-- numbers:loc-both --><!-- /numbers -->\ntext after\n")
    args = ["--readme", str(readme), "--results", str(results)]
    assert rn.main([*args, "--check"], blocks=BLOCKS) == 1
    assert "loc-m1" in capsys.readouterr().err
    assert rn.main(args, blocks=BLOCKS) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\ntext before\n<!-- numbers:loc-m1 -->\n") and text.endswith("text after\n")
    assert "old numbers" not in text and "\nbetween\n" in text
    assert "| field-only | 0.38 | [0.25, 0.50] | 2 | 2 | only 2 scenarios |" in text   # CI, n, scenarios, warning
    assert "| flips | 0.50 | [0.20, 0.80] | 2/4 | 3 | few; thin |" in text
    assert "| p vs null | 0.0005 | no CI |" in text                   # a p-value: two significant digits
    assert "null band (m1) 0.10 [0.00, 0.20] (2 scenarios); null band (m2) 0.10 [0.00, 0.20] (2 scenarios)." in text
    assert "abc1234" in text and "locality/m1/diverse.json" in text
    assert rn.main([*args, "--check"], blocks=BLOCKS) == 0
    write(results, fo_mean=0.9)                               # the record changes: the block is stale
    assert rn.main([*args, "--check"], blocks=BLOCKS) == 1
    assert "stale README block(s)" in capsys.readouterr().err
    assert readme.read_text() == text                         # --check writes nothing
    rn.main(args, blocks=BLOCKS)
    assert "| field-only | 0.90 |" in readme.read_text()


def test_readme_numbers_errors(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    args = ["--readme", str(readme), "--results", str(results)]
    readme.write_text("<!-- numbers:undeclared -->\n<!-- /numbers -->\n")
    assert rn.main(args, blocks=BLOCKS) == 1 and "not declared" in capsys.readouterr().err
    readme.write_text("<!-- numbers:loc-m1 -->\nno end\n")
    assert rn.main(args, blocks=BLOCKS) == 1 and "no closing marker" in capsys.readouterr().err
    missing = {"gone": {"records": [("locality", "m7", "diverse", "t3")], "rows": [("flip_rate", "", "flips")]}}
    readme.write_text("<!-- numbers:gone -->\n<!-- /numbers -->\n")
    assert rn.main(args, blocks=missing) == 1
    assert "python run.py probe=locality model=m7 scenario=diverse tag=t3" in capsys.readouterr().err


@pytest.mark.skipif(not (R.DEFAULT_RESULTS / "locality").is_dir(), reason="no committed records")
def test_declared_blocks_render_from_the_committed_records():
    for block_id, spec in rn.BLOCKS.items():
        text = rn.render_block(block_id, spec, R.DEFAULT_RESULTS)
        assert "Generated by `figures/readme_numbers.py`" in text and "n/a" not in text, block_id


def test_readme_block_names_records_of_one_model_by_their_label(results, tmp_path):
    """Several records of one model (e.g. one per layout) are told apart by the label each record entry gives, under
    the block's record_column heading."""
    write(results, probe="topk", tag="t2", fo_mean=0.8)
    block = {"records": [("topk", "m1", "diverse", "t1", "first layout"), ("topk", "m1", "diverse", "t2", "second")],
             "record_column": "layout", "rows": [("field_only_recovery", "", "field-only")]}
    text = rn.render_block("two", block, results)
    assert "| layout | quantity |" in text
    assert "| first layout | field-only | 0.38 |" in text and "| second | field-only | 0.80 |" in text
