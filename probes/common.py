"""What every KV probe shares: prefilling an aligned pair once, the readout policy, the inclusion rule (paper_spec
§9.3 items 2 and 5), and splitting per-pair rows into included / excluded / controls."""
from __future__ import annotations

import torch

from kvnotes import kv
from kvnotes.readout import candidate_logits, candidate_tokens, choose_readout


def decision_token(pair) -> int:
    """The token at dpos, which both arms must share; ValueError for a misaligned pair."""
    last = int(pair.old_ids[pair.dpos])
    if last != int(pair.new_ids[pair.dpos]):
        raise ValueError(f"{pair.instance.id}: the decision token differs between the arms; the pair is misaligned")
    return last


def prefill_pair(model, pair):
    """(stale, oracle, last_token): caches of old[:dpos] and new[:dpos] (the shared prefix [0, a) computed once)."""
    dpos = pair.dpos
    last = decision_token(pair)
    a = pair.span[0]
    prefix = kv.prefill(model, pair.old_ids[:a]) if a > 0 else None
    stale = kv.prefill(model, pair.old_ids[a:dpos], past=prefix)
    oracle = kv.prefill(model, pair.new_ids[a:dpos], past=prefix)
    return stale, oracle, last


def end_states(model, stale, oracle, last, token_ids) -> dict:
    """Candidate-token logits and the vocabulary logsumexp of the unpatched stale and oracle decodes, in the form
    `probes.locality.choose_readouts` reads."""
    return states_of(kv.decode(model, [stale, oracle], last), token_ids)


def states_of(ends, token_ids) -> dict:
    """`end_states`' form from the stale and oracle decodes' logits ends [2, vocab] (however computed)."""
    return {s: {"logits": {str(t): v for t, v in cl.items()}, "lse": lse}
            for s, (cl, lse) in zip(("stale", "oracle"), candidate_logits(ends, token_ids))}


def exclusion_reasons(inst, dec_stale: str, dec_oracle: str, delta_m: float, rule: dict) -> list[str]:
    """Why a gated pair does not count (empty: it counts): no flip, wrong decisions, or |Δm| below τ."""
    reasons = []
    if rule["require_flip"] and dec_stale == dec_oracle:
        reasons.append(f"no decision flip: stale and oracle both decide {dec_stale!r}")
    if rule["require_correct"] and (dec_stale != inst.expected_old or dec_oracle != inst.expected_new):
        reasons.append(f"decisions (stale {dec_stale!r}, oracle {dec_oracle!r}) are not the ones the values "
                       f"imply ({inst.expected_old!r}, {inst.expected_new!r})")
    if abs(delta_m) < rule["min_abs_delta_m"]:
        reasons.append(f"|delta m| = {abs(delta_m):.3f} < tau = {rule['min_abs_delta_m']}")
    return reasons


def included_rows(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict) -> dict:
    """{instance id: (pair_row, included?)} at plan time (the readouts known): what a second pass plans from."""
    out = {}
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        out[inst.id] = (row, inst.kind == "gated" and not exclusion_reasons(inst, row["dec_stale"], row["dec_oracle"],
                                                                           row["delta_m"], exclusion))
    return out


def flip_direction(inst) -> str | None:
    """"allow->refuse" (the new value implies the restrictive answer), "refuse->allow", None for a pair whose
    values imply the same answer (controls), or "unspecified" for a user's pair that does not name its restrictive
    answer (counted in the pooled slices, in neither direction's)."""
    if inst.expected_old == inst.expected_new:
        return None
    if not inst.direction_known:      # a pairs file that does not say which answer is the restrictive one
        return "unspecified"
    return "allow->refuse" if inst.expected_new == inst.safe else "refuse->allow"


DIRECTIONS = ("allow->refuse", "refuse->allow")
RELAXED_TAU = 0.5   # the second inclusion level: every gated pair with |delta m| >= 0.5, flipping or not (issue 10 §3)


def readout_key(inst) -> tuple:
    return (tuple(inst.candidates), inst.safe, inst.unsafe)


def state_logits(raw, state) -> dict:
    """{token id: logit} of one unspliced or spliced state of a measured pair."""
    return {int(t): v for t, v in raw["states"][state]["logits"].items()}


def choose_readouts(tokenizer, instances, raws) -> dict:
    """One readout per group of instances sharing candidates and safe/unsafe words (a scenario, plus the controls
    that use its actions), chosen on the unpatched stale and oracle states only."""
    groups = {}
    for inst in instances:
        groups.setdefault(readout_key(inst), []).append(inst)
    out = {}
    for key, insts in groups.items():
        cands = candidate_tokens(tokenizer, list(key[0]))
        obs = [(state_logits(raws[i.id], s), raws[i.id]["states"][s]["lse"])
               for i in insts for s in ("stale", "oracle")]
        out[key] = choose_readout(cands, key[1], key[2], obs)
    return out


def pair_row(inst, tokens: dict, raw, ro) -> dict:
    """The fields every probe's per-pair row starts with: identity, token layout, stale/oracle margins and decisions."""
    m = {s: ro.margin(state_logits(raw, s)) for s in ("stale", "oracle")}
    dec = {s: ro.decision(state_logits(raw, s)) for s in ("stale", "oracle")}
    return {**inst.record_id(), "tokens": tokens, "m_stale": m["stale"], "m_oracle": m["oracle"],
            "delta_m": m["oracle"] - m["stale"], "dec_stale": dec["stale"], "dec_oracle": dec["oracle"]}


def margins(raw, ro, key: str = "rows", token_dim: int = -1) -> torch.Tensor:
    """m = logit(safe) - logit(unsafe) under readout `ro` for every row of candidate-token logits stored in
    `raw[key]` (token ids in `raw["token_ids"]`, laid out along `token_dim`)."""
    idx = {t: i for i, t in enumerate(raw["token_ids"])}
    rows = torch.tensor(raw[key], dtype=torch.float64)
    return rows.select(token_dim, idx[ro.safe_id]) - rows.select(token_dim, idx[ro.unsafe_id])


def recoveries(raw, ro, row: dict, key: str = "rows") -> torch.Tensor:
    """Recovery (m - m_stale) / delta_m of every stored row of `raw[key]` (0 = the stale decode, 1 = the oracle's),
    with m_stale and delta_m from the pair's `pair_row`; only defined when delta_m != 0."""
    return (margins(raw, ro, key) - row["m_stale"]) / row["delta_m"]


def band(li: int, n_layers: int) -> str:
    """The relative-depth band of layer `li`: early / mid / late thirds of the network."""
    return "early" if li < n_layers / 3 else "mid" if li < 2 * n_layers / 3 else "late"


def boot_args(stats: dict) -> dict:
    return {"n_boot": stats["n_boot"], "alpha": stats["alpha"], "seed": stats["seed"]}


class Split:
    """Per-pair rows sorted by the inclusion rule: controls apart, gated pairs included or excluded with reasons."""

    def __init__(self, rule: dict):
        self.rule = rule
        self.included, self.excluded, self.controls = [], [], []

    def add(self, inst, row: dict) -> None:
        if inst.kind == "control":
            self.controls.append(row)
            return
        reasons = exclusion_reasons(inst, row["dec_stale"], row["dec_oracle"], row["delta_m"], self.rule)
        if reasons:
            row["reasons"] = reasons
            self.excluded.append(row)
        else:
            self.included.append(row)

    @property
    def clusters(self) -> list:
        return [r["scenario"] for r in self.included]

    @property
    def rows(self) -> list:
        return self.included + self.excluded + self.controls

    def summary(self, finding: str | None = None, **extra) -> dict:
        return {"n_total": len(self.rows), "n_gated": len(self.included) + len(self.excluded),
                "n_included": len(self.included), "n_excluded": len(self.excluded),
                "n_controls": len(self.controls), **extra, "scenarios_included": sorted(set(self.clusters)),
                "finding": finding}

    def unaggregated(self, what: str) -> str | None:
        """The finding of a run where no gated pair counts (None otherwise)."""
        if self.excluded and not self.included:
            return f"no gated pair passes the inclusion rule; per-pair {what} are recorded but not aggregated"
        return None

    def relaxed(self, tau: float = RELAXED_TAU) -> list:
        """Every gated row (included or excluded) with |delta m| >= tau: a regime where the model rarely flips is not
        judged by its few flipping pairs alone."""
        return [r for r in self.included + self.excluded if abs(r["delta_m"]) >= tau]

    def slices(self, tau: float = RELAXED_TAU) -> dict:
        """The row sets every recovery is reported over: "included" (the inclusion rule), each flip direction of the
        included rows, and "abs_delta_m_ge_<tau>" with its directions. Rows need a "direction" key."""
        out = {"included": self.included}
        relaxed = self.relaxed(tau)
        for d in DIRECTIONS:
            out[f"included/{d}"] = [r for r in self.included if r.get("direction") == d]
        out[f"abs_delta_m_ge_{tau:g}"] = relaxed
        for d in DIRECTIONS:
            out[f"abs_delta_m_ge_{tau:g}/{d}"] = [r for r in relaxed if r.get("direction") == d]
        return out

    def parts(self) -> dict:
        return {"instances": self.included, "excluded": self.excluded, "controls": self.controls}
