"""The step-5 regime map (figures/regime_map.py): a mini map swept through `run.py -m experiment=regime_map` on the
tiny model lands one record per cell, and the analysis reads them back (cells, regression, boundary, table, figure);
the regression recovers a known structure from synthetic pairs."""
import json

import numpy as np
import pandas as pd
import pytest

from figures import regime_map as rm
from conftest import run_py

DOMAINS = "[order_cancel,account_delete,password_reset,loyalty_discount,item_return,plan_upgrade,data_export," \
          "card_replace,class_booking,rx_refill]"


@pytest.fixture(scope="module")
def mini_map(tmp_path_factory):
    results = tmp_path_factory.mktemp("map")
    run_py("experiment=regime_map", "model=tiny-llama", "n_instances=1", f"results_dir={results}",
           "make_figures=false", "stats.n_boot=200",
           "exclusion.require_flip=false", "exclusion.require_correct=false", "exclusion.min_abs_delta_m=0.0",
           f"scenario.params.domains={DOMAINS}", "scenario.params.layout=rule_first,field_first_user",
           "scenario.params.n_filler=0,4", "scenario.params.question=last,first",
           hydra_dir=results / ".hydra", multirun=True)
    return results


def test_the_sweep_lands_one_record_per_cell_and_the_analysis_reads_them(mini_map, tmp_path):
    paths = rm.map_records(mini_map, "diverse_all", "map-")
    assert sorted(p.name for p in paths) == sorted(
        f"diverse_all-map-{lay}-D{d}-Q{q}-K1.json" for lay in ("rule_first", "field_first_user") for d in (0, 4)
        for q in ("last", "first"))
    analysis = rm.regime_map(mini_map, tmp_path, "diverse_all", "map-")
    cells = analysis["models"]["tiny-llama"]["cells"]
    assert len(cells) == 8 and {(c["order"], c["D"], c["Q"]) for c in cells} == {
        (o, d, q) for o in ("R->F", "F->R") for d in (0, 4) for q in ("last", "first")}
    # every cell's numbers are its record's: the aggregate, and the direction counts recounted from the rows
    for c in cells:
        rec = json.loads((mini_map / "locality" / "tiny-llama" /
                          f"diverse_all-map-{c['layout']}-D{c['D']}-Q{c['Q']}-K1.json").read_text())
        assert c["field_only"]["mean"] == pytest.approx(rec["aggregate"]["field_only_recovery"]["mean"])
        assert c["n_included"] == rec["summary"]["n_included"] and c["n_gated"] == rec["summary"]["n_gated"]
        rows = [r for r in rec["instances"] + rec["excluded"] if r["kind"] == "gated"]
        for d, words in (("allow->refuse", "allowed->disallowed"), ("refuse->allow", "disallowed->allowed")):
            mine = [r for r in rows if r["variant"]["direction"] == words]
            k = sum(r["dec_stale"] == r["expected_old"] and r["dec_oracle"] == r["expected_new"] for r in mine)
            assert (c[f"correct_flip/{d}"]["k"], c[f"correct_flip/{d}"]["n"]) == (k, len(mine))
    reg = analysis["models"]["tiny-llama"]["regression"]["included"]
    assert reg["model"] == "O x log1p(D) x Q" and reg["G"] == 10 and reg["n"] == 80
    assert any(":x:" in k for k in reg["coefficients"])                 # the three-way interaction is estimated
    assert all(v["ci"][0] <= v["estimate"] <= v["ci"][1] for v in reg["coefficients"].values())
    bounds = analysis["models"]["tiny-llama"]["boundary"]["included"]
    assert {(b["layout"], b["Q"]) for b in bounds} == {(lay, q) for lay in ("rule_first", "field_first_user")
                                                      for q in ("last", "first")}
    for ext in ("png", "pdf", "csv", "md", "tex"):
        assert (tmp_path / f"regime_map.{ext}").exists()
    assert json.loads((mini_map / "regime_map" / "diverse_all-map.json").read_text())["models"]["tiny-llama"]


def test_the_regression_recovers_a_known_structure():
    """Synthetic pairs: R->F flat at 0.6; F->R falling as 0.5 - 0.15 log(1 + D); domain effects sd 0.05; the fitted
    coefficients' CIs cover the truth and the boundary falls where the line crosses 0.2."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(30):
        u = rng.normal(0, 0.05)
        for layout, order in (("rule_first", "R->F"), ("field_first_user", "F->R")):
            for d in (0, 4, 16, 48):
                for q in ("last", "first"):
                    for _ in range(2):
                        x = np.log1p(d)
                        y = 0.6 if order == "R->F" else 0.5 - 0.15 * x
                        rows.append({"domain": f"d{g}", "layout": layout, "order": order, "D": d, "Q": q, "K": 1,
                                     "status": "included", "delta_m": 2.0,
                                     "field_only": y + u + rng.normal(0, 0.05)})
    pairs = pd.DataFrame(rows)
    reg = rm.regression(pairs)
    c = reg["coefficients"]
    slope = "C(layout, Treatment('rule_first'))[T.field_first_user]:x"
    assert c[slope]["ci"][0] < -0.15 < c[slope]["ci"][1]
    assert c["x"]["ci"][0] < 0 < c["x"]["ci"][1]
    b = {(x["layout"], x["Q"]): x for x in rm.boundary(reg, pairs)}
    assert b[("field_first_user", "last")]["first_D_fitted_below"] == 16   # 0.5 - 0.15 log 5 = 0.26; log 17: 0.075
    assert b[("field_first_user", "last")]["first_D_ci_below"] in (16, 48)
    assert b[("rule_first", "last")]["first_D_fitted_below"] is None


def test_a_cell_resting_on_two_domains_gets_few_df():
    """The map's sparse D = 48 cells: a fitted cell mean that rests on 2 domains is tested on its own
    Imbens-Kolesar df (about 1-2), not on the fit's G - 1; a dense cell keeps many df."""
    rng = np.random.default_rng(1)
    rows = []
    for g in range(20):
        u = rng.normal(0, 0.1)
        for layout in ("rule_first", "field_first_user"):
            for d in (0, 48):
                if layout == "field_first_user" and d == 48 and g >= 2:
                    continue   # only domains d0 and d1 flip there
                rows.append({"domain": f"d{g}", "layout": layout, "D": d, "Q": "last", "K": 1, "status": "included",
                             "delta_m": 2.0, "field_only": 0.4 + u + rng.normal(0, 0.1)})
    pairs = pd.DataFrame(rows)
    reg = rm.regression(pairs)
    pts = {(b["layout"], p["D"]): p for b in rm.boundary(reg, pairs) for p in b["points"]}
    assert pts[("field_first_user", 48)]["df"] < 3 < 10 < pts[("rule_first", 0)]["df"]
    slope = reg["coefficients"]["C(layout, Treatment('rule_first'))[T.field_first_user]:x"]
    assert slope["df"] < 3 and slope["se_cr1"] > 0


def test_too_few_domains_is_said_not_fitted():
    pairs = pd.DataFrame({"domain": ["a", "a", "b"], "layout": "rule_first", "D": [0, 4, 0], "Q": "last", "K": 1,
                          "status": "included", "delta_m": 2.0, "field_only": [0.1, 0.2, 0.3]})
    reg = rm.regression(pairs)
    assert "not_fitted" in reg and rm.boundary(reg, pairs) == []


def test_a_range_of_d_is_refused_in_the_map_and_kept_in_the_pilot(tmp_path):
    rec = {"config": {"scenario": {"params": {"layout": "field_first_user", "n_filler": [0, 6]}}}}
    with pytest.raises(rm.RegimeMapError, match="is a range"):
        rm.cell_factors(rec, tmp_path / "r.json")
    assert rm.cell_factors(rec, tmp_path / "r.json", exact_d=False) == {
        "layout": "field_first_user", "order": "F->R", "D": "0-6", "Q": "last", "K": 1}
    rec["config"]["scenario"]["params"]["n_filler"] = [4, 4]
    assert rm.cell_factors(rec, tmp_path / "r.json")["D"] == 4


def test_the_pilot_table_lists_every_layout_with_its_correct_flip_rate(mini_map, tmp_path):
    analysis = rm.regime_pilot(mini_map, tmp_path, "diverse_all", "map-")
    rates = [c["correct_flip"]["mean"] for c in analysis["cells"]]
    assert len(rates) == 8 and rates == sorted(rates, reverse=True)        # best layout first
    table = pd.read_csv(tmp_path / "regime_pilot.csv")
    assert list(table["correct_flip k/n"]) == [f"{c['correct_flip']['k']}/{c['correct_flip']['n']}"
                                               for c in analysis["cells"]]
    assert (tmp_path / "regime_pilot.tex").exists()
    assert json.loads((mini_map / "regime_map" / "diverse_all-map-pilot.json").read_text())["kind"] == "regime_pilot"


def test_the_readme_block_shows_each_cell_of_the_analysis_record(mini_map, tmp_path):
    from figures import readme_numbers as rn
    analysis = rm.regime_map(mini_map, tmp_path, "diverse_all", "map-")
    spec = {"kind": "regime", "file": "regime_map/diverse_all-map.json", "model": "tiny-llama",
            "where": {"Q": "last", "K": 1}, "command": "python -m figures.regime_map"}
    text = rn.render_block("regime-test", spec, mini_map)
    cells = [c for c in analysis["models"]["tiny-llama"]["cells"] if c["Q"] == "last"]
    rows = [ln for ln in text.splitlines() if ln.startswith("| R->F") or ln.startswith("| F->R")]
    assert len(rows) == len(cells) == 4
    for c, row in zip(cells, rows):
        assert f"| {c['n_included']}/{c['n_gated']} |" in row and f"{c['field_only']['mean']:.2f}" in row
    assert "Fitted field-only recovery" in text and "git " in text
    with pytest.raises(rn.RecordError, match="no cell"):
        rn.render_block("regime-test", {**spec, "where": {"Q": "nowhere"}}, mini_map)
    with pytest.raises(rn.MissingRecord, match="figures.regime_map"):
        rn.render_block("regime-test", {**spec, "file": "regime_map/absent.json"}, mini_map)


def test_the_headline_block_spans_each_regimes_cells(mini_map, tmp_path):
    from figures import readme_numbers as rn
    analysis = rm.regime_map(mini_map, tmp_path, "diverse_all", "map-")
    spec = {"kind": "regime_headline", "file": "regime_map/diverse_all-map.json", "model": "tiny-llama",
            "where": {"K": 1}, "command": "python -m figures.regime_map"}
    text = rn.render_block("headline-test", spec, mini_map)
    cells = analysis["models"]["tiny-llama"]["cells"]
    for order in ("R->F", "F->R"):
        for q in ("last", "first"):
            sub = [c for c in cells if c["order"] == order and c["Q"] == q]
            row = next(ln for ln in text.splitlines() if ln.startswith(f"| {order} | {q} |"))
            means = sorted(c["field_only"]["mean"] for c in sub)
            assert f"| {len(sub)} |" in row and f"{means[0]:.2f}" in row and f"{means[-1]:.2f}" in row
    reg = analysis["models"]["tiny-llama"]["regression"]["included"]
    if "not_fitted" not in reg:     # fitted values only at the D each layout and question position measured
        assert " at D = 0 | " in text and " at D = 4 |" in text          # smallest and largest D measured
        assert "at D = 48" not in text
    with pytest.raises(rn.MissingRecord, match="figures.regime_map"):
        rn.render_block("headline-test", {**spec, "file": "regime_map/absent.json"}, mini_map)


def test_no_boundary_is_printed_for_a_layout_of_few_included_pairs(tmp_path):
    """A (layout, Q, K) whose cells include fewer than MIN_BOUNDARY_PAIRS pairs gets no fitted boundary in the README
    block (the fit there would be the other cells' terms), and the block says how many pairs it has."""
    from figures import readme_numbers as rn
    est = {"mean": 0.1, "lo": 0.0, "hi": 0.2, "n": 2, "G": 2}

    def cell(layout, order, d, n_included):
        return {"model": "m", "layout": layout, "order": order, "Q": "last", "K": 4, "D": d, "n_included": n_included,
                "n_gated": 68, "correct_flip": {"k": n_included + 1, "n": 68}, "field_only": est,
                "downstream_only": est}

    def bound(layout):
        return {"layout": layout, "Q": "last", "K": 4, "threshold": 0.2, "first_D_fitted_below": 0,
                "first_D_ci_below": 16, "points": []}

    rec = {"kind": "regime_map", "records": [{"git_sha": "abc1234"}],
           "models": {"m": {"cells": [cell("rule_first", "R->F", 0, 20), cell("field_first_user", "F->R", 0, 2),
                                      cell("field_first_user", "F->R", 16, 1)],
                            "boundary": {"included": [bound("rule_first"), bound("field_first_user")]}}}}
    (tmp_path / "regime_map").mkdir()
    (tmp_path / "regime_map" / "x.json").write_text(json.dumps(rec))
    text = rn.render_block("b", {"kind": "regime", "file": "regime_map/x.json", "model": "m", "where": {"K": 4},
                                 "command": "c"}, tmp_path)
    assert "rule_first, Q last: below 0.2 from D = 0 (whole CI from D = 16)" in text
    assert "field_first_user, Q last: not given (3 included pairs in its cells" in text
