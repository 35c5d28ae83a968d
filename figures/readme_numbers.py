"""The README's result numbers, generated from the records (through `kvnotes.records.load_aggregates`), never typed.

README.md holds marked blocks; this script fills each from the record(s) its entry in BLOCKS names:

    <!-- numbers:locality-qwen2.5-coder-1.5b-diverse -->
    (generated: a markdown table, or a sentence, with mean, 95 % CI, n, number of scenarios, and any warning
    the aggregate carries; then the record it came from and the git sha that made it)
    <!-- /numbers -->

    python figures/readme_numbers.py            # rewrite the blocks in README.md from the records
    python figures/readme_numbers.py --check    # exit 1 (and name the blocks) when a block is stale
    python figures/readme_numbers.py --list     # the declared block ids and what each shows

Options: --readme PATH (default README.md at the repository root), --results DIR (default results/). A marker
naming an undeclared block, a block without its closing marker, and a missing record are errors (exit 1; a missing
record's message has the command that makes it). Declared blocks the README does not (yet) place are listed, not
errors. Lines outside the markers are never touched.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:     # run as a script: this checkout's kvnotes, not an editable install elsewhere
    sys.path.insert(0, str(REPO_ROOT))

from kvnotes.records import (MissingRecord, RecordError, load_aggregates, load_index, plain_value,  # noqa: E402
                             record_path, repo_relative, run_command)

DEFAULT_README = REPO_ROOT / "README.md"
DEFAULT_RESULTS = REPO_ROOT / "results"

# ---------------------------------------------------------------------------------------------------------------------
# The declared blocks. Each: what it shows (for --list), the record(s) (probe, model, scenario[, tag]; several make a
# `model` column), the rows (aggregate metric, key below it, label; optionally which fields hold the value and the
# interval when they are not mean / ci_lo / ci_hi, e.g. a null band's median / lo / hi), the format ("table" or
# "sentence") and the decimals.
# ---------------------------------------------------------------------------------------------------------------------
LOCALITY_ROWS = [
    ("field_only_recovery", "", "field-only (the field's own K/V)"),
    ("field_line_recovery", "", "field + its newline"),
    ("field_k_only_recovery", "", "field K only"),
    ("field_v_only_recovery", "", "field V only"),
    ("downstream_only_recovery", "", "downstream only (field stale)"),
    ("full_downstream_recovery", "", "full downstream (= 1 by construction)"),
    ("inclusion_rate", "", "gated pairs included"),
]
SW = ("scenario_weighted_mean", "scenario_weighted_ci_lo", "scenario_weighted_ci_hi")   # the scenario-weighted columns


def _slices(tau: str = "0.5") -> list:
    """Field-only / downstream-only recovery and the field-only new-decision rate by flip direction, over the
    included pairs and over every gated pair with |delta m| >= tau (locality's aggregate.slices)."""
    rows = []
    for base, what in (("included", "included"), (f"abs_delta_m_ge_{tau}", f"\\|Δm\\| ≥ {tau}")):
        for d in ("allow->refuse", "refuse->allow"):
            for metric, label in (("field_only_recovery", "field-only"),
                                  ("downstream_only_recovery", "downstream-only"),
                                  ("field_only_new_decision_rate", "field-only gives the new decision")):
                rows.append(("slices", f"{base}/{d}/{metric}", f"{label}, {what}, {d}"))
        for metric, label in (("field_only_recovery", "field-only"), ("downstream_only_recovery", "downstream-only")):
            if base != "included":
                rows.append(("slices", f"{base}/{metric}", f"{label}, {what}, both directions"))
    return rows


REGIME_LONG_LAYOUTS = ("field_first_user", "family_a_blocks", "field_first_system")   # the map's F->R layouts


def regime_long_records(probe: str, model: str, d: int = 48) -> dict:
    """The block keys naming experiment=regime_long's records of one probe: one per F->R layout of the map at D = d
    (question last, one gate), each shown by its layout."""
    return {"records": [(probe, model, "diverse_all", f"map-{lay}-D{d}-Qlast-K1", lay) for lay in REGIME_LONG_LAYOUTS],
            "record_column": "layout"}

CIRCUIT_LAYOUTS = ("rule_first", "field_first_user", "family_a_blocks", "field_first_system")


def circuit_records(probe: str, model: str, layouts=CIRCUIT_LAYOUTS) -> dict:
    """The block keys naming experiment=circuit's records of one probe (the map's D = 0 cells, question last, one
    gate), one per layout, each shown by its layout."""
    return {"records": [(probe, model, "diverse_all", f"map-{lay}-D0-Qlast-K1", lay) for lay in layouts],
            "record_column": "layout"}


SCRUB_ROWS = [("interchange", "notes", "notes from the other arm (recovery)"),
              ("null_notes", "", "random note sets of the same size from the other arm (null: mean, 95 % band)",
               "mean", "lo", "hi"),
              ("interchange", "rest", "everything but the notes from the other arm (recovery)"),
              ("drift", "instance:notes", "drift: the notes from a same-conclusion prompt of the same domain"),
              ("drift", "instance:rest", "drift: the rest from that prompt"),
              ("drift", "domain:notes", "drift: the notes from a same-conclusion prompt of another domain")]


# read heads at the decision token, write heads at the top-1 note and at the top-4 notes jointly (circuits/heads.py)
HEAD_ROWS = [*(("read", f"cum_cf/{k}", f"read heads: joint top-{k}, ranked on held-out domains")
               for k in (1, 3, 12)),
             ("read", "cum_in/12", "read heads: joint top-12, ranked in-sample"),
             ("read", "null/12", "read heads: random joint 12-sets (null: mean, 95 % band)", "mean", "lo", "hi"),
             ("read", "null/12", "read heads: p(held-out top-12 >= random), one-sided (floor 1/(B + 1))",
              "p_cf_ge_null"),
             ("read", "stability", "read heads: top-8 sets across pairs, mean pairwise Jaccard",
              "mean_pairwise_jaccard"),
             ("read", "dla_vs_exact/spearman", "read heads: DLA vs exact single-head patch, Spearman"),
             ("read", "heads_ranked/0", "read heads: the best single head alone (exact patch, ranked in-sample)"),
             ("read", "heads_ranked/0", "read heads: that head's attention from the decision token to the top-4 notes "
              "(mean)", "attn_mean", "no_ci", "no_ci"),
             *(row for sweep, where in (("write1", "the top-1 note"), ("writeN", "the top-4 notes jointly"))
               for row in (
                   (sweep, "cum_cf/12", f"write heads at {where}: joint top-12, held-out ranking"),
                   (sweep, "null/12", f"write heads at {where}: random joint 12-sets (null: mean, 95 % band)",
                    "mean", "lo", "hi"),
                   (sweep, "null/12", f"write heads at {where}: p(held-out top-12 >= random)", "p_cf_ge_null")))]


def direction_rows(layers, auc: bool = False) -> list[tuple]:
    """The direction probe's rows per layer (circuits/direction.py's aggregate keys): the full difference (its
    ceiling), the DoM component alone, the norm-matched random null, the necessity drop and, with auc, the held-out
    AUC of the DoM projection."""
    rows = []
    for li in map(str, layers):
        rows += [(li, "full", f"layer {li}: the whole clean - corrupt difference added at the notes (ceiling)"),
                 (li, "along_dm", f"layer {li}: only its component along the DoM direction (sufficiency)"),
                 (li, "random_null", f"layer {li}: norm-matched random directions (null: mean, 95 % band)",
                  "mean", "lo", "hi"),
                 (li, "necessity_dm", f"layer {li}: DoM component projected out of the clean run (necessity drop)")]
        if auc:
            rows.append((li, "heldout_auc_dm", f"layer {li}: held-out AUC of the DoM projection for the conclusion"))
    return rows


BLOCKS: dict[str, dict] = {
    "locality-qwen2.5-coder-1.5b-diverse": {
        "shows": "Fig. 3a numbers on the 1.5B, diverse: recovery of each splice, and the inclusion rate",
        "records": [("locality", "qwen2.5-coder-1.5b", "diverse")],
        "rows": LOCALITY_ROWS,
    },
    "locality-qwen2.5-coder-1.5b-diverse_all": {
        "shows": "locality on the 1.5B over every domain file (diverse_all, R->F): recoveries pair- and "
                 "scenario-weighted, by flip direction, and over all pairs with |delta m| >= 0.5",
        "records": [("locality", "qwen2.5-coder-1.5b", "diverse_all")],
        "rows": [("field_only_recovery", "", "field-only, pair-weighted"),
                 ("field_only_recovery", "", "field-only, scenario-weighted", *SW),
                 ("downstream_only_recovery", "", "downstream-only, pair-weighted"),
                 ("downstream_only_recovery", "", "downstream-only, scenario-weighted", *SW),
                 ("field_line_recovery", "", "field + its newline, pair-weighted"),
                 ("field_only_new_decision_rate", "", "field-only gives the new decision"),
                 ("flip_rate", "", "gated pairs whose decision flips"),
                 ("correct_flip_rate", "", "... flips the way the rule says"),
                 ("inclusion_rate", "", "gated pairs included"),
                 *_slices()],
    },
    "locality-qwen2.5-coder-1.5b-pairs-policy_pairs": {
        "shows": "locality on the 1.5B over the hand-written example pairs (scenarios/examples/policy_pairs.jsonl)",
        "records": [("locality", "qwen2.5-coder-1.5b", "pairs", "policy_pairs")],
        "rows": [("field_only_recovery", "", "field-only, pair-weighted"),
                 ("field_only_recovery", "", "field-only, scenario-weighted", *SW),
                 ("field_line_recovery", "", "field + its newline"),
                 ("downstream_only_recovery", "", "downstream-only, pair-weighted"),
                 ("downstream_only_recovery", "", "downstream-only, scenario-weighted", *SW),
                 ("field_only_new_decision_rate", "", "field-only gives the new decision"),
                 ("flip_rate", "", "gated pairs whose decision flips"),
                 ("correct_flip_rate", "", "... flips the way the file says"),
                 ("inclusion_rate", "", "gated pairs included"),
                 ("slices", "abs_delta_m_ge_0.5/field_only_recovery", "field-only, all pairs with \\|Δm\\| ≥ 0.5"),
                 ("slices", "abs_delta_m_ge_0.5/downstream_only_recovery",
                  "downstream-only, all pairs with \\|Δm\\| ≥ 0.5")],
    },
    "bench-qwen2.5-coder-1.5b": {
        "shows": "the splice benchmark (benchmarks/splice_bench.py) on the 1.5B, fp32: splices/s of the three paths "
                 "in one run, their ratios, the engine's share of this CPU's FLOP ceiling, and their agreement",
        "file": "bench/qwen2.5-coder-1.5b.json", "command": "python benchmarks/splice_bench.py",
        "rows": [("full_forward_splices_per_s", "(a) frozen full forward (TransformerLens-style), splices/s"),
                 ("sequential_splices_per_s", "(b) sequential splice + decode (the paper's way), splices/s"),
                 ("batched_splices_per_s", "(c) batched engine, splices/s (median of 3 sweeps)"),
                 ("batched_over_full_forward", "engine / (a)"), ("batched_over_sequential", "engine / (b)"),
                 ("flop_bound_splices_per_s", "FLOP-bound ceiling of this CPU, splices/s"),
                 ("batched_fraction_of_ceiling", "engine / ceiling"),
                 ("batched_full_vocab_splices_per_s", "engine with the full-vocabulary unembedding, splices/s"),
                 ("max_abs_diff", "max abs. recovery difference across the three paths"),
                 ("peak_rss_gib", "peak RSS, GiB")],
    },
    "bench-circuit-qwen2.5-coder-1.5b": {
        "shows": "head patches per second: the batched engine against nnsight and TransformerLens, one run",
        "file": "bench/circuit-qwen2.5-coder-1.5b.json",
        "command": "python benchmarks/circuit_bench.py",
        "rows": [("read_ours_patches_per_s", "read heads (decision token): batched engine, patches/s"),
                 ("read_nnsight_patches_per_s", "read heads: nnsight, one patch per trace, patches/s"),
                 ("read_transformer_lens_patches_per_s", "read heads: TransformerLens bridge, one per forward"),
                 ("read_ours_over_faster_reference", "read heads: engine / the faster library"),
                 ("write_recomputed_tokens", "write heads: tokens recomputed per patch (top-1 note to the end)"),
                 ("write_ours_patches_per_s", "write heads (top-1 note): batched engine, patches/s"),
                 ("write_nnsight_patches_per_s", "write heads: nnsight, patches/s"),
                 ("write_transformer_lens_patches_per_s", "write heads: TransformerLens bridge, patches/s"),
                 ("write_ours_over_faster_reference", "write heads: engine / the faster library"),
                 ("read_max_abs_logit_diff", "read heads: max abs. logit difference, engine vs libraries"),
                 ("write_max_abs_logit_diff", "write heads: max abs. logit difference, engine vs libraries"),
                 ("read_ours_peak_rss_gib", "peak RSS during the engine's read sweep, GiB")],
    },
    "bench-qwen2.5-coder-1.5b-bfloat16": {
        "shows": "the same benchmark in bf16 (slower on this CPU)",
        "file": "bench/qwen2.5-coder-1.5b-bfloat16.json",
        "command": "python benchmarks/splice_bench.py --dtype bfloat16",
        "rows": [("batched_splices_per_s", "batched engine, splices/s"),
                 ("sequential_splices_per_s", "sequential, splices/s"),
                 ("full_forward_splices_per_s", "frozen full forward, splices/s"),
                 ("gemm_peak_gflops", "best bf16 GEMM rate, GFLOP/s"),
                 ("max_abs_diff", "max abs. recovery difference across the three paths")],
    },
    "regime-pilot-qwen2.5-coder-1.5b": {
        "shows": "step 5 pilot: per F->R layout, how often the 1.5B flips as the rule says, and its recoveries",
        "kind": "regime", "file": "regime_map/diverse_all-pilot.json", "model": "qwen2.5-coder-1.5b",
        "command": "python run.py -m experiment=regime_pilot; python -m figures.regime_map --pilot",
        "columns": ("order", "layout"),
    },
    "regime-map-qwen2.5-coder-1.5b": {
        "shows": "step 5 map: per cell (order/layout x D, question last, one gate), flips and recoveries on the 1.5B",
        "kind": "regime", "file": "regime_map/diverse_all-map.json", "model": "qwen2.5-coder-1.5b",
        "command": "python run.py -m experiment=regime_map; python -m figures.regime_map",
        "where": {"K": 1, "Q": "last"}, "columns": ("order", "layout", "D"),
    },
    "regime-headline-qwen2.5-coder-1.5b": {
        "shows": "the headline: field-only recovery by regime (rule before / after the field) over the map's cells, "
                 "and the regression's fitted values at the shortest and longest distance",
        "kind": "regime_headline", "file": "regime_map/diverse_all-map.json", "model": "qwen2.5-coder-1.5b",
        "command": "python run.py -m experiment=regime_map; python -m figures.regime_map",
        "where": {"K": 1},
    },
    "regime-map-qfirst-qwen2.5-coder-1.5b": {
        "shows": "step 5 map: per cell (order/layout x D, question first, one gate), flips and recoveries on the 1.5B",
        "kind": "regime", "file": "regime_map/diverse_all-map.json", "model": "qwen2.5-coder-1.5b",
        "command": "python run.py -m experiment=regime_map scenario.params.question=first; "
                   "python -m figures.regime_map",
        "where": {"K": 1, "Q": "first"}, "columns": ("order", "layout", "D"),
    },
    "regime-map-k4-qwen2.5-coder-1.5b": {
        "shows": "step 5 map, four gates on four fields (K = 4), the subset measured, on the 1.5B",
        "kind": "regime", "file": "regime_map/diverse_all-map.json", "model": "qwen2.5-coder-1.5b",
        "command": "python run.py -m experiment=regime_map scenario.params.n_gates=4 scenario.params.question=last "
                   "scenario.params.layout=rule_first,field_first_user scenario.params.n_filler=0,16; "
                   "python -m figures.regime_map",
        "where": {"K": 4, "Q": "last"}, "columns": ("order", "layout", "D"),
    },
    "regime-map-qwen2.5-coder-0.5b": {
        "shows": "step 5 map: per cell (order/layout x D, question last, one gate), flips and recoveries on the 0.5B",
        "kind": "regime", "file": "regime_map/diverse_all-map.json", "model": "qwen2.5-coder-0.5b",
        "command": "python run.py -m experiment=regime_map model=qwen2.5-coder-0.5b scenario.params.question=last; "
                   "python -m figures.regime_map",
        "where": {"K": 1, "Q": "last"}, "columns": ("order", "layout", "D"),
    },
    "locality-qwen2.5-coder-0.5b-diverse": {
        "shows": "Fig. 3a numbers on the 0.5B, diverse",
        "records": [("locality", "qwen2.5-coder-0.5b", "diverse")],
        "rows": LOCALITY_ROWS,
    },
    "locality-qwen2.5-coder-1.5b-diverse_long": {
        "shows": "field-only vs downstream-only recovery on the 1.5B with long filler (diverse_long), one sentence",
        "records": [("locality", "qwen2.5-coder-1.5b", "diverse_long")],
        "rows": [("field_only_recovery", "", "field-only"), ("downstream_only_recovery", "", "downstream-only"),
                 ("inclusion_rate", "", "included")],
        "format": "sentence",
    },
    "locality-all-family_a": {
        "shows": "Family A on every registered model: flip and inclusion rates (no model flips, so no recovery)",
        "records": [("locality", m, "family_a") for m in ("gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
                                                          "smollm2-135m")],
        "rows": [("flip_rate", "", "decision flips"), ("inclusion_rate", "", "gated pairs included")],
    },
    "locality-qwen2.5-coder-1.5b-family_a_one_word": {
        "shows": "Family A asking for one action word (step 5): flips, inclusion and the margin's movement, 1.5B",
        "records": [("locality", "qwen2.5-coder-1.5b", "family_a_one_word")],
        "rows": [("flip_rate", "", "decision flips"), ("inclusion_rate", "", "gated pairs included"),
                 ("gated_abs_delta_m", "", "\\|Δm\\| on gated pairs (logits)"),
                 ("control_abs_delta_m", "", "\\|Δm\\| on control pairs (logits)")],
    },
    "topk-qwen2.5-coder-1.5b-diverse": {
        "shows": "Fig. 3b on the 1.5B: top-1/4/8 recovery ranked in-sample and cross-fitted; matched and uniform "
                 "random-8 nulls",
        "records": [("topk", "qwen2.5-coder-1.5b", "diverse")],
        "rows": [("topk_in", "1", "top-1, in-sample"), ("topk_in", "4", "top-4, in-sample"),
                 ("topk_in", "8", "top-8, in-sample"), ("topk_cf", "1", "top-1, cross-fitted"),
                 ("topk_cf", "4", "top-4, cross-fitted"), ("topk_cf", "8", "top-8, cross-fitted"),
                 ("null_matched", "8", "random-8 matched null (median, 95 % band)", "median", "lo", "hi"),
                 ("null_uniform", "8", "random-8 uniform null (median, 95 % band)", "median", "lo", "hi")],
    },
    "regime-long-positions-qwen2.5-coder-1.5b": {
        "shows": "step 5: P2 position sweep on the map's D = 48 F->R cells (>= 400 downstream tokens), 1.5B",
        **regime_long_records("positions", "qwen2.5-coder-1.5b"),
        "rows": [("top_recovery", "", "strongest single position"),
                 ("sum_of_single_recoveries", "", "sum of the single-position recoveries")],
    },
    "regime-long-topk-qwen2.5-coder-1.5b": {
        "shows": "step 5: P4/P5 cross-fitted top-k on the map's D = 48 F->R cells against matched random-k, 1.5B",
        **regime_long_records("topk", "qwen2.5-coder-1.5b"),
        "rows": [("n_down", "", "downstream tokens, mean over the pairs (no CI: a length, not an estimate)", "mean",
                  "no_ci", "no_ci"),
                 *(row for k in (8, 32) for row in (
                     ("topk_cf", str(k), f"top-{k} of the downstream, cross-fitted"),
                     ("null_matched", str(k), f"random-{k} matched null (median, 95 % band)", "median", "lo", "hi")))],
    },
    "circuit-components-qwen2.5-coder-1.5b": {
        "shows": "step 7: attention vs MLP write attribution at the top-1 note (paper_spec §4.3), per layout, 1.5B",
        **circuit_records("components", "qwen2.5-coder-1.5b"),
        "rows": [(str(t), "attn_share", f"attention share of the write by layer {t}") for t in (9, 14, 18, 27)],
    },
    "deep-d1-d2-qwen2.5-coder-1.5b": {
        "shows": "step 6, D1 (conclusion vs content) and D2 (write before read) on the trigger pairs, 1.5B, beside the "
                 "paper's numbers",
        "kind": "deep", "table": "deepmech", "models": ["qwen2.5-coder-1.5b"], "controls": ["D1", "D2"],
    },
    "deep-d3-qwen2.5-coder-1.5b": {
        "shows": "step 6, D3 (specificity at the longest downstream that flips: the map's D = 48 F->R cells), 1.5B, "
                 "beside the paper's numbers",
        "kind": "deep", "table": "deepmech", "models": ["qwen2.5-coder-1.5b"], "controls": ["D3"],
    },
    "deep-d4-d5-qwen2.5-coder-1.5b": {
        "shows": "step 6, D4 (false-note injection, F->R) and D5 (off-template tasks), 1.5B, beside the paper's "
                 "numbers",
        "kind": "deep", "table": "deepmech", "models": ["qwen2.5-coder-1.5b"], "controls": ["D4", "D5"],
    },
    "deep-xfamily-qwen2.5-coder-1.5b": {
        "shows": "step 6, D6: the paper's cancel/deny family (Family C) on the 1.5B, beside the paper's numbers",
        "kind": "deep", "table": "xfamily", "models": ["qwen2.5-coder-1.5b"], "controls": ["D6"],
    },
    "deep-xfamily-qwen2.5-coder-0.5b": {
        "shows": "step 6, D6 on the 0.5B: Family C changes its decision on no pair, so nothing is testable",
        "kind": "deep", "table": "xfamily", "models": ["qwen2.5-coder-0.5b"], "controls": ["D6"],
    },
    "deep-qwen2.5-coder-0.5b": {
        "shows": "step 6 on the 0.5B, which follows almost no F->R rule: D1-D5 say what they cannot test and why",
        "kind": "deep", "table": "deepmech", "models": ["qwen2.5-coder-0.5b"],
        "controls": ["D1", "D2", "D3", "D4", "D5"],
    },
    "circuit-heads-qwen2.5-coder-1.5b": {
        "shows": "step 7: read / write heads (paper_spec §4.1, §4.2), joint top-k ranked on held-out domains against "
                 "joint random-k nulls, 1.5B (R->F on five domains fixed before the run, for contrast, first)",
        **circuit_records("heads", "qwen2.5-coder-1.5b", ("rule_first", "field_first_user")),
        "rows": HEAD_ROWS,
        "digits": 2,
    },
    "circuit-direction-qwen2.5-coder-1.5b": {
        "shows": "step 7: difference-of-means conclusion direction at the notes (paper_spec §4.4), fitted "
                 "leave-one-domain-out, against norm-matched random directions, 1.5B, the three F->R layouts",
        **circuit_records("direction", "qwen2.5-coder-1.5b", CIRCUIT_LAYOUTS[1:]),   # the F->R layouts
        "rows": direction_rows((9, 14, 18), auc=True),
    },
    "circuit-components-qwen2.5-coder-0.5b": {
        "shows": "step 7: attention vs MLP write attribution on the 0.5B (R->F only: it includes no F->R pair)",
        **circuit_records("components", "qwen2.5-coder-0.5b", ("rule_first",)),
        "rows": [(str(t), "attn_share", f"attention share of the write by layer {t}") for t in (8, 12, 15, 23)],
    },
    "circuit-heads-qwen2.5-coder-0.5b": {
        "shows": "step 7: read / write heads on the 0.5B (R->F only: it includes no F->R pair)",
        **circuit_records("heads", "qwen2.5-coder-0.5b", ("rule_first",)),
        "rows": HEAD_ROWS,
        "digits": 2,
    },
    "circuit-direction-qwen2.5-coder-0.5b": {
        "shows": "step 7: the DoM conclusion direction on the 0.5B (R->F only: it includes no F->R pair)",
        **circuit_records("direction", "qwen2.5-coder-0.5b", ("rule_first",)),
        "rows": direction_rows((8, 12, 15, 19)),
    },
    "circuit-scrub-qwen2.5-coder-0.5b": {
        "shows": "step 7: causal scrubbing on the 0.5B (R->F only: it includes no F->R pair)",
        **circuit_records("scrub", "qwen2.5-coder-0.5b", ("rule_first",)),
        "rows": SCRUB_ROWS,
    },
    "circuit-scrub-qwen2.5-coder-1.5b": {
        "shows": "step 7: causal scrubbing of the notes (paper_spec §4.5), per layout (R->F first, for contrast), "
                 "1.5B",
        **circuit_records("scrub", "qwen2.5-coder-1.5b", CIRCUIT_LAYOUTS),
        "rows": SCRUB_ROWS,
    },
    "knockout-qwen2.5-coder-1.5b-diverse": {
        "shows": "knockout on the 1.5B: all downstream masked in every layer, per state; E4 attention mass",
        "records": [("knockout", "qwen2.5-coder-1.5b", "diverse")],
        "rows": [("field_only", "graded/1.0/mask/recovery", "field-only state, all downstream masked"),
                 ("stale", "graded/1.0/mask/recovery", "stale state, all downstream masked"),
                 ("oracle", "graded/1.0/mask/recovery", "oracle state, all downstream masked"),
                 ("oracle", "E4_attention_mass/field", "attention mass on the field (oracle)"),
                 ("oracle", "E4_attention_mass/downstream", "attention mass on the downstream (oracle)"),
                 ("oracle", "E4_attention_mass/sink", "attention mass on the first tokens (oracle)")],
        "digits": 3,
    },
    "wording-qwen2.5-coder-1.5b-diverse": {
        "shows": "Fig. 3d on the 1.5B: P(decision = new value's action) per note appended to the stale cache",
        "records": [("wording", "qwen2.5-coder-1.5b", "diverse")],
        "rows": [("p_decision_is_new_action", f"stale/{v}", f"stale cache + {label}")
                 for v, label in (("none", "no note"), ("value_only", "value"), ("update_tag", "tag"),
                                  ("override_full", "override"), ("conclusion", "re-evaluate"))],
    },
    "dose-qwen2.5-coder-1.5b-diverse_dose": {
        "shows": "dose-response on the 1.5B: field-only recovery per field placement, and Spearman rho",
        "records": [("dose", "qwen2.5-coder-1.5b", "diverse_dose")],
        "rows": [*(("by_level", f"{lv}/field_only_recovery", f"field-only, {lv}")
                   for lv in ("0_before_rule_far", "1_before_rule", "2_after_rule_far", "3_after_rule",
                              "4_after_rule_near")),
                 ("spearman_field_only_vs_distance", "", "Spearman rho(distance, field-only)", "rho")],
    },
    "decodability-qwen2.5-coder-1.5b-diverse_polarity": {
        "shows": "decodability on the 1.5B: accuracy on the arms where conclusion = field value, per anchor",
        "records": [("decodability", "qwen2.5-coder-1.5b", "diverse_polarity")],
        "rows": [("minority_arms", f"accuracy/{a}/{t}", f"{a}: {t.replace('_', ' ')} probe")
                 for a in ("field_line_end", "downstream_mean", "pre_decision", "decision")
                 for t in ("conclusion", "field_value")],
    },
}

OPEN = re.compile(r"<!-- numbers:(?P<id>[A-Za-z0-9_.+-]+) -->")
CLOSE = "<!-- /numbers -->"


class BlockError(Exception):
    """A README marker this script cannot fill (unknown id, no closing marker)."""


def _row_spec(row) -> dict:
    metric, key, label, *fields = row
    value, lo, hi = (list(fields) + [None, None, None])[:3]
    return {"metric": metric, "key": key, "label": label, "value": value or "mean", "lo": lo or "ci_lo",
            "hi": hi or "ci_hi"}


def _number(x, digits: int, is_p: bool = False) -> str:
    """x to `digits` decimals; a p-value (a row whose value field is p_...) to two significant digits."""
    return "n/a" if x is None else f"{x:.2g}" if is_p else f"{x:.{digits}f}"


def block_rows(spec: dict, results: Path) -> tuple[list[dict], list[dict]]:
    """The numbers of one block, one dict per (record, row), and the records' index rows."""
    rows, sources = [], []
    for probe, model, scenario, *rest in spec["records"]:
        tag = rest[0] if rest else None
        shown = rest[1] if len(rest) > 1 else model   # what the first column says for this record
        path = record_path(results, probe, model, scenario, tag)
        if not path.is_file():
            cmd = run_command(probe, model, scenario, tag)
            raise MissingRecord(f"missing record {path} (run: {cmd})", cmd)
        agg = load_aggregates(path)
        index = load_index(path).iloc[0]
        sources.append({"path": repo_relative(str(path)), "git_sha": plain_value(index["git_sha"]),
                        "n_scenarios": plain_value(index.get("n_scenarios"))})
        for row in map(_row_spec, spec["rows"]):
            hit = agg[(agg["metric"] == row["metric"]) & (agg["key"] == row["key"])]
            if hit.empty:
                where = row["metric"] + (f"/{row['key']}" if row["key"] else "")
                raise RecordError(f"record {path} has no aggregate '{where}' (block rows name it)")
            s = {k: plain_value(v) for k, v in hit.iloc[0].items()}
            rows.append({"model": shown, "label": row["label"], "value": s.get(row["value"]),
                         "lo": s.get(row["lo"]), "hi": s.get(row["hi"]), "n": s.get("n"), "k": s.get("k"),
                         "n_scenarios": s["n_clusters"] if s.get("n_clusters") is not None
                         else sources[-1]["n_scenarios"],   # a null band has no clusters: the record's count
                         "warning": s.get("warning"), "is_p": row["value"].startswith("p_")})
    return rows, sources


def _analysis_record(spec: dict, results: Path) -> tuple[Path, dict]:
    """(path, record) of a block's analysis file (spec["file"] under results), or MissingRecord naming the command."""
    path = Path(results) / spec["file"]
    if not path.is_file():
        raise MissingRecord(f"missing record {path} (run: {spec['command']})", spec["command"])
    return path, json.loads(path.read_text())


def _analysis_block(block_id: str, body: str, path: Path, rec: dict) -> str:
    """A block's body with the footer naming the analysis file, its record count and the records' git shas."""
    shas = sorted({str(r.get("git_sha"))[:7] for r in rec["records"]})
    return (f"\n{body}\n\n<sub>Generated by `figures/readme_numbers.py` (block `{block_id}`) from "
            f"`{repo_relative(str(path))}` ({len(rec['records'])} records, git {', '.join(shas)}).</sub>\n")


def render_measurements(block_id: str, spec: dict, results: Path) -> str:
    """A block of plain measurements (no intervals) from one JSON file's `aggregate`, e.g. the splice benchmark's."""
    path, rec = _analysis_record(spec, results)
    agg, digits = rec.get("aggregate", {}), spec.get("digits", 3)
    lines = ["| quantity | value |", "|---|---|"]
    for key, label in spec["rows"]:
        if key not in agg:
            raise RecordError(f"record {path} has no aggregate '{key}' (block rows name it)")
        lines.append(f"| {label} | {agg[key]:.{digits}g} |")
    sha = (rec.get("provenance") or {}).get("git_sha") or ""
    return (f"\n" + "\n".join(lines) + f"\n\n<sub>Generated by `figures/readme_numbers.py` (block `{block_id}`) "
            f"from `{repo_relative(str(path))}` (git {sha[:7]}).</sub>\n")


MIN_BOUNDARY_PAIRS = 5    # fewer included pairs in a (layout, Q, K)'s cells: its fitted boundary is not printed


def render_regime(block_id: str, spec: dict, results: Path) -> str:
    """A block from the regime map's analysis record (figures/regime_map.py): per cell of `spec["model"]` that
    matches `spec["where"]` ({factor: value}), the correct flips, the included pairs and field-only / downstream-only
    recovery with their CIs; then, per (layout, Q, K) of those cells, where the fitted field-only recovery falls
    below the boundary. The pilot's analysis (kind regime_pilot) has no boundary line."""
    path, rec = _analysis_record(spec, results)
    digits = spec.get("digits", 2)
    cells = rec["cells"] if rec["kind"] == "regime_pilot" else rec["models"].get(spec["model"], {}).get("cells", [])
    cells = [c for c in cells if c["model"] == spec["model"]
             and all(c[k] == v for k, v in spec.get("where", {}).items())]
    if not cells:
        raise RecordError(f"record {path} has no cell of {spec['model']} with {spec.get('where', {})}")

    def est(c):
        if c["mean"] is None:        # a cell where no pair passes the inclusion rule: a finding, said in words
            return "no pair included" if not c.get("n") else "n/a"
        ci = "" if c["lo"] is None else f" [{_number(c['lo'], digits)}, {_number(c['hi'], digits)}]"
        return f"{_number(c['mean'], digits)}{ci}"

    cols = spec.get("columns", ("order", "layout", "Q", "D"))
    lines = ["| " + " | ".join([*cols, "correct flips", "included", "their domains", "field-only", "downstream-only"])
             + " |", "|" + "---|" * (len(cols) + 5)]
    for c in cells:
        cf = c["correct_flip"]
        lines.append("| " + " | ".join([*(str(c[k]) for k in cols), f"{cf['k']}/{cf['n']}",
                                        f"{c['n_included']}/{c['n_gated']}", str(c["field_only"]["G"]),
                                        est(c["field_only"]), est(c["downstream_only"])]) + " |")
    body = "\n".join(lines)
    if rec["kind"] == "regime_map":
        keys = {(c["layout"], c["Q"], c["K"]) for c in cells}
        said = []
        for b in rec["models"][spec["model"]]["boundary"]["included"]:
            cell = (b["layout"], b["Q"], b["K"])
            if cell not in keys:
                continue
            behind = sum(c["n_included"] for c in cells if (c["layout"], c["Q"], c["K"]) == cell)
            if b.get("not_fitted"):
                said.append(f"{b['layout']}, Q {b['Q']}: not fitted (no pair of it passes the inclusion rule)")
            elif behind < MIN_BOUNDARY_PAIRS:
                said.append(f"{b['layout']}, Q {b['Q']}: not given ({behind} included pair{'s' * (behind != 1)} in "
                            f"its cells; the fit there would rest on the other cells' terms)")
            else:
                first = b["first_D_fitted_below"]
                said.append(f"{b['layout']}, Q {b['Q']}: "
                            + ("never below " + str(b["threshold"]) if first is None else
                               f"below {b['threshold']} from D = {first}"
                               + (f" (whole CI from D = {b['first_D_ci_below']})" if b["first_D_ci_below"]
                                  is not None else " (CI not wholly below at any measured D)")))
        if said:
            body += "\n\nFitted field-only recovery (regression on the included pairs): " + "; ".join(said) + "."
    return _analysis_block(block_id, body, path, rec)


def _span(values: list, digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "no pair included"
    lo, hi = min(values), max(values)
    return _number(lo, digits) if lo == hi else f"{_number(lo, digits)}–{_number(hi, digits)}"


def render_regime_headline(block_id: str, spec: dict, results: Path) -> str:
    """The map's headline from its analysis record: per rule order and question position (cells matching
    `spec["where"]`), how many cells, how many pairs a cell passes the inclusion rule, and the range of the cells'
    field-only and downstream-only means; then the regression's fitted field-only recovery (with its CI) at the
    smallest and the largest D measured in that layout and question position."""
    from figures.regime_map import RELAXED    # the analysis record's key of every gated pair with |delta m| >= 0.5
    path, rec = _analysis_record(spec, results)
    digits = spec.get("digits", 2)
    model = rec["models"].get(spec["model"])
    if not model:
        raise RecordError(f"record {path} has no cell of {spec['model']}")
    cells = [c for c in model["cells"] if all(c[k] == v for k, v in spec.get("where", {}).items())]
    lines = ["| order | question | cells | pairs included a cell | field-only (cell means) | downstream-only (cell "
             "means) | field-only, every pair with \\|Δm\\| ≥ 0.5 (cell means) | pairs with \\|Δm\\| ≥ 0.5 a "
             "cell |",
             "|---|---|---|---|---|---|---|---|"]
    for order in ("R->F", "F->R"):
        for q in ("last", "first"):
            sub = [c for c in cells if c["order"] == order and c["Q"] == q]
            if sub:
                lines.append(f"| {order} | {q} | {len(sub)} | {_span([c['n_included'] for c in sub], 0)} | "
                             f"{_span([c['field_only']['mean'] for c in sub], digits)} | "
                             f"{_span([c['downstream_only']['mean'] for c in sub], digits)} | "
                             f"{_span([c[f'field_only/{RELAXED}']['mean'] for c in sub], digits)} | "
                             f"{_span([c[f'field_only/{RELAXED}']['n'] for c in sub], 0)} |")
    fitted = []
    for b in model["boundary"]["included"]:
        if b.get("not_fitted") or any(b.get(k) != v for k, v in spec.get("where", {}).items()):
            continue
        measured = {c["D"] for c in cells if c["layout"] == b["layout"] and c["Q"] == b["Q"]}
        points = [p for p in b["points"] if p["D"] in measured]     # no extrapolation past the cells measured
        if not points:
            continue
        order = next(c["order"] for c in cells if c["layout"] == b["layout"])
        fitted.append((order != "R->F", b["layout"], b["Q"] != "last", "| " + " | ".join(
            [order, b["layout"], b["Q"], *(f"{_number(p['fitted'], digits)} [{_number(p['ci'][0], digits)}, "
                                          f"{_number(p['ci'][1], digits)}] at D = {p['D']}"
                                          for p in (points[0], points[-1]))]) + " |"))
    reg = model["regression"]["included"]
    body = "\n".join(lines)
    if fitted:
        k_term = " + K" if "C(K)" in reg["formula"] else ""
        body += (f"\n\nFitted field-only recovery, one gate ({reg['model']}{k_term} on every included pair"
                 f"{', four-gate ones too' if k_term else ''}: n = {reg['n']} pairs, {reg['G']} domains, CR2 "
                 "standard errors clustered by domain), at the smallest and the largest D measured:\n\n"
                 "| order | layout | question | smallest D | largest D |\n|---|---|---|---|---|\n"
                 + "\n".join(row for *_, row in sorted(fitted)))
    return _analysis_block(block_id, body, path, rec)


def render_deep(block_id: str, spec: dict, results: Path) -> str:
    """Step 6 rows from figures/deep_controls.py's tab:deepmech or tab:xfamily (spec["table"]), built from the records
    the same way the table is: our rows of `spec["models"]` and `spec["controls"]` as value [95 % CI], n, G and the
    note, and the paper's columns beside them (figures/paper_numbers.yaml, from paper_spec). A control without a row of
    ours for a model is a missing record: MissingRecord with deep_controls' command for it."""
    import contextlib
    import io

    from figures import deep_controls as dc
    reader = dc.Reader(results)
    paper = dc.load_paper_numbers()
    with contextlib.redirect_stdout(io.StringIO()):        # the reader prints every record it reads
        table = (dc.deepmech_table if spec["table"] == "deepmech" else dc.xfamily_table)(reader, spec["models"], paper)
    ours = table[table["model"].isin(spec["models"]) & table["control"].isin(spec["controls"])]
    for model in spec["models"]:
        for control in spec["controls"]:
            if ours[(ours["model"] == model) & (ours["control"] == control)].empty:
                cmd = dc.COMMANDS[control].format(model=model)
                raise MissingRecord(f"no {control} record of {model} under {results} (run: {cmd})", cmd)
    digits = spec.get("digits", 2)
    paper_cols = [c for c in table.columns if c.startswith("paper: ")]

    def num(x):          # a count (an integral number, ours or the paper's) prints as one
        if x is None or x != x:
            return ""
        integral = isinstance(x, int) or (hasattr(x, "dtype") and x.dtype.kind in "iu")
        if integral or (float(x).is_integer() and abs(x) > 1):
            return str(int(x))
        return _number(float(x), digits)

    head = ["control", "model", "regime", "quantity", "ours [95 % CI]", "n", "G", "p", *paper_cols, "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ours.to_dict("records"):
        val = num(r["value"]) + ("" if num(r["ci_lo"]) == "" else f" [{num(r['ci_lo'])}, {num(r['ci_hi'])}]")
        if val == "" and r["n"] == 0:
            val = "no pair included"
        pv = "" if r["p_value"] is None or r["p_value"] != r["p_value"] else _number(r["p_value"], 0, True)
        regime = r["regime"] if r["regime"] not in (None, "", "n/a") else "no rule order"   # e.g. off-template tasks
        lines.append("| " + " | ".join([r["control"], r["model"], regime, r["quantity"], val, num(r["n"]),
                                        num(r["G"]), pv, *(num(r[c]) for c in paper_cols),
                                        str(r["note"] or "").replace("|", "\\|")]) + " |")
    used = sorted({r["record"] for r in ours.to_dict("records") if r["record"]})
    shas = {repo_relative(src.path): str(plain_value(src.info["git_sha"]))[:7] for src in reader.loaded}
    made = ", ".join(f"`{p}` (git {shas[p]})" for p in used)
    return (f"\n" + "\n".join(lines) + f"\n\n<sub>Generated by `figures/readme_numbers.py` (block `{block_id}`) "
            f"through `figures/deep_controls.py` ({spec['table']}) from {made}; paper columns: "
            f"`figures/paper_numbers.yaml`.</sub>\n")


def render_block(block_id: str, spec: dict, results: Path) -> str:
    """The markdown that goes between a block's markers (a leading and a trailing newline included)."""
    if spec.get("kind") == "deep":
        return render_deep(block_id, spec, results)
    if spec.get("kind") == "regime":
        return render_regime(block_id, spec, results)
    if spec.get("kind") == "regime_headline":
        return render_regime_headline(block_id, spec, results)
    if "file" in spec:
        return render_measurements(block_id, spec, results)
    rows, sources = block_rows(spec, results)
    digits = spec.get("digits", 2)
    several = len(spec["records"]) > 1

    def ci(r):
        return "no CI" if r["lo"] is None else f"[{_number(r['lo'], digits)}, {_number(r['hi'], digits)}]"

    def n(r):
        return "" if r["n"] is None else f"{r['k']}/{r['n']}" if r["k"] is not None else str(r["n"])

    if spec.get("format", "table") == "sentence":
        def counts(r):
            return ", ".join(([f"n = {n(r)}"] if r["n"] is not None else [])
                             + ([f"{r['n_scenarios']} scenarios"] if r["n_scenarios"] is not None else []))

        parts = [f"{r['label']}{' (' + r['model'] + ')' if several else ''} {_number(r['value'], digits, r['is_p'])} "
                 f"{ci(r)}"
                 + (f" ({counts(r)})" if counts(r) else "") + (f", warning: {r['warning']}" if r["warning"] else "")
                 for r in rows]
        body = "; ".join(parts) + "."
    else:
        warn = any(r["warning"] for r in rows)
        head = ([spec.get("record_column", "model")] if several else []) + \
            ["quantity", "value", "95 % CI", "n", "scenarios"] + (["warning"] if warn else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            scen = "" if r["n_scenarios"] is None else str(r["n_scenarios"])
            cells = ([r["model"]] if several else []) + [r["label"], _number(r["value"], digits, r["is_p"]), ci(r),
                                                         n(r), scen]
            lines.append("| " + " | ".join(cells + ([r["warning"] or ""] if warn else [])) + " |")
        body = "\n".join(lines)
    made = ", ".join(f"`{s['path']}` (git {str(s['git_sha'])[:7]})" for s in sources)
    return f"\n{body}\n\n<sub>Generated by `figures/readme_numbers.py` (block `{block_id}`) from {made}.</sub>\n"


def blocks_in(text: str) -> list[tuple[str, int, int]]:
    """(block id, start, end) of the content between each opening marker and its closing marker."""
    found = []
    for m in OPEN.finditer(text):
        end = text.find(CLOSE, m.end())
        nxt = OPEN.search(text, m.end())
        if end < 0 or (nxt and nxt.start() < end):
            raise BlockError(f"block '{m.group('id')}' has no closing marker {CLOSE} before the next block")
        found.append((m.group("id"), m.end(), end))
    return found


def fill(text: str, results: Path = DEFAULT_RESULTS, blocks: dict | None = None) -> tuple[str, list[str]]:
    """`text` with every marked block regenerated; also the ids whose content changed."""
    blocks = BLOCKS if blocks is None else blocks
    out, last, changed = [], 0, []
    for block_id, start, end in blocks_in(text):
        if block_id not in blocks:
            raise BlockError(f"README block '{block_id}' is not declared in figures/readme_numbers.py BLOCKS "
                             f"(declared: {', '.join(blocks)})")
        new = render_block(block_id, blocks[block_id], results)
        if text[start:end] != new:
            changed.append(block_id)
        out += [text[last:start], new]
        last = end
    out.append(text[last:])
    return "".join(out), changed


def main(argv=None, blocks: dict | None = None) -> int:
    p = argparse.ArgumentParser(description="Fill the README's marked number blocks from the records.")
    p.add_argument("--readme", type=Path, default=DEFAULT_README)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--check", action="store_true", help="exit 1 if a block is stale; write nothing")
    p.add_argument("--list", action="store_true", help="print the declared block ids and what each shows")
    args = p.parse_args(argv)
    blocks = BLOCKS if blocks is None else blocks
    if args.list:
        for block_id, spec in blocks.items():
            print(f"{block_id}: {spec.get('shows', '')}")
        return 0
    text = args.readme.read_text()
    try:
        new, changed = fill(text, args.results, blocks)
    except (RecordError, BlockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    placed = {b for b, _, _ in blocks_in(text)}
    unplaced = [b for b in blocks if b not in placed]
    if unplaced:
        print(f"declared but not placed in {args.readme}: {', '.join(unplaced)}")
    if args.check:
        if changed:
            print(f"stale README block(s) in {args.readme}: {', '.join(changed)} "
                  f"(run: python figures/readme_numbers.py)", file=sys.stderr)
            return 1
        print(f"{args.readme}: {len(placed)} block(s) up to date")
        return 0
    if changed:
        args.readme.write_text(new)
        print(f"updated {len(changed)} block(s) in {args.readme}: {', '.join(changed)}")
    else:
        print(f"{args.readme}: {len(placed)} block(s) already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
