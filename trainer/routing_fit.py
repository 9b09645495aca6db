"""Fitting the review policy a model card ships (models/routing/policy.py) on validation.

`routing_block` is what training calls to fill the card's `routing` section: the chosen
policy fitted on the validation split, its review cut for the budget, and its curve.
The comparison that chose the policy is studies/routing_eval.py (studies/routing_policies.py).
This module imports nothing of trainer.fit / trainer.ablation, so fit() may import it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from models.card import json_safe
from models.losses import IGNORE_INDEX
from models.neighbours import disagreement
from models.routing.gate import MIN_ERRORS
from models.routing.policy import (
    BUDGETS,
    Combine,
    PolicyInputs,
    RoutingPolicySpec,
    TaskHead,
    feature_matrix,
    itm_only,
    review_cut,
    uncertainty,
)
from trainer.calibration import Calibration
from trainer.evaluate import softmax
from trainer.train import EvalOutput

log = logging.getLogger(__name__)


def combined_features(tasks: Sequence[str], interactions: bool) -> list[str]:
    names = ["itm", "itm_missing"]
    for task in tasks:
        names += [f"p_{task}", f"margin_{task}"]
        if interactions:
            names.append(f"itm_x_margin_{task}")
    return names


def fit_combined(
    val: PolicyInputs,
    errors: Mapping[str, np.ndarray],
    labelled: Mapping[str, np.ndarray],
    *,
    interactions: bool = False,
    combine: str = "sum",
    features: Sequence[str] | None = None,
    c: float = 1.0,
) -> RoutingPolicySpec:
    """Per task, a logistic model of "the model is wrong on this post" on validation.
    A task with no errors (or only errors) on validation gets a constant head."""
    from sklearn.linear_model import LogisticRegression

    tasks = list(val.scores)
    names = list(features) if features is not None else combined_features(tasks, interactions)
    x = feature_matrix(val, names)
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (x - mean) / scale
    heads = {}
    for task in tasks:
        keep = labelled[task]
        y = errors[task][keep].astype(np.int64)
        if np.unique(y).size < 2:
            rate = float(y.mean()) if y.size else 0.0
            rate = min(max(rate, 1e-6), 1 - 1e-6)
            heads[task] = TaskHead([0.0] * len(names), math.log(rate / (1 - rate)))
            continue
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(z[keep], y)
        heads[task] = TaskHead([float(v) for v in clf.coef_[0]], float(clf.intercept_[0]))
    return RoutingPolicySpec(
        kind="combined",
        combine=combine,  # type: ignore[arg-type]
        features=names,
        mean=[float(v) for v in mean],
        scale=[float(v) for v in scale],
        heads=heads,
    )


NeighbourShares = Mapping[str, Mapping[str, np.ndarray]]  # space -> task -> [N, C] (NeighbourIndex.label_shares)


def policy_inputs(
    ev: EvalOutput, cal: Calibration, tasks: Sequence[str], shares: NeighbourShares | None = None
) -> tuple[PolicyInputs, dict[str, Any]]:
    """What the worker would see for each post (calibrated scores, thresholds, ITM match, and
    with `shares` the labelled neighbours' disagreement with each decision), plus per task the
    boolean "the model is wrong here" (NaN-free: unlabelled rows False) and the labelled mask."""
    scores, thresholds, errors, labelled = {}, {}, {}, {}
    for task in tasks:
        p = softmax(ev.logits[task], cal.temperatures.get(task, 1.0))[:, -1]
        th = cal.thresholds.get(task, 0.5)
        y = ev.labels[task]
        scores[task] = p
        thresholds[task] = th
        labelled[task] = y != IGNORE_INDEX
        errors[task] = labelled[task] & ((p >= th).astype(np.int64) != y)
    disagree: dict[str, np.ndarray] = {}
    if shares:
        decided = {t: (scores[t] >= thresholds[t]).astype(np.int64) for t in tasks}
        disagree = disagreement({s: {t: by[t] for t in decided if t in by} for s, by in shares.items()}, decided)
    return PolicyInputs(scores, thresholds, ev.itm_match, disagree), {
        "errors": errors,
        "labelled": labelled,
    }


ITM_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
NEIGHBOUR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0)
# Per task, margin + 2 x the disagreement averaged over the text and image spaces (= margin +
# the two spaces' disagreements), summed over tasks. Lifts on CM-Off are flat for weights 1-6
# (BENCHMARKS.md, "Routing"); 2 is the formula picked when first tried, before that sweep.
NEIGHBOUR_WEIGHT = 2.0


def _one_standard_error(caught: Sequence[tuple[float, RoutingPolicySpec]]) -> RoutingPolicySpec:
    """The first (simplest) policy whose caught errors are within sqrt(best) of the best."""
    best = max(c for c, _ in caught)
    return next(spec for c, spec in caught if c >= best - math.sqrt(best))


def _caught(spec: RoutingPolicySpec, val: PolicyInputs, errors: Mapping[str, np.ndarray], budget: float) -> float:
    reviewed = spec.review(val, review_cut(spec.scores(val), budget))
    return float(sum((reviewed & errors[t]).sum() for t in val.scores))


def neighbour_fill(val: PolicyInputs) -> float:
    """The disagreement assumed for a post without one: the validation median (no evidence)."""
    values = np.concatenate([d[~np.isnan(d)] for d in val.disagreement.values()] or [np.zeros(0)])
    return float(np.median(values)) if values.size else 0.5


def with_neighbours(
    val: PolicyInputs, weight: float = NEIGHBOUR_WEIGHT, task_combine: Combine = "sum"
) -> RoutingPolicySpec:
    """Per task, margin uncertainty + `weight` x the labelled neighbours' disagreement;
    summed over tasks (a post two tasks doubt is likelier wrong on one) or their maximum."""
    return RoutingPolicySpec(
        kind="uncertainty", task_combine=task_combine, neighbour_weight=weight, neighbour_fill=neighbour_fill(val)
    )


def fit_neighbour_weight(
    val: PolicyInputs,
    errors: Mapping[str, np.ndarray],
    labelled: Mapping[str, np.ndarray],
    budget: float,
    grid: Sequence[float] = NEIGHBOUR_WEIGHTS,
) -> RoutingPolicySpec:
    """`with_neighbours`, its weight picked on validation with the one-standard-error rule
    (see `fit_itm_weight`)."""
    wrong = {t: errors[t] & labelled[t] for t in val.scores}
    specs = [with_neighbours(val, w) for w in sorted(grid)]
    return _one_standard_error([(_caught(spec, val, wrong, budget), spec) for spec in specs])


def fit_itm_weight(
    val: PolicyInputs,
    errors: Mapping[str, np.ndarray],
    labelled: Mapping[str, np.ndarray],
    budget: float,
    grid: Sequence[float] = ITM_WEIGHTS,
) -> RoutingPolicySpec:
    """Margin uncertainty + w * (1 - ITM match), w picked on validation by the errors its
    review at `budget` catches (summed over tasks), with the one-standard-error rule: the
    smallest w within sqrt(best) caught errors of the best. A validation split of ~150
    posts cannot fit more than this one parameter, and without the rule noise picks w > 0."""
    present = ~np.isnan(val.itm)
    fill = float(np.median(val.itm[present])) if present.any() else 0.5
    wrong = {t: errors[t] & labelled[t] for t in val.scores}
    caught: list[tuple[float, RoutingPolicySpec]] = []
    for w in sorted(grid):
        spec = RoutingPolicySpec(kind="uncertainty", uncertainty="margin", itm_weight=w, itm_fill=fill)
        caught.append((_caught(spec, val, wrong, budget), spec))
    return _one_standard_error(caught)


def catch_stats(reviewed: np.ndarray, errors: np.ndarray) -> dict[str, float]:
    """Error recall (share of errors reviewed), review precision (errors per reviewed post),
    the reviewed share and lift = recall / reviewed share (= precision / base rate). `errors`
    per post: whether it is wrong, or how many of its task decisions are (pooled over tasks)."""
    n, n_err, n_rev = len(errors), int(errors.sum()), int(reviewed.sum())
    caught = int(errors[reviewed].sum())
    share = n_rev / n if n else math.nan
    recall = caught / n_err if n_err else math.nan
    return {
        "recall": recall,
        "precision": caught / n_rev if n_rev else math.nan,
        "reviewed_share": share,
        "lift": recall / share if n_err and n_rev else math.nan,
        "n": float(n),
        "n_errors": float(n_err),
        "n_reviewed": float(n_rev),
    }


# ---------------------------------------------------------------- the card


def _cross_fitted_scores(
    spec_of: Callable[[PolicyInputs, Mapping[str, Any]], RoutingPolicySpec],
    val: PolicyInputs,
    truth: Mapping[str, Any],
    k: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Each validation post scored by a policy fitted without it, so the card's curve of
    a fitted policy is not an in-sample number."""
    n = len(val)
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    for part in np.array_split(order, k):
        rest = np.setdiff1d(np.arange(n), part)
        sub_truth = {key: {t: v[rest] for t, v in truth[key].items()} for key in ("errors", "labelled")}
        out[part] = spec_of(val.take(rest), sub_truth).scores(val.take(part))
    return out


CHOSEN_POLICY = "uncertainty + neighbours (summed over tasks)"
# Without a neighbour index (a model trained without one) the card ships this instead.
FALLBACK_POLICY = "uncertainty (margin)"
NEEDS_NEIGHBOURS = (
    "uncertainty + neighbours",
    "uncertainty + neighbours (summed over tasks)",
    "uncertainty + neighbours (weight fitted)",
)
FITTED = ("uncertainty + ITM (weight fitted)", "uncertainty + neighbours (weight fitted)")


def choose_policy(
    val: PolicyInputs, truth: Mapping[str, Any], budget: float, name: str = CHOSEN_POLICY
) -> RoutingPolicySpec:
    """The policy the card ships, fitted on (all of) validation; see R-bench for the choice."""
    tasks = list(val.scores)
    errors = {t: truth["errors"][t] for t in tasks}
    labelled = {t: truth["labelled"][t] for t in tasks}
    fixed = {
        "ITM only": itm_only,
        "uncertainty (margin)": lambda: uncertainty("margin"),
        "uncertainty (entropy)": lambda: uncertainty("entropy"),
        "uncertainty (margin, summed over tasks)": lambda: uncertainty("margin", "sum"),
    }
    if name in fixed:
        return fixed[name]()
    if name == "uncertainty + ITM (weight fitted)":
        return fit_itm_weight(val, errors, labelled, budget)
    if name in NEEDS_NEIGHBOURS and not val.disagreement:
        raise ValueError(f"the routing policy {name!r} needs the labelled neighbours' disagreement")
    if name == "uncertainty + neighbours":
        return with_neighbours(val, task_combine="max")
    if name == "uncertainty + neighbours (summed over tasks)":
        return with_neighbours(val)
    if name == "uncertainty + neighbours (weight fitted)":
        return fit_neighbour_weight(val, errors, labelled, budget)
    if name == "combined (logistic)":
        return fit_combined(val, errors, labelled, interactions=False)
    if name == "combined (logistic + interactions)":
        return fit_combined(val, errors, labelled, interactions=True)
    raise ValueError(f"unknown routing policy {name!r}")


def routing_block(
    val_eval: EvalOutput,
    calibration: Calibration,
    tasks: Sequence[str],
    budget: float = 0.1,
    name: str = CHOSEN_POLICY,
    min_errors: int = MIN_ERRORS,
    neighbours: NeighbourShares | None = None,
) -> dict[str, Any]:
    """The card's `routing` section: the chosen policy fitted on validation, its review cut
    for `budget`, and its validation curve at 5/10/20% (cross-fitted for fitted policies).

    Empty (the card keeps the ITM gate) when validation holds fewer than `min_errors` model
    errors: a model that is (nearly) always right on validation gives uncertainty scores
    that are all about 0, and a cut taken from their quantile would send every live post
    to review (the default synthetic model did: 500 of 500).

    `neighbours`: the validation posts' label shares among their nearest training posts
    (models/neighbours.py); without them a neighbour policy falls back to FALLBACK_POLICY."""
    # Binary tasks with a validated threshold and labelled validation posts only (an untrained
    # head must not route): their errors are "score on the wrong side of the threshold".
    tasks = [t for t in tasks if t in calibration.thresholds and (val_eval.labels[t] != IGNORE_INDEX).any()]
    if not tasks:
        return {}  # nothing to route by: the card keeps the ITM gate
    if name in NEEDS_NEIGHBOURS and not neighbours:
        name = FALLBACK_POLICY
    val, truth = policy_inputs(val_eval, calibration, tasks, neighbours)
    n_errors = int(sum(truth["errors"][t].sum() for t in tasks))
    if n_errors < min_errors:
        log.info("no review policy on the card: %d validation errors, a policy needs %d", n_errors, min_errors)
        return {}
    spec = choose_policy(val, truth, budget, name)
    spec = replace(spec, cut=review_cut(spec.scores(val), budget), budget=budget, tasks=list(tasks))
    fitted = spec.kind == "combined" or name in FITTED
    if fitted and len(val) >= 20:
        held_out = _cross_fitted_scores(lambda v, t: choose_policy(v, t, budget, name), val, truth)
    else:
        held_out = spec.scores(val)
    curve: dict[str, Any] = {}
    for b in BUDGETS:
        reviewed = np.isfinite(held_out) & (held_out >= review_cut(held_out, b))
        curve[f"{b:g}"] = {
            task: {
                k: v
                for k, v in catch_stats(
                    reviewed[truth["labelled"][task]], truth["errors"][task][truth["labelled"][task]]
                ).items()
                if k in ("recall", "precision", "lift", "n_errors")
            }
            for task in tasks
        }
    spec.curve = {"split": "validation" + (" (cross-fitted, 5 parts)" if fitted else ""), **curve}
    out = json_safe(spec.to_dict())
    out["name"] = name
    return dict(out)
