"""P9 wording ablation (paper_spec §1.8, §3.9, Fig. 3d): does the wording of an appended update note matter?

The paper appends notes of different wording to a prompt that already holds the new value and reports P(safe) per
wording (redundant notes ~1.0, "re-evaluate from scratch" 0.81), arguing that the note is read as a conclusion. Here
the decision is the greedy one-word readout decision, as in every other probe (no chain of thought on this CPU).

Each wording (the variant table of configs/probe/wording.yaml: templates over {field}, {old}, {new}) goes in as its
own paragraph at the site the scenario generator marks (`Instance.note_at`): right before the request paragraph
(diverse, every layout; for rule_first between the record and the request) or right before the TASK block
(family_a; the paper's place).
Two settings per wording:

  oracle   the prompt already holds the NEW value, plus the note (the paper's setting)
  stale    the OLD value in the record, plus the note, computed on top of the stale cache: the old prompt's prefill
           up to the insertion point is reused and only the note and the rest of the prompt are prefilled on top

By causality, cache + appended text equals a full prefill of the modified text; that is checked on the first
instance (a sanity check, true by construction up to numerics). The unmodified stale and oracle decodes are the
`states` every probe records, so readout choice and the inclusion rule are the shared ones (probes.common).
"""
from __future__ import annotations

import string
import time
from pathlib import Path

import torch
import yaml

from kvnotes import kv
from kvnotes.models import REPO_ROOT
from kvnotes.readout import candidate_logits
from kvnotes.stats import mcnemar_exact as mcnemar_p, summarize, summarize_proportion
from probes.base import ProbeSpec
from probes.common import Split, boot_args, end_states, pair_row, prefill_pair, readout_key
from scenarios.render import render_text, tokenize

CONTRACT = ProbeSpec(
    name="wording", paper_refs=("P9", "§3.9", "Fig. 3d"),
    # variants / baseline / paired_test: None takes them from configs/probe/wording.yaml (load_options)
    options={"batch_size": 16, "check_decode_instances": 1, "variants": None, "baseline": None, "paired_test": None},
    measure_options=("batch_size", "variants", "baseline", "paired_test"),
    # the families that mark the note's place; on diverse only field pairs (a trigger pair's field does not change,
    # so "the field has changed to ..." would be false; None: a config from before the `changes` param)
    scenarios={"diverse": {"changes": ("field", None)}, "family_a": {}, "pairs": {}},
    instance_needs={"note_at": "the update note's place (`note_at: [message, offset]` in a pairs file)"},
    reanalysable=True)
CONFIG = REPO_ROOT / "configs" / "probe" / "wording.yaml"
SETTINGS = ("oracle", "stale")
PLACEHOLDERS = ("field", "old", "new")
SUPPORTED = "diverse (every layout), family_a, and pairs files that give note_at"
OPTIONS = ("variants", "baseline", "paired_test")   # the probe options measure() takes from the probe config


def raw_from_row(row: dict, record: dict) -> dict:
    """measure()'s output for one pair from its record row (candidate logits of every wording x setting and of the
    plain states) and the record's wording block (the options every pair was measured with)."""
    raw = {**row["raw"], "options": {k: record["wording"][k] for k in OPTIONS}, "site": row["site"],
           "update_text": row["update_text"], "layout": row["layout"],
           "no_note_vs_plain_max_abs": row["no_note_vs_plain_max_abs"]}
    if "cached_vs_full_prefill_max_abs" in row:
        raw["cached_vs_full_prefill_max_abs"] = row["cached_vs_full_prefill_max_abs"]
    return raw


class UnsupportedFamilyError(ValueError):
    pass


# ---------------------------------------------------------------- the variant table
def load_options(path: Path | str = CONFIG) -> dict:
    """variants, baseline and paired_test as written in the probe config (the defaults of `measure`)."""
    cfg = yaml.safe_load(Path(path).read_text())
    return {k: cfg[k] for k in OPTIONS}


def check_options(variants: dict, baseline: str, paired_test) -> dict:
    """The options as plain data, or a ValueError saying what is wrong with them."""
    if not variants:
        raise ValueError("the wording probe needs at least one variant")
    table = {}
    for key, v in dict(variants).items():
        v = dict(v)
        if set(v) - {"label", "text"}:
            raise ValueError(f"variant {key!r}: unknown entries {sorted(set(v) - {'label', 'text'})}; "
                             f"a variant has a label and a text")
        text = v.get("text")
        if text is not None:
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            bad = sorted(names - set(PLACEHOLDERS))
            if bad:
                raise ValueError(f"variant {key!r}: unknown placeholders {bad} in {text!r}; "
                                 f"a template may use {{field}}, {{old}}, {{new}}")
        table[str(key)] = {"label": str(v.get("label", key)), "text": text}
    for what, key in [("baseline", baseline)] + [("paired_test", k) for k in (paired_test or [])]:
        if key not in table:
            raise ValueError(f"{what} names the unknown variant {key!r}; the variants are {sorted(table)}")
    if paired_test is not None and len(paired_test) != 2:
        raise ValueError(f"paired_test must name two variants, got {list(paired_test)}")
    return {"variants": table, "baseline": str(baseline), "paired_test": list(paired_test or [])}


def update_text(variants: dict, key: str, field: str, old: str, new: str) -> str | None:
    """The note of variant `key` for one instance (None: no note)."""
    if key not in variants:
        raise KeyError(f"unknown wording variant {key!r}; the variants are {sorted(variants)}")
    text = variants[key]["text"]
    return None if text is None else text.format(field=field, old=old, new=new)


# ---------------------------------------------------------------- where the note goes
def insertion_site(inst) -> str:
    """Where the note goes, as recorded: "<layout>/message <i>" (the scenario generator marks the site in
    `Instance.note_at`: the start of the request paragraph, or of the TASK block in family_a). UnsupportedFamilyError
    for an instance whose generator marked no site."""
    if not inst.note_at:
        raise UnsupportedFamilyError(f"{inst.id} (scenario {inst.scenario!r}): its generator marked no update-note "
                                     f"site (Instance.note_at); the wording probe supports {SUPPORTED}")
    layout = (inst.variant or {}).get("layout", "family_a" if inst.suffix else "unknown")
    return f"{layout}/message {inst.note_at[0][0]}"


def insert_update(inst, messages, text: str | None) -> tuple:
    """`messages` (the instance's old or new messages) with `text` as its own paragraph at the generator's note site
    (`text + "\\n\\n"` inserted there); unchanged for None."""
    insertion_site(inst)
    if text is None:
        return tuple(messages)
    arm = 0 if tuple(messages) == tuple(inst.old_messages) else 1
    if arm == 1 and tuple(messages) != tuple(inst.new_messages):
        raise ValueError(f"{inst.id}: insert_update takes the instance's own old or new messages")
    mi, at = inst.note_at[arm]
    msgs = [dict(m) for m in messages]
    c = msgs[mi]["content"]
    msgs[mi]["content"] = c[:at] + text + "\n\n" + c[at:]
    return tuple(msgs)


def render_variant(lm, inst, setting: str, text: str | None):
    """(prompt text, token ids) of one setting's prompt with the note, rendered and tokenized exactly as `align`."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    base = inst.old_messages if setting == "stale" else inst.new_messages
    spec = lm.spec
    rendered = render_text(insert_update(inst, base, text), lm.tokenizer, spec.get("plain_prompt"), inst.suffix,
                           inst.plain)
    return rendered, tokenize(rendered, lm.tokenizer, bool(spec.get("prepend_bos")))


def _common_prefix(x, y) -> int:
    m = min(len(x), len(y))
    neq = (x[:m] != y[:m]).nonzero()
    return int(neq[0]) if len(neq) else m


# ---------------------------------------------------------------- model work
def measure(lm, pair, token_ids, batch_size: int = 16, check_decode: bool = False, variants: dict | None = None,
            baseline: str | None = None, paired_test=None) -> dict:
    """Candidate-token logits of every wording x setting, plus the unmodified stale/oracle states."""
    t0 = time.time()
    defaults = load_options() if None in (variants, baseline, paired_test) else {}
    variants = variants if variants is not None else defaults["variants"]
    if paired_test is None:   # the configured pair, unless a variant table of one's own lacks it
        paired_test = defaults["paired_test"] if set(defaults["paired_test"]) <= set(variants) else []
    opts = check_options(variants, baseline if baseline is not None else defaults["baseline"], paired_test)
    table = opts["variants"]
    model, inst = lm.model, pair.instance
    token_ids = sorted(set(int(t) for t in token_ids))
    stale, oracle, last = prefill_pair(model, pair)
    states = end_states(model, stale, oracle, last, token_ids)
    a, b = pair.span
    texts = {k: update_text(table, k, inst.field, inst.old_value, inst.new_value) for k in table}
    base_ids = {"stale": pair.old_ids, "oracle": pair.new_ids}
    pre = kv.prefill(model, pair.old_ids[:a]) if a > 0 else None
    out = {"states": states, "token_ids": token_ids, "options": opts, "update_text": texts,
           "site": insertion_site(inst), "wording": {}, "layout": {}}
    checks, none_diffs = [], []
    for s in SETTINGS:
        ids = {k: render_variant(lm, inst, s, t)[1] for k, t in texts.items()}
        for k, v in ids.items():
            if texts[k] is None and not torch.equal(v, base_ids[s]):
                raise RuntimeError(f"{inst.id}: the {s} prompt without a note does not re-render to the aligned "
                                   f"pair's tokens; rendering here and in scenarios.render.align disagree")
            if int(v[-1]) != last:
                raise RuntimeError(f"{inst.id}, variant {k!r}: the note changes the decision token")
        noted = [_common_prefix(v, base_ids[s]) for k, v in ids.items() if texts[k] is not None]
        p = min(noted + [pair.dpos])                 # the insertion point: tokens before it are the plain prompt's
        if p < b:
            raise RuntimeError(f"{inst.id}: the note lands at token {p}, before the end of the field ({b})")
        shared = kv.prefill(model, base_ids[s][a:p], past=pre) if p > a else pre   # computed once per setting
        caches = {k: kv.prefill(model, v[p:len(v) - 1], past=shared) if len(v) - 1 > p else shared
                  for k, v in ids.items()}
        logits = {k: kv.decode(model, [c], last)[0] for k, c in caches.items()}
        rows = candidate_logits(torch.stack([logits[k] for k in table]), token_ids)
        out["wording"][s] = {k: {"logits": {str(t): x for t, x in cl.items()}, "lse": lse}
                             for k, (cl, lse) in zip(table, rows)}
        out["layout"][s] = {"insert_at": p, "L": {k: len(v) for k, v in ids.items()},
                            "note_tokens": {k: len(v) - len(base_ids[s]) for k, v in ids.items()}}
        plain = states[s]
        for k in table:
            if texts[k] is None:
                got = out["wording"][s][k]
                none_diffs += [abs(got["lse"] - plain["lse"])] + [abs(got["logits"][t] - plain["logits"][t])
                                                                 for t in plain["logits"]]
        if check_decode:   # cache up to the insertion point + appended text == full forward of the modified prompt
            checks += [float((logits[k] - kv.full_forward_last_logits(model, v)).abs().max()) for k, v in ids.items()]
    out["no_note_vs_plain_max_abs"] = max(none_diffs) if none_diffs else None
    if check_decode:
        out["cached_vs_full_prefill_max_abs"] = max(checks)
    out["seconds"] = round(time.time() - t0, 3)
    return out


# ---------------------------------------------------------------- statistics without the model
def mcnemar_exact(x: list, y: list, alpha: float = 0.05) -> dict:
    """Exact two-sided McNemar test on paired booleans: a binomial(n_discordant, 1/2) test of the discordant pairs,
    from statsmodels (`mcnemar(table, exact=True)`, through `kvnotes.stats.mcnemar_exact`; p = 1 without
    discordant pairs)."""
    if len(x) != len(y):
        raise ValueError(f"paired outcomes of different lengths: {len(x)} vs {len(y)}")
    only_x = sum(1 for u, v in zip(x, y) if u and not v)
    only_y = sum(1 for u, v in zip(x, y) if v and not u)
    n = only_x + only_y
    p = mcnemar_p(only_x, only_y)
    return {"n_pairs": len(x), "k_first_only": only_x, "k_second_only": only_y, "n_discordant": n,
            "p_exact_two_sided": p, "significant": p < alpha,
            "method": "exact McNemar (statsmodels; two-sided binomial test on discordant pairs; ignores clustering by "
                      "scenario)"}


def _direction(inst) -> str:
    if inst.kind == "control":
        return "control"
    return "new_implies_safe" if inst.expected_new == inst.safe else "new_implies_permissive"


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair decisions and margins per wording x setting, P(decision = the new value's action) with Wilson CIs,
    P(safe) by direction, margin shifts vs the baseline with cluster-bootstrap CIs, and exact McNemar tests."""
    opts = None
    split = Split(exclusion)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        if opts is None:
            opts = raw["options"]
        elif raw["options"] != opts:
            raise ValueError(f"{inst.id} was measured with other wording options than the first instance")
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        direction = _direction(inst)
        per = {}
        for s in SETTINGS:
            per[s] = {}
            for k in opts["variants"]:
                cl = {int(t): v for t, v in raw["wording"][s][k]["logits"].items()}
                dec = ro.decision(cl)
                per[s][k] = {"m": ro.margin(cl), "decision": dec, "decides_new_action": dec == inst.expected_new,
                             "decides_safe": dec == inst.safe,
                             "mass": round(ro.mass(cl, raw["wording"][s][k]["lse"]), 4)}
        row.update({"expected_old": inst.expected_old, "expected_new": inst.expected_new, "direction": direction,
                    "site": raw["site"], "update_text": raw["update_text"], "wording": per,
                    "layout": raw["layout"], "no_note_vs_plain_max_abs": raw["no_note_vs_plain_max_abs"],
                    "raw": {"token_ids": raw["token_ids"], "states": raw["states"], "wording": raw["wording"]}})
        if "cached_vs_full_prefill_max_abs" in raw:
            row["cached_vs_full_prefill_max_abs"] = raw["cached_vs_full_prefill_max_abs"]
        split.add(inst, row)

    keys, base = list(opts["variants"]) if opts else [], opts["baseline"] if opts else None
    included, controls, boot = split.included, split.controls, boot_args(stats)
    gated = included + split.excluded
    clusters = split.clusters
    agg = {"p_decision_is_new_action": {}, "p_safe_by_direction": {}, "margin_shift_vs_baseline": {},
           "margin_shift_toward_new_vs_baseline": {}, "paired_tests_vs_baseline": {}, "w16_paired_test": {},
           "all_gated_p_decision_is_new_action": {}, "control_p_decision_is_expected": {}}
    for s in SETTINGS:
        agg["p_decision_is_new_action"][s] = {
            k: summarize_proportion([r["wording"][s][k]["decides_new_action"] for r in included], clusters)
            for k in keys}
        agg["p_safe_by_direction"][s] = {}
        for k in keys:
            agg["p_safe_by_direction"][s][k] = {}
            for d in ("new_implies_safe", "new_implies_permissive"):
                rows = [r for r in included if r["direction"] == d]
                agg["p_safe_by_direction"][s][k][d] = summarize_proportion(
                    [r["wording"][s][k]["decides_safe"] for r in rows], [r["scenario"] for r in rows])
        shift = {k: [r["wording"][s][k]["m"] - r["wording"][s][base]["m"] for r in included] for k in keys}
        sign = [1.0 if r["direction"] == "new_implies_safe" else -1.0 for r in included]
        agg["margin_shift_vs_baseline"][s] = {k: summarize(shift[k], clusters, **boot) for k in keys}
        agg["margin_shift_toward_new_vs_baseline"][s] = {
            k: summarize([g * x for g, x in zip(sign, shift[k])], clusters, **boot) for k in keys}
        outcome = {k: [r["wording"][s][k]["decides_new_action"] for r in included] for k in keys}
        agg["paired_tests_vs_baseline"][s] = {k: mcnemar_exact(outcome[k], outcome[base], stats["alpha"])
                                              for k in keys if k != base}
        if opts and opts["paired_test"]:
            x, y = opts["paired_test"]
            test = mcnemar_exact(outcome[x], outcome[y], stats["alpha"])
            cx, cy = agg["p_decision_is_new_action"][s][x]["ci"], agg["p_decision_is_new_action"][s][y]["ci"]
            test.update({"first": x, "second": y, "outcome": "decision is the new value's action",
                         "wilson_cis_overlap": None if cx is None or cy is None else cx[0] <= cy[1] and cy[0] <= cx[1]})
            agg["w16_paired_test"][s] = test
        agg["all_gated_p_decision_is_new_action"][s] = {
            k: summarize_proportion([r["wording"][s][k]["decides_new_action"] for r in gated],
                                    [r["scenario"] for r in gated]) for k in keys}
        agg["control_p_decision_is_expected"][s] = {
            k: summarize_proportion([r["wording"][s][k]["decides_new_action"] for r in controls],
                                    [r["scenario"] for r in controls]) for k in keys}
    gc = [r["scenario"] for r in gated]
    agg["flip_rate"] = summarize_proportion([r["dec_stale"] != r["dec_oracle"] for r in gated], gc)
    agg["inclusion_rate"] = summarize_proportion(["reasons" not in r for r in gated], gc)

    rows = split.rows
    cached = [r["cached_vs_full_prefill_max_abs"] for r in rows if "cached_vs_full_prefill_max_abs" in r]
    sanity = {"cached_vs_full_prefill_max_abs": max(cached) if cached else None,
              "no_note_vs_plain_max_abs": max((r["no_note_vs_plain_max_abs"] for r in rows
                                               if r["no_note_vs_plain_max_abs"] is not None), default=None),
              "note": "cache up to the insertion point + the appended note and rest equals a full forward of the "
                      "modified prompt, and the no-note variant equals the plain stale/oracle decode: true by "
                      "construction (causality), checks not findings"}
    wording = {**(opts or {}), "settings": list(SETTINGS),
               "labels": {k: v["label"] for k, v in (opts or {}).get("variants", {}).items()},
               "decision": "greedy readout decision at the decision token (argmax over the candidate tokens); the "
                           "paper samples a chain of thought (T=0.7) and takes the decision after it",
               "outcome": "p_decision_is_new_action = P(decision == the action the NEW value implies); the paper's "
                          "P(safe) equals it on family_a, where the new value always implies the safe action; on "
                          "diverse half the pairs flip towards the permissive action, see p_safe_by_direction",
               "inclusion_note": "on included pairs with require_correct, the baseline decides the new action in "
                                 "the oracle setting and the old one in the stale setting by the inclusion rule"}
    return {**split.parts(), "wording": wording, "aggregate": agg, "sanity": sanity,
            "summary": split.summary(split.unaggregated("wording decisions"), n_variants=len(keys))}
