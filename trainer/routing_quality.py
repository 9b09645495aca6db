"""How well a card routes a labelled holdout to review: the routing lift at its budget.

The retrain gate asks of each holdout whether the candidate's routing is as good as the
current model's, not only its labels (a retrain once kept every F1 and halved the
mismatches routing caught). Routing is the card's review policy (models/routing/policy.py)
or, on a card without one, the weak-ITM rule, which is the ITM-only policy at the share the
card's ITM threshold was set for. Each model is judged at its own budget on the holdout: the
`budget` share of posts it scores highest goes to review, and

    lift = (its wrong task decisions among the reviewed posts / all its wrong decisions)
           / (reviewed posts / posts)

pooled over tasks (1: no better than a random sample of the same size). Judging at the
budget rather than at the card's cut compares rankings at equal review effort; a candidate
whose cut drifted is seen by its ITM AUROC and live by the routed share.
Pure numpy: the retrain job (trainer/retrain.py) supplies the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.card import ModelCard
from models.routing.policy import PolicyInputs, RoutingPolicySpec, itm_only, review_cut
from trainer.calibration import DEFAULT_REVIEW_FRACTION
from trainer.routing_fit import catch_stats

FloatArray = npt.NDArray[np.float64]


def card_policy(card: ModelCard) -> tuple[RoutingPolicySpec, float] | None:
    """(the policy that routes this card's posts, its budget); None when nothing does (no
    policy and no trained ITM head)."""
    spec = card.routing_policy()
    if spec is not None:
        return spec, spec.budget or DEFAULT_REVIEW_FRACTION
    if card.itm.get("trained") and card.itm.get("threshold") is not None:
        return itm_only(), DEFAULT_REVIEW_FRACTION  # the ITM threshold is this quantile of validation
    return None


@dataclass(frozen=True)
class RoutedHoldout:
    """Per post of a holdout: the policy's review score (-inf: never reviewed), how many of
    the model's task decisions are wrong, and whether any task is labelled."""

    scores: FloatArray
    wrong: FloatArray
    labelled: npt.NDArray[np.bool_]
    budget: float

    @classmethod
    def of(
        cls,
        spec: RoutingPolicySpec,
        budget: float,
        inputs: PolicyInputs,
        errors: Mapping[str, np.ndarray],
        labelled: Mapping[str, np.ndarray],
    ) -> RoutedHoldout:
        n = len(inputs)
        wrong = np.zeros(n)
        any_label = np.zeros(n, dtype=bool)
        for task in errors:
            wrong += np.asarray(errors[task], dtype=bool) & np.asarray(labelled[task], dtype=bool)
            any_label |= np.asarray(labelled[task], dtype=bool)
        return cls(np.asarray(spec.scores(inputs), dtype=np.float64), wrong, any_label, budget)

    def take(self, idx: npt.NDArray[np.int64]) -> RoutedHoldout:
        return RoutedHoldout(self.scores[idx], self.wrong[idx], self.labelled[idx], self.budget)


def lift_at_budget(routed: RoutedHoldout) -> dict[str, float]:
    """{"lift", "recall", "reviewed_share", "n", "n_errors"} over the labelled posts; lift and
    recall are NaN without an error or without a post the policy can review."""
    scores, wrong = routed.scores[routed.labelled], routed.wrong[routed.labelled]
    reviewed = np.isfinite(scores) & (scores >= review_cut(scores, routed.budget))
    stats = catch_stats(reviewed, wrong)
    return {k: stats[k] for k in ("lift", "recall", "reviewed_share", "n", "n_errors")}


def lift_interval(routed: RoutedHoldout, n_boot: int = 500, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the lift, resampling labelled posts (the cut is
    taken again in every resample, as the budget is a share of whatever posts arrive)."""
    keep = np.flatnonzero(routed.labelled)
    if keep.size < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    values = [lift_at_budget(routed.take(keep[rng.integers(0, keep.size, keep.size)]))["lift"] for _ in range(n_boot)]
    return _quantiles(values)


def lift_drop_interval(
    current: RoutedHoldout, candidate: RoutedHoldout, n_boot: int = 500, seed: int = 0
) -> list[float]:
    """95% interval of current lift minus candidate lift on the same posts, both resampled
    together (a paired bootstrap: what the two models share about the posts cancels)."""
    if current.scores.shape != candidate.scores.shape:
        return [math.nan, math.nan]
    keep = np.flatnonzero(current.labelled & candidate.labelled)
    if keep.size < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(n_boot):
        idx = keep[rng.integers(0, keep.size, keep.size)]
        drops.append(lift_at_budget(current.take(idx))["lift"] - lift_at_budget(candidate.take(idx))["lift"])
    return _quantiles(drops)


def routing_summary(routed: RoutedHoldout, name: str) -> dict[str, Any]:
    """What a card's evaluation records of its routing on a holdout."""
    return {"policy": name, "budget": routed.budget, **lift_at_budget(routed), "lift_ci": lift_interval(routed)}


def _quantiles(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    # Fewer than half the resamples defined: the interval would describe a few lucky draws.
    if len(finite) < max(2, len(values) // 2):
        return [math.nan, math.nan]
    return [float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))]
