"""Recoveries by flip direction and over every pair with |delta m| >= 0.5 (issue 10 §3): the row sets they use."""
from scenarios import make_instances
from probes.common import DIRECTIONS, Split, flip_direction

RULE = {"require_flip": True, "require_correct": True, "min_abs_delta_m": 1.0}


def test_flip_direction_follows_the_answer_the_new_value_implies():
    insts = make_instances("diverse", n_instances=2, seed=0, domains=["order_cancel"], controls=1)
    gated = [i for i in insts if i.kind == "gated"]
    assert [flip_direction(i) for i in gated] == ["allow->refuse", "refuse->allow"]   # k = 0: allowed -> disallowed
    assert flip_direction(next(i for i in insts if i.kind == "control")) is None


def test_slices_split_included_rows_by_direction_and_add_the_relaxed_set():
    insts = make_instances("diverse", n_instances=4, seed=0, domains=["order_cancel", "rx_refill"], controls=0)
    split = Split(RULE)
    deltas = [3.0, -2.0, 0.7, -0.6, 2.5, 0.2, -1.5, 4.0]
    for inst, d in zip(insts, deltas):
        ok = abs(d) >= 1.0
        row = {**inst.record_id(), "delta_m": d, "direction": flip_direction(inst),
               "dec_stale": inst.expected_old, "dec_oracle": inst.expected_new if ok else inst.expected_old}
        split.add(inst, row)
    sl = split.slices(0.5)
    assert len(sl["included"]) == 5 and len(sl["abs_delta_m_ge_0.5"]) == 7      # 0.2 is below both thresholds
    for base in ("included", "abs_delta_m_ge_0.5"):
        parts = [sl[f"{base}/{d}"] for d in DIRECTIONS]
        assert sorted(r["id"] for p in parts for r in p) == sorted(r["id"] for r in sl[base])
        assert all(r["direction"] == d for d, p in zip(DIRECTIONS, parts) for r in p)
