"""Routing: which labelled posts a human should review, and why (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.card import ModelCard
from models.inference import Prediction
from models.routing_gate import MIN_ERRORS, GateFloors, decide_itm_routing

WEAK_MATCH = "weak_image_text_match"


@dataclass
class RoutingPolicy:
    """ITM routing is trusted only when the card's validation evidence clears these floors
    (see models/routing_gate.py); otherwise posts are routed by task uncertainty alone."""

    itm_threshold: float | None = None  # None: take the card's
    min_itm_auroc: float = 0.6
    min_routing_lift: float = 1.0
    uncertainty_band: float = 0.0  # |score - threshold| below this -> review

    min_itm_errors: int = MIN_ERRORS  # validation errors before a lift estimate may count against ITM

    def itm_trusted(self, card: ModelCard) -> tuple[bool, str]:
        """The card's evidence judged with this worker's floors (models/routing_gate.py)."""
        itm = {**card.itm, "threshold": self.threshold(card)}
        floors = GateFloors(self.min_itm_auroc, self.min_routing_lift, self.min_itm_errors)
        return decide_itm_routing(itm, floors)

    def threshold(self, card: ModelCard) -> float | None:
        return self.itm_threshold if self.itm_threshold is not None else card.itm.get("threshold")


@dataclass
class RouteDecision:
    route: str  # "auto" or "review"
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "reasons": self.reasons}


def route(prediction: Prediction, card: ModelCard, policy: RoutingPolicy, itm_trusted: bool) -> RouteDecision:
    scores = {task: (p.score, p.threshold) for task, p in prediction.tasks.items()}
    return route_scores(prediction.itm_match, scores, card, policy, itm_trusted)


def route_scores(
    itm_match: float | None,
    scores: dict[str, tuple[float, float]],
    card: ModelCard,
    policy: RoutingPolicy,
    itm_trusted: bool,
) -> RouteDecision:
    """`scores`: task -> (score, threshold). Works from stored label values too, so a
    cached label is routed by the policy in force now, not the one it was made under."""
    reasons: list[str] = []
    threshold = policy.threshold(card)
    # Text-only posts have no ITM score and are never routed by it.
    if itm_trusted and itm_match is not None and threshold is not None and itm_match < threshold:
        reasons.append(WEAK_MATCH)
    if policy.uncertainty_band > 0:
        for task, (score, task_threshold) in scores.items():
            if abs(score - task_threshold) < policy.uncertainty_band:
                reasons.append(f"uncertain_{task}")
    return RouteDecision("review" if reasons else "auto", reasons)
