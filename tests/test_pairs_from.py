"""pairs_from: an expensive probe runs only on the pairs another record of the same model and scenario included, with
that record's readouts; everything left out is listed with its reason, and a record of another config is refused."""
import json

import numpy as np
import pytest

import run as run_module
from test_run import _cfg

TINY = ("model=tiny-llama", "exclusion.require_flip=false", "exclusion.require_correct=false")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A locality record whose inclusion rule keeps about half of the gated pairs (tau = the median |delta m|)."""
    tmp = tmp_path_factory.mktemp("pairs_from")
    first = run_module.run(_cfg(tmp, *TINY, "exclusion.min_abs_delta_m=0.0", "tag=all"))
    tau = float(np.median([abs(r["delta_m"]) for r in first["instances"]]))
    rec = run_module.run(_cfg(tmp, *TINY, f"exclusion.min_abs_delta_m={tau}", "tag=half"))
    assert 0 < rec["summary"]["n_included"] < rec["summary"]["n_gated"]
    return tmp, tau, rec


def test_only_the_included_pairs_run_with_the_source_readouts(source):
    tmp, tau, src = source
    path = tmp / "locality" / "tiny-llama" / "diverse-half.json"
    rec = run_module.run(_cfg(tmp, *TINY, f"exclusion.min_abs_delta_m={tau}", "probe=positions", "tag=half",
                              f"pairs_from={path}"))
    included = {r["id"] for r in src["instances"]}
    ran = {r["id"] for part in ("instances", "excluded", "controls") for r in rec[part]}
    assert ran == included and {r["id"] for r in rec["instances"]} == included   # the same rule keeps them all
    others = {r["id"] for part in ("excluded", "controls") for r in src[part]}
    assert {r["id"] for r in rec["not_run"]} == others and rec["summary"]["n_not_run"] == len(others)
    assert all("pairs_from" in r["reason"] for r in rec["not_run"])
    assert rec["pairs_from"]["n_included"] == len(included) and rec["config"]["pairs_from"] == str(path)
    strip = lambda g: {k: v for k, v in g.items() if k != "chosen_by"}   # noqa: E731
    source_groups = [strip(g) for g in src["readout"]["per_group"]]
    assert rec["readout"]["per_group"] and all(strip(g) in source_groups and g["chosen_by"].endswith("(pairs_from)")
                                               for g in rec["readout"]["per_group"])
    by_id = {r["id"]: r for r in src["instances"]}
    for row in rec["instances"]:   # the same stale / oracle computation: the same margins
        assert row["delta_m"] == pytest.approx(by_id[row["id"]]["delta_m"], abs=1e-4)
    # re-analysis keeps the source's readouts and changes nothing
    again = run_module.run(_cfg(tmp, *TINY, f"exclusion.min_abs_delta_m={tau}", "probe=positions", "tag=half",
                                f"pairs_from={path}", "reanalyse=true"))
    assert again["aggregate"] == rec["aggregate"] and again["readout"] == rec["readout"]


@pytest.mark.parametrize("override, says", [("seed=7", "seed"), ("exclusion.min_abs_delta_m=0.0", "exclusion"),
                                            ("scenario.params.layout=field_first_user", "scenario")])
def test_a_record_of_another_config_is_refused(source, override, says):
    tmp, tau, _ = source
    path = tmp / "locality" / "tiny-llama" / "diverse-half.json"
    with pytest.raises(run_module.PairsFromError, match=f"another config.*{says}"):
        run_module.run(_cfg(tmp, *TINY, f"exclusion.min_abs_delta_m={tau}", "probe=positions", "tag=x",
                            f"pairs_from={path}", override))


def test_a_missing_or_broken_source_is_an_error(source, tmp_path):
    tmp, tau, _ = source
    with pytest.raises(run_module.PairsFromError, match="no such record"):
        run_module.run(_cfg(tmp, *TINY, "probe=positions", f"pairs_from={tmp_path}/nothing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {}}))
    with pytest.raises(run_module.PairsFromError, match="not a readable record"):
        run_module.run(_cfg(tmp, *TINY, "probe=positions", f"pairs_from={bad}"))


def test_a_source_that_included_nothing_writes_no_record(tmp_path):
    run_module.run(_cfg(tmp_path, *TINY, "exclusion.min_abs_delta_m=1e9", "tag=none"))
    path = tmp_path / "locality" / "tiny-llama" / "diverse-none.json"
    assert json.loads(path.read_text())["summary"]["n_included"] == 0
    out = run_module.run(_cfg(tmp_path, *TINY, "exclusion.min_abs_delta_m=1e9", "probe=positions", "tag=none",
                              f"pairs_from={path}"))
    assert out == {} and not (tmp_path / "positions").exists()


def test_a_subset_of_the_domains_takes_their_included_pairs(source):
    tmp, tau, src = source
    path = tmp / "locality" / "tiny-llama" / "diverse-half.json"
    doms = sorted({r["scenario"] for r in src["instances"]})[:2]
    rec = run_module.run(_cfg(tmp, *TINY, f"exclusion.min_abs_delta_m={tau}", "probe=positions", "tag=sub",
                              f"pairs_from={path}", f"scenario.params.domains=[{','.join(doms)}]"))
    want = {r["id"] for r in src["instances"] if r["scenario"] in doms}
    assert want and {r["id"] for part in ("instances", "excluded") for r in rec[part]} == want
    assert rec["pairs_from"]["domains_subset"] == doms
    with pytest.raises(run_module.PairsFromError, match="another config.*scenario"):   # not a subset: refused
        run_module.run(_cfg(tmp, *TINY, f"exclusion.min_abs_delta_m={tau}", "probe=positions", "tag=sub2",
                            f"pairs_from={path}", "scenario.params.domains=[order_cancel,vpn_access]"))
