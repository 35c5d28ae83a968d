"""P8 linear decodability and D2 commit depth (paper_spec §3.8, the probe part of §3.10 D1, §3.11 D2; the W13 fixes
of §8).

The claim: at prefill, the tokens after the changing span (the "aggregators") linearly encode the *conclusion* it
implies (allow vs deny), not just its content; and that note is written before the decision commits to it. Per gated
pair, one full forward of each arm (the whole prompt, `output_hidden_states`) keeps the residual stream at every
layer at four anchors defined from the token layout (span [a, b) = the aligned changing span, line_end = the end of
its line):

  field_line_end   the newline token ending the changing span's line (line_end - 1)
  downstream_mean  the mean over [line_end, dpos): everything after that line, before the decision token
  pre_decision     dpos - 1
  decision         dpos, the last prompt token, whose output is the decision

Layer indexing, one for everything here: index l = the residual stream after l decoder blocks = HF's
hidden_states[l] (0 = the token embeddings, n_layers = after the last block); depth = l / n_layers. The probes'
curves, write_depth and the commit depth all use it, so write and commit depths compare directly (the paper's
replication timing read the logit lens from layer 1 as its index 0, an off-by-one, §3.15 / §8 W13). One detail: at
l = n_layers HF's hidden_states holds the final norm's output; the probes use it as HF gives it, the logit lens
applies the norm to the final norm's input, so its index n_layers is exactly the model's own decision logits.

Three designs, each arm a sample: two of scenario family diverse and one of family_c (the contract accepts any of
them; one run uses one, `design_of` refuses a mix):
  polarity  (scenario=diverse_polarity: the field changes, the rule's polarity mixed) targets `conclusion` (the arm's
            value implies the restrictive action, deny / safe) and `field_value` (the arm's value is the one the
            *normal* rule allows, e.g. pending, admin, yes: a value class shared across domains). Within a pair both
            flip together, so each pair's contrast confounds them; conclusion = 1 - field_value on normal-rule arms
            and = field_value on inverted-rule arms, so only the inverted arms (the minority, `minority_arms`) tell
            them apart, and conclusion = field_value XOR polarity is not linearly decodable from separate field and
            rule representations unless the model has computed it. With the normal polarity only, the two targets
            are the same labels up to sign (the contract refuses that scenario).
  trigger   (scenario=diverse_trigger, Family B §1.3 / §3.10: the field value held byte-identical, one trigger word of
            the rule, after the field in F->R layouts, changes) targets `conclusion`, `field_value` (the pair's fixed
            field value is the domain's allowed value: the same label on both arms of a pair) and `trigger` (the
            arm's trigger word is the domain's allowed value). The rule names one value (its trigger); conclusion =
            field_value XOR trigger XOR [the rule names the disallowed value] (scenarios.diverse.conclusion).
            Confounds: within a pair trigger and conclusion flip together (every pair's contrast confounds them) and
            field_value does not move (it is in the shared prefix, before the span, and decodable from the context
            alone); across pairs, conclusion is trigger or 1 - trigger depending on the field value and on which
            value the rule names, so the dissociation from the trigger lives in the pairs whose field value makes
            conclusion != trigger's majority relation. A feature "field == trigger" (the match) is the conclusion up
            to the domain's named value: it decodes the conclusion only within the domains that name the same value,
            so LOSO across both kinds (agg.targets.rule_names) separates a computed conclusion from a match
            detector. With n_instances < 3 every field value is the allowed one: field_value is constant and not
            probed (agg.not_probed says so); n_instances a multiple of 4 fills each domain's 2x2 evenly.
  cancel    (scenario=family_c, family_c_field_first: order_status changes, the trigger held; family_c_trigger: the
            rule's trigger word changes, the order_status line held; Family C §1.4 / §3.15, the cross-family row of
            tab:xfamily) targets `conclusion` only (the arm's implied action is the restrictive one, deny / safe).
            The rule is "cancel iff order_status equals the trigger", and field and trigger range over four
            statuses, so no binary field-value or trigger class is shared across the four clusters
            (`cancel_<pair>_<held value>`): there is no second target, hence no dissociation, no correlation and no
            confounding number (agg.dissociation is empty per anchor and agg.dissociation_note says why). What the
            conclusion is confounded with: it is exactly "field != trigger" (the rule always names the status that
            allows), so a match detector and a computed conclusion are the same labels here; and within a pair it
            flips with the changing word, as in every design. LOSO holds out a whole held value: the held-out
            cluster's cancel arms carry a value that the training clusters show only on deny arms, so a reader of
            the changing word's identity gains nothing there (it points the wrong way). Both pair kinds probe the same
            target; n_instances a multiple of 8 gives the four clusters the same number of pairs (each pair has one
            arm of each class, so the classes are balanced within every cluster whatever n_instances).
The dissociation (the two diverse designs) is measured, not inferred (agg.dissociation, per anchor and per other
target): the samples on which a probe that reads only the other target must be wrong about the conclusion
(`disagreement`: the other target, mapped to the conclusion by the relation that holds on most samples, gives the
wrong conclusion), their count, pairs and scenarios, and each probe's held-out accuracy on them (at its best layer,
with a design-effect Wilson interval over scenarios; and per layer).

Probes, per anchor x layer x target, evaluated leave-one-scenario-out (LOSO: a domain is never in its own training
fold), answering the GroupKFold-by-(scenario, oid) leak of W13:
  * L2 logistic regression, objective 0.5 |w|^2 + C sum log-loss with C = 1 (the paper's C, sklearn's convention,
    intercept not penalised), on features standardised with the training fold's mean and sd. Solved to convergence
    by Newton's method in the span of the training samples (the optimum lies there; n << d), batched over layers,
    targets and permutations.
  * the paper's difference of means (w = mu1 - mu0 on raw residuals, threshold at the midpoint).
Best layer: per anchor and target, the layer of highest LOSO logistic accuracy, chosen in-sample: descriptive only.
Null (per anchor and target): the labels permuted within scenario (N_PERM = 2000 permutations), the same permutation
refitted LOSO at every layer of a fixed grid (`null_layers`: N_NULL_LAYERS evenly spaced layers counted down from the
last, fixed by the depth alone), and the MAXIMUM over the grid of the permuted accuracy taken; the observed statistic
is the maximum over the same grid, so choosing the layer on the data is part of the test. p_value = (1 + #{null max
>= observed max}) / (1 + N_PERM), with its floor p_floor = 1 / (1 + N_PERM) beside it. A target that is constant
within every pair (field_value of a trigger pair) is permuted pair by pair within scenario (`permute_within`'s
blocks): permuting arms would make labels no sample of that design can have. The grid rather than every layer
because of compute: a permutation costs one LOSO fit per scenario and layer, and on residuals the size of the
1.5B record (74 samples, 10 scenarios, 29 x 1536) the 7-layer grid took ~7 CPU-minutes for the 4 anchors (all 29
layers: ~28) on a shared machine, run as chunks of permutations on as many threads as torch has (so about half that
wall time on two free cores; N_NULL_LAYERS = 5 brings it to ~5 CPU-minutes).
Targets with the same per-scenario label counts (and the same permutation unit) have the same null distribution,
so a single permutation sample serves them (`permutation_orbit`): conclusion and field_value of the polarity design,
conclusion and trigger of the trigger design (one arm of each class per pair).
write_depth: the first layer whose LOSO conclusion accuracy is >= 0.9 (the paper's threshold), per anchor (and
<target>_depth the same for the other targets).

Commit depth (§3.11 D2, with W13's fixes): the logit lens at the decision position, m_l = logit(safe) -
logit(unsafe) under the record's readout of lm_head(final_norm(h_l)) for h_l the residual at the last prompt token
after l blocks (`logit_lens`; Gemma's final_logit_softcapping and tied embeddings through kvnotes.engine.unembed).
An arm commits at the first l from which sign(m_l) equals the sign of its expected conclusion at every later layer,
n_layers included (`commit_layer`; m = 0 is no sign). Arms that never commit (wrong sign at the last layer) are
counted by conclusion class, never dropped; the commit rate has a design-effect Wilson interval over scenarios, the
mean commit layer / depth a CR2 cluster-robust interval over scenarios on the committed arms (kvnotes.stats), on
the samples of the probes (both arms of every included pair), and over every gated arm as a second slice (inclusion
requires the decisions the values imply, so on included arms the last layer is right by selection). Per anchor,
write_minus_commit = write depth - mean commit depth (negative: the note is decodable before the decision commits).

Why a hand-written logistic solver and not scikit-learn (the library the guide prefers for models): the null needs
N_PERM x N_NULL_LAYERS x 4 anchors x (LOSO folds) = 2000 x 7 x 4 x 10 = 560,000 fits on the 1.5B record.
`sklearn.linear_model.LogisticRegression` solves one label vector per call; every permutation here shares its
design (the fold's standardised residuals) with thousands of others, so `_newton` solves them together: the
Hessians of a chunk of label vectors are one matrix product per design, converged problems retired. The observed
statistic and the null must come from the same estimator, so the observed fits use it too. It is checked against a
generic optimiser on the same objective (tests/test_decodability.py: the regularised optimum's gradient is 0 and
equals torch L-BFGS's; the batched fit equals the one-problem-at-a-time fit).
"""
from __future__ import annotations

import base64
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from kvnotes.engine import unembed
from kvnotes.readout import candidate_logits
from kvnotes.stats import MIN_NULL_DRAWS, pearson, summarize, summarize_proportion
from probes.base import ProbeSpec
from probes.common import Split, boot_args, end_states, margins, pair_row, prefill_pair, readout_key
from scenarios import diverse
from scenarios.offtemplate import gate_answer

CONTRACT = ProbeSpec(
    name="decodability", paper_refs=("P8", "§3.8", "§3.10", "§3.11"),
    options={"batch_size": 16},              # caches decoded per forward (the stale / oracle end states)
    # with the field changing under the normal polarity the conclusion and the field value are the same labels, so
    # one of two designs (base.ProbeSpec: a tuple of requirement dicts, any one suffices): the rule's polarity mixed
    # (the field changes; `changes` unset is the generator's "field"), or the rule's trigger word changes with the
    # field held fixed (Family B; the generator allows it only with the normal polarity, unset = "normal"); on
    # Family C (the cancel design: the conclusion only) either pair kind, field (unset = the generator's "field") or
    # trigger, in either order
    scenarios={"diverse": ({"polarity": ("mixed",), "changes": (None, "field")},
                           {"changes": ("trigger",), "polarity": (None, "normal")}),
               "family_c": {"pair": (None, "field", "trigger")}},
    not_reanalysable="the anchor residuals measure() returns are not kept in the record")

ANCHORS = ("field_line_end", "downstream_mean", "pre_decision", "decision")
TARGETS = ("conclusion", "field_value")                        # the polarity design's targets
DESIGN_TARGETS = {"polarity": TARGETS, "trigger": TARGETS + ("trigger",), "cancel": ("conclusion",)}
FAMILY_C_KEYS = ("pair", "field_old", "field_new", "trigger_old", "trigger_new")   # scenarios.offtemplate's variant
NO_DISSOCIATION = ("none: the cancel design (Family C) has one target, the conclusion. Its field and trigger range "
                   "over four statuses, so no binary field-value or trigger class is shared across clusters, and the "
                   "conclusion is exactly field != trigger (a match detector gives the same labels): there is no "
                   "second target to dissociate it from, so no dissociation, correlation or minority-arm test is "
                   "measured on this design")
C_REG = 1.0             # inverse L2 strength: 0.5 |w|^2 + C * sum(log-loss), as the paper's C = 1
N_PERM = 2000           # label permutations (within scenario) of the null: p floor 1/2001
N_NULL_LAYERS = 7       # layers in the null's grid (None: every layer); see null_layers
WRITE_THRESHOLD = 0.9   # write depth: first layer with LOSO conclusion accuracy >= this
NEWTON_MAX_ITERS = 50
NEWTON_TOL = 1e-10      # stop when every problem's Newton decrement^2 / 2 is below this
NEWTON_CHUNK = 256      # label vectors solved together per design
NULL_CHUNK = 512        # permutations per worker task of the null
PERM_SEED_OFFSET = 8    # the null's generator seed is stats.seed + this


# ---------------------------------------------------------------------------------------------- measurement
def anchor_positions(pair) -> dict:
    """Token positions of the anchors (downstream_mean as a [lo, hi) range); raises if one would not mean what its
    name says (no newline after the field, or nothing between the field's line and the decision token)."""
    a, b = pair.span
    e, d = pair.line_end, pair.dpos
    where = f"{pair.instance.id} (span [{a}, {b}), line_end {e}, dpos {d})"
    if e <= b:
        raise ValueError(f"{where}: no newline token after the field value; field_line_end would be the field itself")
    if e >= d:
        raise ValueError(f"{where}: no token between the field's line and the decision token; downstream_mean is empty")
    return {"field_line_end": e - 1, "downstream_mean": [e, d], "pre_decision": d - 1, "decision": d}


def final_norm(model) -> torch.nn.Module:
    """The norm between a causal LM's last decoder block and its unembedding (`model.get_decoder().norm`: Llama,
    Qwen2, Gemma-3). Raises ValueError naming the architecture when it keeps none there (then the logit lens needs
    that architecture's final norm named here)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ValueError(f"{type(model).__name__}: no final norm at get_decoder().norm; the logit lens "
                         f"(probes/decodability.py final_norm) must be told where this architecture keeps it")
    return norm


@torch.inference_mode()
def anchor_residuals(model, ids: torch.Tensor, anchors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One full forward of `ids` (1-D, the whole prompt; its last token is the decision anchor, else ValueError):
      residuals [n_anchors, n_layers + 1, d_model] fp32, ANCHORS order, index l = hidden_states[l] (after l blocks;
                0 = embeddings; n_layers = HF's last entry, the final norm's output),
      logits    [vocab] fp32, the model's own last-position logits,
      stream    [n_layers + 1, d_model] in the model's dtype: the decision position's residual after l blocks with
                the final norm's *input* at n_layers (caught by a hook), what `logit_lens` reads."""
    if anchors["decision"] != len(ids) - 1:
        raise ValueError(f"the decision anchor {anchors['decision']} is not the last of the {len(ids)} prompt tokens")
    caught = []
    hook = final_norm(model).register_forward_hook(lambda mod, args, out: caught.append(args[0]))
    try:
        out = model(input_ids=ids[None, :], use_cache=False, output_hidden_states=True, logits_to_keep=1)
    finally:
        hook.remove()
    if len(caught) != 1:
        raise ValueError(f"the final norm ran {len(caught)} times in one forward; the logit lens expects once")
    hs = torch.stack([h[0] for h in out.hidden_states]).float()   # [n_layers + 1, T, d]
    rows = []
    for name in ANCHORS:
        p = anchors[name]
        rows.append(hs[:, p[0]:p[1]].mean(dim=1) if isinstance(p, (list, tuple)) else hs[:, p])
    d = anchors["decision"]
    stream = torch.stack([h[0, d] for h in out.hidden_states[:-1]] + [caught[0][0, d]])
    return torch.stack(rows), out.logits[0, -1].float(), stream


@torch.inference_mode()
def logit_lens(model, stream: torch.Tensor, tokens=None) -> torch.Tensor:
    """Logits [n, len(tokens)] (all of the vocabulary when tokens is None), fp32, of residuals `stream` [n, d_model]
    taken *before* the final norm (anchor_residuals' stream): lm_head(final_norm(h)), through kvnotes.engine.unembed
    (the output embedding, tied to the input one or not, its bias, and final_logit_softcapping when the config sets
    it, as Gemma's do). For h = the final norm's input at the last prompt token this is the model's own decision
    logits (tests/test_deep_timing.py checks it on the three tiny architectures). paper_spec §3.11 D2. Raises
    ValueError as `final_norm` for an architecture without a known final norm."""
    head = model.get_output_embeddings().weight
    normed = final_norm(model)(stream.to(head.dtype))
    return unembed(model, normed, tokens).float()


def encode_array(x) -> dict:
    """A float array as base64 of float16 (float32 if a value overflows fp16), with its shape: compact JSON."""
    a = np.asarray(x, dtype=np.float32)
    h = a.astype(np.float16)
    if np.isfinite(h).all() or not np.isfinite(a).all():
        a = h
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    if not isinstance(d, dict) or not {"dtype", "shape", "b64"} <= set(d):
        raise ValueError("an encoded array must be a dict with dtype, shape and b64")
    if d["dtype"] not in ("float16", "float32"):
        raise ValueError(f"unsupported encoded dtype {d['dtype']!r}")
    a = np.frombuffer(base64.b64decode(d["b64"]), dtype=d["dtype"])
    return a.reshape(d["shape"]).astype(np.float32)


def measure(lm, pair, token_ids, batch_size: int = 16, check_decode: bool = False) -> dict:
    """Stale/oracle end states (as every probe, for the readout and the inclusion rule) and, for gated pairs, both
    arms' anchor residuals and the logit lens at the decision position: `lens` {arm: [n_layers + 1][candidate token]}
    logits in `token_ids` order (sorted), and `lens_vs_logits_max_abs`, the largest |lens at index n_layers - the
    full forward's logits| over the vocabulary (0 up to rounding: the lens's last layer is the model's decision).
    `check_decode` is unused: the decode step is compared with the full forward's last logits on every gated pair
    anyway (`decode_vs_forward_max_abs`). Raises ValueError as `anchor_positions` for a layout without anchors."""
    t0 = time.time()
    token_ids = sorted(set(int(t) for t in token_ids))
    model = lm.model
    stale, oracle, last = prefill_pair(model, pair)
    states = end_states(model, stale, oracle, last, token_ids)
    out = {"states": states, "token_ids": token_ids}
    if pair.instance.kind != "control":       # controls carry no label contrast: no residuals needed
        anchors = anchor_positions(pair)
        res, lens, diffs, lens_diffs, shape = {}, {}, [], [], None
        for arm, ids, state in (("old", pair.old_ids, "stale"), ("new", pair.new_ids, "oracle")):
            x, logits, stream = anchor_residuals(model, ids, anchors)
            shape = tuple(x.shape)
            res[arm] = encode_array(x.numpy())
            lens[arm] = logit_lens(model, stream, token_ids).tolist()
            lens_diffs.append(float((logit_lens(model, stream[-1:])[0] - logits).abs().max()))
            cl, lse = candidate_logits(logits[None], token_ids)[0]
            diffs += [abs(cl[t] - states[state]["logits"][str(t)]) for t in token_ids]
            diffs.append(abs(lse - states[state]["lse"]))
        out.update({"anchors": anchors, "n_layers": shape[1] - 1, "d_model": shape[2], "residuals": res,
                    "decode_vs_forward_max_abs": float(max(diffs)), "lens": lens,
                    "lens_vs_logits_max_abs": max(lens_diffs)})
    out["seconds"] = round(time.time() - t0, 3)
    return out


# ---------------------------------------------------------------------------------------------- probes
def loso_folds(groups):
    """(held-out group, train indices, test indices) per group, groups in sorted order."""
    groups = list(groups)
    labels = sorted(set(groups))
    if len(labels) < 2:
        raise ValueError(f"leave-one-scenario-out needs samples from at least 2 scenarios, got {labels}")
    for g in labels:
        tr = [i for i, x in enumerate(groups) if x != g]
        te = [i for i, x in enumerate(groups) if x == g]
        yield g, torch.tensor(tr, dtype=torch.long), torch.tensor(te, dtype=torch.long)


def _standardise(xtr: torch.Tensor, xte: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled with the training set's per-feature mean and sd (features [..., n, d]). Features constant on
    the training set are set to 0 in both sets: they carry no weight (and a layer whose features are all constant,
    e.g. the embedding of the same token, predicts from the intercept alone, exactly)."""
    mu = xtr.mean(dim=-2, keepdim=True)
    sd = xtr.std(dim=-2, unbiased=False, keepdim=True)
    varies = sd > 1e-6 * (mu.abs() + 1e-6)
    sd = torch.where(varies, sd, torch.ones_like(sd))
    zero = torch.zeros((), dtype=xtr.dtype)
    return torch.where(varies, (xtr - mu) / sd, zero), torch.where(varies, (xte - mu) / sd, zero)


def _span_coordinates(xtr: torch.Tensor, xte: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinates of the training rows (Z = U sqrt(L)) and test rows (K_te U / sqrt(L)) in an orthonormal basis of
    the training rows' span (K = X X^T = U L U^T), and the basis map M (w = M z in feature space). [B, n, d] inputs."""
    k = xtr @ xtr.transpose(-1, -2)
    lam, u = torch.linalg.eigh(k)
    top = lam[..., -1:].clamp_min(0)
    keep = (lam > 1e-10 * top) & (top > 0)
    sq = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    isq = torch.where(keep, 1 / lam.clamp_min(1e-300).sqrt(), torch.zeros_like(lam))
    z_tr = u * sq[..., None, :]
    basis = u * isq[..., None, :]                                # [B, n, r]
    return z_tr, (xte @ xtr.transpose(-1, -2)) @ basis, basis


def _newton(z: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """theta [P, B, r + 1] (coefficients, intercept) minimising 0.5 |coef|^2 + c * sum(log-loss) for every label
    vector y [P, n] (or [P, B, n]) on every design z [B, n, r]. Damped Newton (Armijo backtracking), each problem
    iterated until its own Newton decrement^2 / 2 is below NEWTON_TOL. One design at a time: its P problems share
    it, so their Hessians are one matrix product (see `_newton_one_design`), in chunks of NEWTON_CHUNK problems
    (a [chunk, r + 1, r + 1] Hessian stays in cache; 2000 at once spend a third of the time allocating)."""
    b_, n, r = z.shape
    y = y.to(z.dtype)
    theta = torch.zeros(y.shape[0], b_, r + 1, dtype=z.dtype)
    for bi in range(b_):
        yb = y if y.dim() == 2 else y[:, bi]
        for lo in range(0, y.shape[0], NEWTON_CHUNK):
            theta[lo:lo + NEWTON_CHUNK, bi] = _newton_one_design(z[bi], yb[lo:lo + NEWTON_CHUNK], c)
    return theta


def _newton_one_design(z: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """theta [P, r + 1] for labels y [P, n] on one design z [n, r], the P problems solved together:
      * the Hessians c Za' diag(w_p) Za + diag(reg) (Za = [z, 1]) of all of them are one [P, n] x [n, (r + 1)^2]
        product with the per-sample outer products of Za's rows; at the start (theta = 0, every w = 1/4) they are
        the same matrix, factorised once;
      * the Armijo line search tries the full Newton step first and backtracks (halving, 13 times at most; no
        decrease: stay put) only for the problems it fails;
      * a problem leaves the batch once its Newton decrement^2 / 2 is below NEWTON_TOL.
    Same iterates as one problem at a time, up to floating-point rounding."""
    n, r = z.shape
    k = r + 1
    za = torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], dim=-1)                # [n, k]
    outer = (za[:, :, None] * za[:, None, :]).reshape(n, k * k)                 # [n, k^2]
    reg = torch.ones(k, dtype=z.dtype)
    reg[-1] = 0.0                                                               # intercept not penalised
    ridge = reg + 1e-9
    steps = 0.5 ** torch.arange(14, dtype=z.dtype)                              # 1, 1/2, ..., 1/8192
    step_or_stay = torch.cat([steps, torch.zeros(1, dtype=z.dtype)])
    theta = torch.zeros(y.shape[0], k, dtype=z.dtype)
    active = torch.arange(y.shape[0])

    def objective(th, f, ya):                                                   # th [..., A, k], f [..., A, n]
        return 0.5 * (th[..., :-1] ** 2).sum(-1) + c * (F.softplus(f) - ya * f).sum(-1)

    for it in range(NEWTON_MAX_ITERS):
        th, ya = theta[active], y[active]
        f = th @ za.T                                                           # [A, n]
        p = torch.sigmoid(f)
        grad = reg * th + c * (p - ya) @ za
        if it == 0:                                                             # theta = 0: one shared Hessian
            hess = (c / 4) * (za.T @ za)
            hess.diagonal().add_(ridge)
            chol, info = torch.linalg.cholesky_ex(hess)
            hess, chol, info = hess.expand(len(active), k, k), chol.expand(len(active), k, k), info.expand(len(active))
        else:
            wts = c * (p * (1 - p)).clamp_min(1e-12)
            hess = (wts @ outer).view(-1, k, k)                                 # [A, k, k]
            hess.diagonal(dim1=-2, dim2=-1).add_(ridge)
            chol, info = torch.linalg.cholesky_ex(hess)
        half = torch.linalg.solve_triangular(chol, grad[..., None], upper=False)
        delta = -torch.linalg.solve_triangular(chol.mT, half, upper=True)[..., 0]
        bad = info != 0
        if bool(bad.any()):                                                     # not numerically SPD: general solve
            delta[bad] = -torch.linalg.solve(hess[bad], grad[bad][..., None])[..., 0]
        dec = -(grad * delta).sum(-1)                                           # Newton decrement^2 (>= 0)
        moving = dec / 2 >= NEWTON_TOL
        if not bool(moving.any()):
            break
        active, th, ya, f, delta, dec = (v[moving] for v in (active, th, ya, f, delta, dec))
        fd = delta @ za.T
        obj0 = objective(th, f, ya)
        step = torch.ones_like(dec)
        full_ok = objective(th + delta, f + fd, ya) <= obj0 - 1e-4 * dec
        back = ~full_ok
        if bool(back.any()):                                                    # backtrack where the full step fails
            cand = objective(th[back][None] + steps[1:, None, None] * delta[back][None],
                             f[back][None] + steps[1:, None, None] * fd[back][None], ya[back][None])   # [S - 1, A']
            ok = cand <= obj0[back][None] - 1e-4 * steps[1:, None] * dec[back][None]
            none = torch.full_like(dec[back], len(steps) - 1, dtype=torch.long)
            step[back] = step_or_stay[1:][torch.where(ok.any(0), ok.to(torch.float32).argmax(0), none)]
        theta[active] = th + step[:, None] * delta
    return theta


def fit_logistic(x, y, c: float = C_REG) -> tuple[torch.Tensor, float]:
    """(w [d], intercept) of the L2 logistic regression on raw features x [n, d] and labels y [n] (no
    standardisation): the solver the LOSO probe uses, exposed for checks."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    z, _, basis = _span_coordinates(x[None], x[None, :1])
    theta = _newton(z, y[None], c)[0, 0]
    w = x.T @ (basis[0] @ theta[:-1])
    return w, float(theta[-1])


def _check_labels(y: torch.Tensor, n: int) -> torch.Tensor:
    y = torch.as_tensor(y)
    y = y[None] if y.dim() == 1 else y
    if y.dim() != 2 or y.shape[1] != n:
        raise ValueError(f"labels must be [n] or [P, n] with n = {n}, got shape {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    return y.to(torch.float64)


def _check_groups(groups, n: int) -> None:
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} samples")


def _check_features(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x[None] if x.dim() == 2 else x
    if x.dim() != 3:
        raise ValueError(f"features must be [n, d] or [B, n, d], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or inf")
    return x


def _checked(x, y, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated features [B, n, d], labels [P, n], and the NaN-filled held-out output [P, B, n] of a LOSO probe."""
    x = _check_features(x)
    b_, n, _ = x.shape
    y = _check_labels(y, n)
    _check_groups(groups, n)
    return x, y, torch.full((y.shape[0], b_, n), float("nan"), dtype=torch.float64)


def loso_logistic(x, y, groups, c: float = C_REG) -> torch.Tensor:
    """Held-out P(label = 1) [P, B, n] of the standardised L2 logistic probe, leave-one-group-out.
    x: [B, n, d] (or [n, d]); y: [P, n] (or [n]) labels in {0, 1}; groups: n scenario labels."""
    x, y, out = _checked(x, y, groups)
    b_ = x.shape[0]
    for _, tr, te in loso_folds(groups):
        xtr, xte = _standardise(x[:, tr], x[:, te])
        z_tr, z_te, _ = _span_coordinates(xtr, xte)
        ytr = y[:, tr]
        theta = _newton(z_tr, ytr, c)
        f = torch.einsum("bmr,pbr->pbm", z_te, theta[..., :-1]) + theta[..., -1:]
        prob = torch.sigmoid(f)
        one_class = (ytr.min(1).values == ytr.max(1).values)                 # nothing to learn: predict that class
        prob[one_class] = ytr[one_class, :1, None].expand(-1, b_, len(te))
        out[:, :, te] = prob
    return out


def loso_diff_means(x, y, groups) -> torch.Tensor:
    """Held-out scores [P, B, n] of the difference-of-means probe (raw features, w = mu1 - mu0, threshold at the
    midpoint; score > 0 predicts 1), leave-one-group-out."""
    x, y, out = _checked(x, y, groups)
    b_ = x.shape[0]
    for _, tr, te in loso_folds(groups):
        ytr, xtr = y[:, tr], x[:, tr]
        n1, n0 = ytr.sum(1), (1 - ytr).sum(1)
        mu1 = torch.einsum("pn,bnd->pbd", ytr, xtr) / n1.clamp_min(1)[:, None, None]
        mu0 = torch.einsum("pn,bnd->pbd", 1 - ytr, xtr) / n0.clamp_min(1)[:, None, None]
        w = mu1 - mu0
        thr = (w * (mu1 + mu0) / 2).sum(-1)
        score = torch.einsum("bmd,pbd->pbm", x[:, te], w) - thr[..., None]
        one_class = (n1 == 0) | (n0 == 0)
        sign = torch.where(n1[one_class] > 0, 1.0, -1.0).to(score.dtype)
        score[one_class] = sign[:, None, None].expand(-1, b_, len(te))
        out[:, :, te] = score
    return out


def permute_within(y: np.ndarray, groups, n_perm: int, seed: int, blocks=None) -> np.ndarray:
    """[n_perm, n] copies of labels y [n], each permuted independently (uniformly) within every group. With `blocks`
    (one id per sample, e.g. the pair: samples of a block share their label and their group) whole blocks are
    permuted within every group, so each copy keeps every block's samples on one label. Raises ValueError for a
    block whose samples differ in label or in group."""
    if blocks is not None:
        blocks, y, groups = np.asarray(blocks), np.asarray(y), np.asarray(groups)
        _, first, inv = np.unique(blocks, return_index=True, return_inverse=True)
        if not (np.array_equal(y, y[first][inv]) and np.array_equal(groups, groups[first][inv])):
            raise ValueError("permute_within: every block's samples must share one label and one group")
        return permute_within(y[first], groups[first], n_perm, seed)[:, inv]
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    y = np.asarray(y)
    out = np.tile(y, (n_perm, 1))
    for g in sorted(set(groups.tolist())):
        idx = np.flatnonzero(groups == g)
        out[:, idx] = y[idx][rng.random((n_perm, len(idx))).argsort(axis=1)]
    return out


def null_layers(n_layers: int, n_grid: int | None = None) -> list[int]:
    """The hidden-state indices the permutation null maximises over: every s-th layer counted down from the last,
    s = ceil(n_layers / n_grid) (n_grid defaults to N_NULL_LAYERS), never the token embedding (index 0, the
    chance-level sanity check); every index 0..n_layers when n_grid is None and N_NULL_LAYERS is None. Fixed by
    n_layers alone, before any accuracy is seen."""
    n_grid = N_NULL_LAYERS if n_grid is None else n_grid
    if n_grid is None:
        return list(range(n_layers + 1))
    if n_grid < 1:
        raise ValueError(f"the null needs at least one layer, got n_grid = {n_grid}")
    step = max(1, math.ceil(n_layers / n_grid))
    return list(range(n_layers, 0, -step))[::-1]


def permutation_orbit(y, groups, blocks=None) -> tuple:
    """What a within-scenario permutation null of labels y depends on: per scenario, its number of samples and of
    label 1 (with `blocks`, as permute_within: its number of blocks and of blocks labelled 1, marked "blocks"). Two
    label vectors with the same orbit have the same null distribution (each is a within-scenario permutation of the
    other), so one null sample serves both."""
    if blocks is not None:
        first = {}
        for b, g, v in zip(blocks, groups, y):
            first.setdefault(b, (g, v))
        groups, y = [g for g, _ in first.values()], [v for _, v in first.values()]
    counts = {}
    for g, v in zip(groups, y):
        n, k = counts.get(g, (0, 0))
        counts[g] = (n + 1, k + int(v))
    return tuple(sorted(counts.items())) + (("blocks",) if blocks is not None else ())


@contextmanager
def one_torch_thread():
    """torch single-threaded inside (yields the thread count before). The probes' ops are small batched ones, on
    which torch's intra-op threads mostly wait for each other: the analysis of a 1.5B record took 97 s on two threads
    and 17 s on one, without the null."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def permutation_null(x, y, groups, layers: list[int], n_perm: int, seed: int, workers: int | None = None,
                     blocks=None) -> np.ndarray:
    """LOSO logistic accuracies [n_perm, len(layers)] of x [L + 1, n, d] at `layers`, for n_perm copies of labels
    y [n] permuted within scenario (`permute_within`; with `blocks`, whole blocks, e.g. pairs, permuted). The same
    permutation is applied at every layer, so `.max(1)` is the null of the maximum over those layers, the statistic
    whose layer is chosen on the data. Chunks of NULL_CHUNK permutations run single-threaded on `workers` threads in
    parallel (torch ops release the GIL; default: torch's thread count); the result does not depend on `workers`."""
    perm = torch.from_numpy(permute_within(np.asarray(y), groups, n_perm, seed, blocks)).to(torch.float64)
    xs = torch.as_tensor(x)[list(layers)]
    chunks = [perm[lo:lo + NULL_CHUNK] for lo in range(0, n_perm, NULL_CHUNK)]
    workers = max(1, min(torch.get_num_threads() if workers is None else workers, len(chunks)))

    def task(yp):
        torch.set_num_threads(1)        # per thread: OpenMP's thread count is each thread's own setting
        return loso_logistic(xs, yp, groups)

    with one_torch_thread(), ThreadPoolExecutor(workers) as pool:
        prob = torch.cat(list(pool.map(task, chunks)))                                  # [P, len(layers), n]
    return ((prob > 0.5).to(torch.float64) == perm[:, None, :]).to(torch.float64).mean(-1).numpy()


def max_over_layers_test(accs: list, layers: list[int], null_max: np.ndarray) -> dict:
    """The permutation test of the best layer with its choice inside: observed = max over `layers` of the accuracies
    `accs` (indexed by layer), null_max [P] = the same maximum under each of P permutations (`permutation_null`
    .max(1)); one-sided p = (1 + #{null >= observed}) / (1 + P), ties counted as >=, floor 1 / (1 + P)."""
    on_grid = [accs[li] for li in layers]
    gi = int(np.argmax(on_grid))
    n_perm = len(null_max)
    out = {"statistic": "max over null.layers of the LOSO logistic accuracy", "layers": list(layers),
           "observed": on_grid[gi], "observed_layer": layers[gi], "mean": float(null_max.mean()),
           "p95": float(np.percentile(null_max, 95)), "max": float(null_max.max()), "n_perm": n_perm,
           "permuted": "within scenario",
           "p_value": float((1 + np.sum(null_max >= on_grid[gi] - 1e-12)) / (1 + n_perm)),
           "p_floor": 1.0 / (1 + n_perm)}
    if n_perm < MIN_NULL_DRAWS:
        out["warning"] = f"only {n_perm} permutations (< {MIN_NULL_DRAWS}): p floor {1 / (1 + n_perm):.3g}"
    return out


# ---------------------------------------------------------------------------------------------- analysis
def is_family_c(inst) -> bool:
    """A Family C pair (scenarios.offtemplate.make_family_c: its variant names the pair kind and both arms' field
    and trigger)."""
    return all(k in inst.variant for k in FAMILY_C_KEYS)


def _design_of_one(inst) -> str:
    if is_family_c(inst):
        return "cancel"
    return "trigger" if inst.variant.get("changes") == "trigger" else "polarity"


DESIGN_SOURCES = {"polarity": "diverse field pairs (scenario=diverse_polarity)",
                  "trigger": "diverse trigger pairs (scenario=diverse_trigger)",
                  "cancel": "Family C pairs (scenario=family_c, family_c_field_first or family_c_trigger)"}


def design_of(instances) -> str:
    """The design of a run's gated pairs: "cancel" for Family C pairs (`is_family_c`; field or trigger pairs, the
    conclusion the only target), "trigger" when they change the rule's trigger word (variant changes == "trigger",
    scenario=diverse_trigger), else "polarity" (the field changes: diverse_polarity; also the normal-polarity
    diverse a direct call may pass, whose confounded targets the record then names). Raises ValueError for a run
    that mixes designs (their targets differ: run them as separate scenarios)."""
    kinds = {_design_of_one(i) for i in instances if i.kind != "control"}
    if kinds == {"trigger", "polarity"}:
        raise ValueError("decodability: the gated pairs mix trigger pairs and field pairs, whose targets differ; "
                         "run scenario=diverse_trigger and scenario=diverse_polarity as two runs")
    if len(kinds) > 1:
        raise ValueError("decodability: the gated pairs mix " + " and ".join(DESIGN_SOURCES[k] for k in sorted(kinds))
                         + ", whose designs and targets differ; run each as its own scenario")
    return kinds.pop() if kinds else "polarity"


def arm_labels(inst, arm: str) -> dict:
    """The arm's value (its changing word), implied action, polarity and targets (1/0): `conclusion` (the implied
    action is the restrictive one, inst.safe) for every pair and `field_value` for every diverse pair; a diverse
    trigger pair (variant changes == "trigger") also has `trigger` and its fixed `field` (`_trigger_labels`); a
    Family C pair has the conclusion only, with its pair kind and the arm's field and trigger words
    (`_cancel_labels`). Raises ValueError for an arm other than old / new, a polarity other than normal / inverted,
    or a trigger or Family C pair whose labels cannot be read."""
    if arm not in ("old", "new"):
        raise ValueError(f"arm must be 'old' or 'new', got {arm!r}")
    value = inst.old_value if arm == "old" else inst.new_value
    implied = inst.expected_old if arm == "old" else inst.expected_new
    if is_family_c(inst):
        return _cancel_labels(inst, arm, value, implied)
    if inst.variant.get("changes") == "trigger":
        return _trigger_labels(inst, arm, value, implied)
    pol = inst.variant.get("polarity", "normal")
    if pol not in ("normal", "inverted"):
        raise ValueError(f"{inst.id}: polarity must be 'normal' or 'inverted', got {pol!r}")
    restrictive = implied == inst.safe
    # the value the normal rule allows: it allows under normal polarity and denies under inverted polarity
    normally_allowed = (not restrictive) if pol == "normal" else restrictive
    return {"value": value, "implied": implied, "polarity": pol,
            "conclusion": int(restrictive), "field_value": int(normally_allowed)}


def _trigger_labels(inst, arm: str, trigger: str, implied: str) -> dict:
    """One arm of a trigger pair (paper_spec §1.3): `field` = the fixed field value (variant field_value), the arm's
    changing value is its trigger word; field_value / trigger = that value is the domain's allowed one (the value
    its normal rule allows, scenarios/domains/<domain>.yaml); conclusion = the implied action is the restrictive one.
    The domain is read from scenarios/domains/ and must imply the instance's own decisions
    (scenarios.diverse.conclusion); otherwise ValueError naming the pair and the fix."""
    v = inst.variant
    key = v.get("domain", inst.scenario)
    table = diverse.domain_table()
    if key not in table:
        raise ValueError(f"{inst.id}: a trigger pair of domain {key!r}, which scenarios/domains/ does not hold; its "
                         f"field_value and trigger targets need the domain's allowed value: use the built-in domains "
                         f"(scenarios.diverse.trigger_domains()) or add the domain file there")
    d, field = table[key], v.get("field_value")
    if trigger != v.get(f"trigger_{arm}"):
        raise ValueError(f"{inst.id}: the {arm} arm's changing value {trigger!r} is not its variant's trigger_{arm} "
                         f"{v.get(f'trigger_{arm}')!r}; only scenarios/diverse.py's trigger pairs can be labelled")
    if not {field, trigger} <= {d.allowed, d.disallowed}:
        raise ValueError(f"{inst.id}: field {field!r} and trigger {trigger!r} are not both among the domain's two "
                         f"values ({d.allowed!r}, {d.disallowed!r})")
    if diverse.conclusion(d, field, trigger) != implied:
        raise ValueError(f"{inst.id}: scenarios/domains/{key} implies {diverse.conclusion(d, field, trigger)!r} for "
                         f"field {field!r} and trigger {trigger!r}, the instance {implied!r}: the domain file is not "
                         f"the one the instances were made from (another domain_dirs?); regenerate them")
    return {"value": trigger, "implied": implied, "polarity": "normal", "field": field,
            "conclusion": int(implied == inst.safe), "field_value": int(field == d.allowed),
            "trigger": int(trigger == d.allowed)}


def _cancel_labels(inst, arm: str, value: str, implied: str) -> dict:
    """One arm of a Family C pair (paper_spec §1.4, scenarios.offtemplate.make_family_c): `pair` (field or trigger),
    the arm's `field` (order_status) and `trigger_word` (the rule's value) from the variant, and `conclusion` = the
    implied action is the restrictive one (deny). The arm's changing value must be its variant's field_<arm> (field
    pairs) or trigger_<arm> (trigger pairs), and the rule (cancel iff the field equals the trigger,
    scenarios.offtemplate.gate_answer) must imply the instance's own decision; otherwise ValueError naming the pair."""
    v = inst.variant
    kind, field, trigger = v["pair"], v[f"field_{arm}"], v[f"trigger_{arm}"]
    if kind not in ("field", "trigger"):
        raise ValueError(f"{inst.id}: a Family C pair of kind {kind!r}; only field and trigger pairs are labelled")
    changing = field if kind == "field" else trigger
    if value != changing:
        raise ValueError(f"{inst.id}: the {arm} arm's changing value {value!r} is not its variant's {kind}_{arm} "
                         f"{changing!r}; only scenarios/offtemplate.py's Family C pairs can be labelled")
    rule = gate_answer(field, trigger, {"allow": inst.unsafe, "refuse": inst.safe})
    if rule != implied:
        raise ValueError(f"{inst.id}: Family C's rule (cancel iff the field equals the trigger) implies {rule!r} for "
                         f"field {field!r} and trigger {trigger!r}, the instance {implied!r}: the pair was not made "
                         f"by scenarios.offtemplate.make_family_c; regenerate it")
    return {"value": value, "implied": implied, "polarity": "normal", "pair": kind, "field": field,
            "trigger_word": trigger, "conclusion": int(implied == inst.safe)}


def commit_layer(m, expected: int) -> int | None:
    """The commit layer of one arm (paper_spec §3.11 D2): the first index l of its logit-lens margins m
    [n_layers + 1] (m_l = logit(safe) - logit(unsafe) after l blocks; index 0 = the embeddings, the hidden_states
    indexing of write_depth) from which sign(m_l') == expected at every l' >= l, the last index included; None when
    the last index has another sign: the arm never commits. expected: +1 (the restrictive action, safe) or -1; a
    margin of exactly 0 has no sign. Raises ValueError for another `expected` or no margins."""
    if expected not in (1, -1):
        raise ValueError(f"commit_layer: expected must be +1 (restrictive) or -1 (permissive), got {expected!r}")
    signs = np.sign(np.asarray(m, dtype=np.float64))
    if signs.ndim != 1 or not len(signs):
        raise ValueError(f"commit_layer: margins must be a non-empty 1-D sequence, got shape {signs.shape}")
    layer = None
    for li in range(len(signs) - 1, -1, -1):
        if signs[li] != expected:
            break
        layer = li
    return layer


def commit_summary(rows: list, n_layers: int, boot: dict) -> dict:
    """The commit depth over both arms of record `rows` (each with `scenario`, `labels` and `commit_layer`, as
    analyse writes them): arms counted, committed and never committing (by conclusion class; none dropped), the
    commit rate (design-effect Wilson interval over scenarios) and the mean commit layer and depth (layer /
    n_layers, CR2 cluster-robust t interval over scenarios) of the committed arms (kvnotes.stats)."""
    arms = [(r, arm) for r in rows for arm in ("old", "new")]
    clusters = [r["scenario"] for r, _ in arms]
    layers = [r["commit_layer"][arm] for r, arm in arms]
    done = [(c, g) for c, g in zip(layers, clusters) if c is not None]
    never = {}
    for cls, name in ((1, "restrictive"), (0, "permissive")):
        mine = [c for (r, arm), c in zip(arms, layers) if r["labels"][arm]["conclusion"] == cls]
        never[f"conclusion={cls} ({name})"] = {"never": sum(c is None for c in mine), "arms": len(mine)}
    return {"n_arms": len(arms), "n_committed": len(done), "n_never": len(arms) - len(done),
            "never_by_class": never,
            "rate": summarize_proportion([c is not None for c in layers], clusters),
            "layer": summarize([c for c, _ in done], [g for _, g in done], **boot),
            "depth": summarize([c / n_layers for c, _ in done], [g for _, g in done], **boot)}


def _write_minus_commit(write: dict, commit: dict, n_layers: int) -> dict:
    """write depth (a layer of one anchor's LOSO conclusion curve) minus the mean commit depth of the committed
    arms, in layers and in depth; the interval is the commit depth's, shifted (the write depth is a threshold
    crossing with no interval of its own)."""
    note = ("write = first layer with LOSO conclusion accuracy >= the threshold at this anchor; commit = mean "
            "logit-lens commit layer of the committed arms at the decision token; both hidden_states indices (0 = "
            "embeddings). Negative: the note is decodable before the decision commits. The interval carries only "
            "the commit depth's uncertainty (the write depth has no interval of its own)")
    if write["layer"] is None or commit["layer"]["mean"] is None:
        why = ("the conclusion never reaches the write threshold at this anchor" if write["layer"] is None
               else "no arm commits")
        return {"layers": None, "depth": None, "ci_depth": None, "note": f"undefined: {why}"}
    ci = commit["depth"]["ci"]
    w = write["layer"] / n_layers
    return {"write_layer": write["layer"], "write_depth": write["depth"],
            "commit_layer_mean": commit["layer"]["mean"], "commit_depth_mean": commit["depth"]["mean"],
            "layers": write["layer"] - commit["layer"]["mean"], "depth": w - commit["depth"]["mean"],
            "ci_depth": [w - ci[1], w - ci[0]] if ci else None, "note": note}


def disagreement(conclusion, other, name: str = "other") -> dict:
    """Which samples a probe that reads only the target `other` must get wrong about the conclusion: `other` mapped
    to the conclusion by the relation that holds on more samples (conclusion = other, or conclusion = 1 - other)
    gives the wrong conclusion on exactly these. {"relation": the relation in words, None when both hold on equally
    many samples (a reader of `other` is then at chance, and the samples whose labels differ are taken),
    "holds_on": samples the relation holds on, "mask": [n] bools, True = disagrees}. Labels 0/1 of equal length,
    ValueError otherwise."""
    c, o = np.asarray(conclusion), np.asarray(other)
    if c.shape != o.shape or c.ndim != 1 or not np.isin(c, (0, 1)).all() or not np.isin(o, (0, 1)).all():
        raise ValueError(f"disagreement: two 1-D 0/1 label vectors of one length, got shapes {c.shape}, {o.shape}")
    same = int((c == o).sum())
    if same > len(c) - same:
        return {"relation": f"conclusion = {name}", "holds_on": same, "mask": (c != o).tolist()}
    if same < len(c) - same:
        return {"relation": f"conclusion = 1 - {name}", "holds_on": len(c) - same, "mask": (c == o).tolist()}
    return {"relation": None, "holds_on": same, "mask": (c != o).tolist()}


def dissociation(ys: dict, correct: dict, best: dict, groups: list, pairs: list, other: str) -> dict:
    """The conclusion told apart from the target `other` at one anchor, measured on the samples where they
    disagree (`disagreement`): how many, from how many pairs and scenarios, and each probed target's held-out LOSO
    logistic accuracy on them, at its best layer (design-effect Wilson interval over scenarios, kvnotes.stats) and
    at every layer (k / n), with the agreeing samples' accuracy beside it. ys: target -> labels [n] (conclusion and
    `other` at least); correct: probed target -> [n_layers + 1, n] held-out correctness (0/1); best: probed target
    -> its best layer; groups / pairs: the scenario / pair id of each sample. For a constant `other` the counts
    only, with a note (nothing to dissociate from). Raises ValueError as `disagreement`."""
    d = disagreement(ys["conclusion"], ys[other], other)
    idx = [i for i, x in enumerate(d["mask"]) if x]
    rest = [i for i, x in enumerate(d["mask"]) if not x]
    out = {"relation": d["relation"] or (f"none: conclusion = {other} and conclusion = 1 - {other} hold on equally "
                                         f"many samples; the disagreeing samples are those whose labels differ"),
           "relation_holds_on": d["holds_on"], "n_samples": len(idx), "n_pairs": len({pairs[i] for i in idx}),
           "n_scenarios": len({groups[i] for i in idx}), "n_agreeing": len(rest),
           "samples": (f"conclusion differs from what {other} gives under the relation: a probe that reads only "
                       f"{other} gets the conclusion wrong on them"),
           "accuracy": {}, "accuracy_by_layer": {}, "agreeing_accuracy": {}}
    if not idx:
        out["note"] = (f"no sample on which conclusion and {other} disagree: the dissociation from {other} cannot be "
                       f"measured on this run")
        return out
    if len(set(ys[other])) < 2:
        out["note"] = (f"{other} is constant over the samples: a reader of it knows nothing, the disagreeing samples "
                       f"are just one conclusion class, and accuracies on them would measure a probe's bias, so "
                       f"none are given; nothing to dissociate from on this run")
        return out
    for t, ok in correct.items():
        ok = torch.as_tensor(ok, dtype=torch.float64)
        out["accuracy"][t] = {"layer": best[t], **summarize_proportion([bool(ok[best[t], i]) for i in idx],
                                                                        [groups[i] for i in idx])}
        out["accuracy_by_layer"][t] = [{"layer": li, "k": int(ok[li, idx].sum()), "n": len(idx),
                                        "mean": float(ok[li, idx].mean())} for li in range(ok.shape[0])]
        if rest:
            out["agreeing_accuracy"][t] = {"layer": best[t], "k": int(ok[best[t], rest].sum()), "n": len(rest),
                                           "mean": float(ok[best[t], rest].mean())}
    return out


def _curve(correct: torch.Tensor, groups: list, n_layers: int) -> list:
    """Per layer: {layer, depth, mean, ci (Wilson), n, per_scenario, ...} from correct [B, n]."""
    return [{"layer": li, "depth": round(li / n_layers, 4),
             **summarize_proportion(correct[li].tolist(), groups)} for li in range(correct.shape[0])]


def _first_reaching(curve: list, threshold: float, n_layers: int) -> dict:
    for pt in curve:
        if pt["mean"] is not None and pt["mean"] >= threshold:
            return {"layer": pt["layer"], "depth": round(pt["layer"] / n_layers, 4), "accuracy": pt["mean"],
                    "ci": pt["ci"], "threshold": threshold}
    return {"layer": None, "depth": None, "accuracy": None, "ci": None, "threshold": threshold}


def _confounding(r: float | None, inclusion: dict | None = None, other: str = "field_value",
                 fix: str | None = None) -> str:
    """What the correlation r of conclusion and `other` over the samples allows one to conclude (inclusion: per
    polarity, the inclusion summaries of the gated pairs, to say why a mixed design ended up confounded; fix: the
    remedy to name instead of the polarity design's)."""
    if r is None:
        return f"the correlation of conclusion and {other} is undefined (a target is constant)"
    if abs(r) > 0.999:
        why = fix or "use polarity mixed (scenario=diverse_polarity) with n_instances >= 3"
        inclusion = inclusion or {}
        if fix is None and len(inclusion) > 1:
            why = "; ".join(f"{pol} pairs included {v['k']}/{v['n']}" for pol, v in sorted(inclusion.items()))
            why = f"only one polarity survives the inclusion rule ({why}): the model does not follow both rules"
        return (f"conclusion and {other} are the same labels up to sign (r = {r:+.2f}): the two targets are "
                f"confounded and comparing them means nothing ({why})")
    if abs(r) >= 0.5:
        return f"conclusion and {other} are partly confounded (r = {r:+.2f})"
    return f"conclusion and {other} are decorrelated (r = {r:+.2f})"


TRIGGER_FIX = "use n_instances a multiple of 4 (each domain's 2x2 of field and trigger filled evenly)"


def _design_confounding(design: str, rels: dict, inclusion: dict, not_probed: dict) -> str:
    """The confounding sentence of a design: the polarity design's (conclusion vs field_value), for trigger pairs one
    clause per other target (a constant target said to be so), for the cancel design (Family C) that it has none."""
    if design == "polarity":
        return _confounding(rels["conclusion~field_value"], inclusion)
    if design == "cancel":
        return ("cancel design (Family C): the conclusion is the only target and is exactly field != trigger, so a "
                "match detector gives the same labels; no second target is shared across clusters, so nothing is "
                "dissociated from it")
    return "; ".join(f"{t}: {not_probed[t]}" if t in not_probed else
                     _confounding(rels[f"conclusion~{t}"], other=t, fix=TRIGGER_FIX)
                     for t in ("field_value", "trigger"))


def _decisions_by_polarity(gated: list) -> dict:
    """Per polarity: how often the stale/oracle decisions follow the rule as written, follow the opposite-polarity
    rule (each arm decided as the other value implies), or do not flip at all."""
    out = {}
    for pol in sorted({r["polarity"] for r in gated}):
        rows = [r for r in gated if r["polarity"] == pol]
        clusters = [r["scenario"] for r in rows]
        out[pol] = {
            "follows_rule": summarize_proportion(
                [r["dec_stale"] == r["expected_old"] and r["dec_oracle"] == r["expected_new"] for r in rows], clusters),
            "follows_opposite_rule": summarize_proportion(
                [r["dec_stale"] == r["expected_new"] and r["dec_oracle"] == r["expected_old"] for r in rows], clusters),
            "no_flip": summarize_proportion([r["dec_stale"] == r["dec_oracle"] for r in rows], clusters)}
    return out


def minority_arms(rows: list) -> dict:
    """The polarity design's de-confounded test: held-out accuracy (at each anchor's best layer) on the arms whose
    conclusion equals their field value (pairs with the rule inverted that the model follows), where the two targets
    disagree with the majority relation, so a probe that only reads the field value is wrong on them. Reads record
    rows (`labels`, `heldout_p_at_best_layer`), so a figure can recompute it from a record. Wilson CIs over arms.
    (The general form, for any design and target, is `dissociation`.)"""
    arms = [(r, arm) for r in rows if "heldout_p_at_best_layer" in r for arm in ("old", "new")
            if r["labels"][arm]["conclusion"] == r["labels"][arm]["field_value"]]
    out = {"n_arms": len(arms), "n_pairs": len({r["id"] for r, _ in arms}),
           "arms": "conclusion == field_value (rule inverted and followed)", "accuracy": {}}
    for anchor in ANCHORS:
        out["accuracy"][anchor] = {
            t: summarize_proportion([(r["heldout_p_at_best_layer"][anchor][t][arm] > 0.5) == bool(r["labels"][arm][t])
                                     for r, arm in arms], [r["scenario"] for r, _ in arms])
            for t in TARGETS} if arms else {}
    return out


def _empty_aggregate(reason: str, targets: tuple = TARGETS) -> dict:
    return {"n_samples": 0, "note": reason, "logistic": {}, "diff_means": {}, "best_layer": {}, "write_depth": {},
            **{f"{t}_depth": {} for t in targets if t != "conclusion"}, "dissociation": {}, "write_minus_commit": {}}


COMMIT_METHOD = ("logit lens at the decision token: m_l = logit(safe) - logit(unsafe) (the record's readout) of "
                 "lm_head(final_norm(h_l)), h_l the residual after l blocks (l = hidden_states index, 0 = "
                 "embeddings, n_layers = the model's own logits); an arm commits at the first l from which "
                 "sign(m_l) is its expected conclusion's at every later l (restrictive: +); never committing arms "
                 "are counted by class, not dropped; depth = l / n_layers, as write_depth")


def analyse(instances, pairs_info: dict, raws: dict, readouts: dict, exclusion: dict, stats: dict) -> dict:
    """Per-pair rows (labels, logit-lens margins, commit layers), exclusions with reasons and controls, and the
    aggregate: per anchor x target LOSO probe curves, best layers with the max-over-layers permutation null, write
    depths, the dissociation on the disagreeing samples, the commit depth and write - commit per anchor (no model;
    module docstring). Raises ValueError for a gated pair measured without residuals or without the logit lens (a
    progress file from older code), residual arrays of different shapes, or arms whose labels cannot be read."""
    design = design_of(instances)
    targets = DESIGN_TARGETS[design]
    split = Split(exclusion)
    boot = boot_args(stats)
    for inst in instances:
        raw, ro = raws[inst.id], readouts[readout_key(inst)]
        row = pair_row(inst, pairs_info[inst.id], raw, ro)
        row.update({"expected_old": inst.expected_old, "expected_new": inst.expected_new,
                    "polarity": inst.variant.get("polarity", "normal"), "raw": raw["states"]})
        if inst.kind != "control":
            missing = [k for k in ("residuals", "lens") if k not in raw]
            if missing:
                raise ValueError(f"{inst.id}: gated pair measured without {' and '.join(missing)} (a progress file "
                                 f"written by older code?): delete the record's <name>.<hash>.json progress file "
                                 f"beside it and re-run")
            labels = {arm: arm_labels(inst, arm) for arm in ("old", "new")}
            lens = {arm: margins({"token_ids": raw["token_ids"], "rows": raw["lens"][arm]}, ro).tolist()
                    for arm in ("old", "new")}
            row.update({"anchors": raw["anchors"], "decode_vs_forward_max_abs": raw["decode_vs_forward_max_abs"],
                        "lens_vs_logits_max_abs": raw["lens_vs_logits_max_abs"], "labels": labels,
                        "lens_margin": lens,
                        "commit_layer": {arm: commit_layer(lens[arm], 1 if labels[arm]["conclusion"] else -1)
                                         for arm in ("old", "new")}})
        split.add(inst, row)

    gated = split.included + split.excluded
    n_layers = raws[gated[0]["id"]]["n_layers"] if gated else None
    commit = {"included": commit_summary(split.included, n_layers, boot) if gated else None,
              "gated": commit_summary(gated, n_layers, boot) if gated else None,
              "method": COMMIT_METHOD,
              "note": ("included: both arms of every included pair, the probes' samples (the inclusion rule keeps "
                       "pairs decided as their values imply, so the last layer's sign is right there by selection); "
                       "gated: every gated pair's arms, included or not")}
    inclusion = {pol: summarize_proportion(["reasons" not in r for r in gated if r["polarity"] == pol],
                                           [r["scenario"] for r in gated if r["polarity"] == pol])
                 for pol in sorted({r["polarity"] for r in gated})}
    sanity = {"decode_vs_forward_max_abs": max((r["decode_vs_forward_max_abs"] for r in gated), default=None),
              "lens_vs_logits_max_abs": max((r["lens_vs_logits_max_abs"] for r in gated), default=None),
              "note": ("the best layer of each anchor is chosen in-sample (on the same LOSO accuracies it reports): "
                       "its accuracy is optimistic and descriptive only. The p-value (best_layer.<anchor>.<target>."
                       "null) tests the maximum over the null's layer grid against the maximum over the same grid "
                       "under each within-scenario permutation, so the choice of layer is inside the test. At the "
                       "decision anchor the last layers encode the conclusion by selection: included pairs are those "
                       "the model decides as the values imply. lens_vs_logits_max_abs: the logit lens at the last "
                       "index against the model's own decision logits (0 up to rounding by construction: a check)")}
    parts = split.parts()

    decisions = _decisions_by_polarity(gated)

    def finish(agg, finding):
        agg["design"] = design
        if design == "cancel":
            agg["dissociation_note"] = NO_DISSOCIATION
        agg["commit"] = commit
        agg["inclusion_by_polarity"] = inclusion
        agg["decisions_by_polarity"] = decisions
        return {**parts, "aggregate": agg, "sanity": sanity,
                "summary": split.summary(finding, n_samples=agg.get("n_samples", 0))}

    if not split.included:
        msg = split.unaggregated("labels") or "no gated pair to probe"
        return finish(_empty_aggregate(msg, targets), msg)
    if len(set(split.clusters)) < 2:
        msg = (f"only one scenario ({split.clusters[0]}) has included pairs: leave-one-scenario-out probing needs "
               f"at least two")
        return finish(_empty_aggregate(msg, targets), msg)

    # samples: both arms of every included pair
    feats, groups, ys, owners = [], [], {t: [] for t in targets}, []
    shapes = set()
    for row in split.included:
        raw = raws[row["id"]]
        for arm in ("old", "new"):
            arr = decode_array(raw["residuals"][arm])
            shapes.add(arr.shape)
            feats.append(arr)
            groups.append(row["scenario"])
            owners.append((row["id"], arm))
            for t in targets:
                ys[t].append(row["labels"][arm][t])
    if len(shapes) != 1:
        raise ValueError(f"residual arrays of different shapes across pairs: {sorted(shapes)} (mixed models?)")
    n_anchor, n_hidden, d_model = shapes.pop()
    if n_anchor != len(ANCHORS):
        raise ValueError(f"residuals hold {n_anchor} anchors, expected {len(ANCHORS)} ({ANCHORS})")
    n_layers = n_hidden - 1
    n = len(groups)
    pairs = [rid for rid, _ in owners]
    probed = tuple(t for t in targets if len(set(ys[t])) == 2)
    not_probed = {t: (f"constant over the {n} samples (every label {ys[t][0]}): not probed"
                      + ("; the field of every included trigger pair holds the same value (n_instances < 3 gives "
                         "only the allowed one): use n_instances >= 4" if design == "trigger" else ""))
                  for t in targets if t not in probed}
    if "conclusion" not in probed:      # every gated pair implies two actions, so only a broken instance gets here
        msg = f"the conclusion is constant over the {n} samples: nothing to probe"
        return finish(_empty_aggregate(msg, targets), msg)
    # a target constant within every pair (a trigger pair's field value) is permuted pair by pair in the null
    pair_constant = {t: all(len({ys[t][i] for i in range(n) if pairs[i] == rid}) == 1 for rid in set(pairs))
                     for t in probed}
    allx = torch.from_numpy(np.stack(feats)).to(torch.float64)               # [n, A, L + 1, d]
    y = torch.tensor([ys[t] for t in probed], dtype=torch.float64)           # [T, n]
    rels = {f"conclusion~{t}": pearson(ys["conclusion"], ys[t]) for t in targets if t != "conclusion"}
    if design == "trigger":
        rels["field_value~trigger"] = pearson(ys["field_value"], ys["trigger"])
    cells = {}
    for i in range(n):
        key = ",".join(f"{t}={ys[t][i]}" for t in targets)
        cells[key] = cells.get(key, 0) + 1
    targets_block = {"design": design, "correlation": rels.get("conclusion~field_value"), "correlations": rels,
                     "confounding": _design_confounding(design, rels, inclusion, not_probed), "cells": cells,
                     **{t: {"positive_rate": float(np.mean(ys[t])), "probed": t in probed,
                            "constant_within_pairs": t in pair_constant and pair_constant[t]} for t in targets}}
    if design == "cancel":      # conclusion = [field != trigger]; a cluster holds one value (the word its pairs keep)
        labs = [row["labels"]["old"] for row in split.included]
        targets_block.update({
            "correlation_note": "no second target: " + NO_DISSOCIATION.removeprefix("none: "),
            "pair_kinds": sorted({lab["pair"] for lab in labs}),
            "held_value": {row["scenario"]: lab["trigger_word"] if lab["pair"] == "field" else lab["field"]
                           for row, lab in zip(split.included, labs)},
            "rule": "cancel iff the field equals the trigger, else deny: conclusion (deny) = field != trigger"})
    if design == "trigger":     # conclusion = field_value XOR trigger XOR [the rule names the disallowed value]
        names = {g: ys["conclusion"][i] ^ ys["field_value"][i] ^ ys["trigger"][i] for i, g in enumerate(groups)}
        targets_block["rule_names"] = {"allowed": sorted(g for g, v in names.items() if not v),
                                       "disallowed": sorted(g for g, v in names.items() if v)}
    seed = int(stats.get("seed", 0)) + PERM_SEED_OFFSET
    grid = null_layers(n_layers)

    agg = {"n_samples": n, "n_pairs": len(split.included), "n_scenarios": len(set(groups)), "n_layers": n_layers,
           "d_model": d_model, "anchors": list(ANCHORS), "targets": targets_block, "not_probed": not_probed,
           "method": {"cv": "leave-one-scenario-out", "logistic": {"C": C_REG, "objective":
                      "0.5 |w|^2 + C sum log-loss, intercept unpenalised, features standardised on the training fold",
                      "solver": "Newton in the span of the training samples, Armijo backtracking"},
                      "diff_means": "w = mu1 - mu0 on raw residuals, midpoint threshold",
                      "null": (f"{N_PERM} label permutations within scenario; statistic: the maximum over the "
                               f"layers {grid} of the LOSO logistic accuracy, observed and under each permutation "
                               f"(the same permutation at every layer); p = (1 + #null >= observed) / (1 + {N_PERM})"),
                      "permutation_unit": {t: "pair" if pair_constant[t] else "arm" for t in probed},
                      "null_layers": grid, "targets": list(probed),
                      "write_threshold": WRITE_THRESHOLD, "depth": "hidden_states index / n_layers",
                      "layer_index": ("hidden_states index: 0 = embeddings, l = after l blocks; the same index for "
                                      "write_depth and the commit depth"),
                      "dissociation": (NO_DISSOCIATION if design == "cancel" else
                                       "per anchor and other target: the samples on which a reader of the other "
                                       "target gets the conclusion wrong (probes.decodability.disagreement), the "
                                       "held-out accuracy of each probe on them")},
           "logistic": {}, "diff_means": {}, "best_layer": {}, "write_depth": {},
           **{f"{t}_depth": {} for t in targets if t != "conclusion"}, "dissociation": {}}
    heldout = {rid: {a: {} for a in ANCHORS} for rid in {o[0] for o in owners}}
    t_null = 0.0
    with one_torch_thread() as workers:                 # small batched ops: one torch thread, the null in parallel
        for ai, anchor in enumerate(ANCHORS):
            x = allx[:, ai].transpose(0, 1).contiguous()                      # [L + 1, n, d]
            prob = loso_logistic(x, y, groups)                                 # [T, L + 1, n]
            score = loso_diff_means(x, y, groups)
            correct_lr = (prob > 0.5).to(torch.float64) == y[:, None, :]
            correct_dm = (score > 0).to(torch.float64) == y[:, None, :]
            agg["logistic"][anchor], agg["diff_means"][anchor], agg["best_layer"][anchor] = {}, {}, {}
            nulls, bests = {}, {}                                               # label orbit -> (target, null max)
            for ti, target in enumerate(probed):
                curve = _curve(correct_lr[ti], groups, n_layers)
                agg["logistic"][anchor][target] = curve
                agg["diff_means"][anchor][target] = _curve(correct_dm[ti], groups, n_layers)
                accs = [pt["mean"] for pt in curve]
                best = bests[target] = int(np.argmax(accs))                     # ties: the earliest layer
                blocks = pairs if pair_constant[target] else None
                orbit = permutation_orbit(ys[target], groups, blocks)
                if orbit not in nulls:                                          # one null per label orbit
                    t0 = time.time()
                    per_layer = permutation_null(x, ys[target], groups, grid, N_PERM, seed + 31 * ai + ti,
                                                 workers, blocks)
                    t_null += time.time() - t0
                    nulls[orbit] = (target, per_layer.max(1))
                permuted, null_max = nulls[orbit]
                agg["best_layer"][anchor][target] = {
                    "layer": best, "depth": round(best / n_layers, 4), "accuracy": accs[best], "ci": curve[best]["ci"],
                    "n": curve[best]["n"], "per_scenario": curve[best]["per_scenario"],
                    "diff_means_accuracy": agg["diff_means"][anchor][target][best]["mean"],
                    "diff_means_best": max(pt["mean"] for pt in agg["diff_means"][anchor][target]),
                    "selection": "in-sample (argmax over layers of the reported LOSO accuracy): descriptive; the "
                                 "test is null.p_value, on the maximum over null.layers",
                    "null": {**max_over_layers_test(accs, grid, null_max), "labels_permuted": permuted}}
                for k, (rid, arm) in enumerate(owners):
                    heldout[rid][anchor].setdefault(target, {})[arm] = round(float(prob[ti, best, k]), 4)
            agg["write_depth"][anchor] = _first_reaching(agg["logistic"][anchor]["conclusion"], WRITE_THRESHOLD,
                                                         n_layers)
            for t in targets[1:]:
                agg[f"{t}_depth"][anchor] = (_first_reaching(agg["logistic"][anchor][t], WRITE_THRESHOLD, n_layers)
                                             if t in probed else {"layer": None, "depth": None, "accuracy": None,
                                                                  "ci": None, "threshold": WRITE_THRESHOLD,
                                                                  "note": not_probed[t]})
            correct = {t: correct_lr[ti] for ti, t in enumerate(probed)}
            agg["dissociation"][anchor] = {other: dissociation(ys, correct, bests, groups, pairs, other)
                                           for other in targets if other != "conclusion"}
    for row in split.included:
        row["heldout_p_at_best_layer"] = heldout[row["id"]]
    if design == "polarity":
        agg["minority_arms"] = minority_arms(split.included)
    agg["write_minus_commit"] = {a: _write_minus_commit(agg["write_depth"][a], commit["included"], n_layers)
                                 for a in ANCHORS}
    sanity["null_seconds"] = round(t_null, 2)
    sanity["layer0_pointwise_accuracy"] = {
        a: {t: agg["logistic"][a][t][0]["mean"] for t in probed} for a in ("field_line_end", "pre_decision",
                                                                        "decision")}
    sanity["layer0_note"] = ("layer 0 is the token embedding: at a single-token anchor every sample has the same "
                             "token, so these accuracies must be at chance (0.5 with balanced labels)")

    best = agg["best_layer"]

    def test(nl):
        return f"max over the null grid {nl['observed']:.2f}, p = {nl['p_value']:.2g} (floor {nl['p_floor']:.1g})"

    bits = [f"{a}: " + " vs ".join(f"{t} {best[a][t]['accuracy']:.2f} (layer {best[a][t]['layer']}; "
                                   f"{test(best[a][t]['null'])})" for t in probed) for a in ANCHORS]
    dis = agg["dissociation"]["decision"]
    dis_bits = [f"{o}: {dis[o]['n_samples']} samples from {dis[o]['n_pairs']} pairs, {dis[o]['n_scenarios']} "
                f"scenarios" + (f", conclusion accuracy {dis[o]['accuracy']['conclusion']['mean']:.2f}"
                                if dis[o]["accuracy"] else "") for o in dis]
    dis_sentence = ("No dissociation is measured: the cancel design has no second target" if design == "cancel" else
                    "Samples where a reader of the other target gets the conclusion wrong (decision anchor, best "
                    "layer): " + "; ".join(dis_bits))
    ci = commit["included"]
    depth = ci["depth"]
    commit_bit = (f"logit-lens commit at the decision token on {ci['n_committed']}/{ci['n_arms']} included arms"
                  + (f", mean depth {depth['mean']:.2f}" + (f" [{depth['ci'][0]:.2f}, {depth['ci'][1]:.2f}]"
                                                              if depth["ci"] else "") if depth["mean"] is not None
                     else "") + " (never: " + ", ".join(f"{v['never']}/{v['arms']} {k}" for k, v in
                                                          ci["never_by_class"].items()) + ")")
    finding = (f"{targets_block['confounding']}. Best-layer LOSO logistic accuracy over {n} samples from "
               f"{len(set(groups))} scenarios (best layer chosen in-sample, descriptive; p-values from {N_PERM} "
               f"within-scenario permutations of the maximum over layers {grid}): " + "; ".join(bits) + ". "
               f"{dis_sentence}. {commit_bit}.")
    return finish(agg, finding)
