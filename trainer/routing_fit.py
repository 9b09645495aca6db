"""Fitting the review policy a model card ships (models/routing_policy.py) on validation.

`routing_block` is what training calls to fill the card's `routing` section: the chosen
policy fitted on the validation split, its review cut for the budget, and its curve.
The comparison that chose the policy is trainer/routing_eval.py (bench/routing_policies.py).
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
from models.routing_gate import MIN_ERRORS
from models.routing_policy import (
    BUDGETS,
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


def policy_inputs(ev: EvalOutput, cal: Calibration, tasks: Sequence[str]) -> tuple[PolicyInputs, dict[str, Any]]:
    """What the worker would see for each post (calibrated scores, thresholds, ITM match),
    plus per task the boolean "the model is wrong here" (NaN-free: unlabelled rows False)
    and the labelled mask."""
    scores, thresholds, errors, labelled = {}, {}, {}, {}
    for task in tasks:
        p = softmax(ev.logits[task], cal.temperatures.get(task, 1.0))[:, -1]
        th = cal.thresholds.get(task, 0.5)
        y = ev.labels[task]
        scores[task] = p
        thresholds[task] = th
        labelled[task] = y != IGNORE_INDEX
        errors[task] = labelled[task] & ((p >= th).astype(np.int64) != y)
    return PolicyInputs(scores=scores, thresholds=thresholds, itm=ev.itm_match), {
        "errors": errors,
        "labelled": labelled,
    }


ITM_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


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
    caught: list[tuple[float, RoutingPolicySpec]] = []
    for w in sorted(grid):
        spec = RoutingPolicySpec(kind="uncertainty", uncertainty="margin", itm_weight=w, itm_fill=fill)
        reviewed = spec.review(val, review_cut(spec.scores(val), budget))
        caught.append((float(sum((reviewed & errors[t] & labelled[t]).sum() for t in val.scores)), spec))
    best = max(c for c, _ in caught)
    return next(spec for c, spec in caught if c >= best - math.sqrt(best))


def catch_stats(reviewed: np.ndarray, errors: np.ndarray) -> dict[str, float]:
    """Error recall (share of errors reviewed), review precision (error rate among reviewed
    posts), the reviewed share and lift = recall / reviewed share (= precision / base rate)."""
    n, n_err, n_rev = len(errors), int(errors.sum()), int(reviewed.sum())
    caught = int((reviewed & errors).sum())
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

        def take(x: PolicyInputs, idx: np.ndarray) -> PolicyInputs:
            return PolicyInputs({t: s[idx] for t, s in x.scores.items()}, dict(x.thresholds), x.itm[idx])

        sub_truth = {key: {t: v[rest] for t, v in truth[key].items()} for key in ("errors", "labelled")}
        out[part] = spec_of(take(val, rest), sub_truth).scores(take(val, part))
    return out


CHOSEN_POLICY = "uncertainty (margin)"


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
) -> dict[str, Any]:
    """The card's `routing` section: the chosen policy fitted on validation, its review cut
    for `budget`, and its validation curve at 5/10/20% (cross-fitted for fitted policies).

    Empty (the card keeps the ITM gate) when validation holds fewer than `min_errors` model
    errors: a model that is (nearly) always right on validation gives uncertainty scores
    that are all about 0, and a cut taken from their quantile would send every live post
    to review (the default synthetic model did: 500 of 500)."""
    # Binary tasks with a validated threshold and labelled validation posts only (an untrained
    # head must not route): their errors are "score on the wrong side of the threshold".
    tasks = [t for t in tasks if t in calibration.thresholds and (val_eval.labels[t] != IGNORE_INDEX).any()]
    if not tasks:
        return {}  # nothing to route by: the card keeps the ITM gate
    val, truth = policy_inputs(val_eval, calibration, tasks)
    n_errors = int(sum(truth["errors"][t].sum() for t in tasks))
    if n_errors < min_errors:
        log.info("no review policy on the card: %d validation errors, a policy needs %d", n_errors, min_errors)
        return {}
    spec = choose_policy(val, truth, budget, name)
    spec = replace(spec, cut=review_cut(spec.scores(val), budget), budget=budget, tasks=list(tasks))
    fitted = spec.kind == "combined" or name == "uncertainty + ITM (weight fitted)"
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
