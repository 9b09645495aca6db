"""Routing: which labelled posts a human should review, and why (pure logic).

A card that carries a review policy (`card.routing`, chosen and validated at training, see
models/routing/policy.py) routes by it: review when the policy's score reaches its cut.
A card without one (made before policies existed) routes as it always did: weak ITM match,
when the ITM gate trusts the card's evidence (models/routing/gate.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from models.card import ModelCard
from models.inference import Prediction
from models.routing.gate import MIN_ERRORS, GateFloors, decide_itm_routing
from models.routing.policy import WEAK_MATCH, PolicyInputs

__all__ = ["WEAK_MATCH", "RouteDecision", "RoutingPolicy", "route", "route_scores"]


@dataclass
class RoutingPolicy:
    """The operator's overrides. `use_card_policy=False` ignores the card's review policy
    and routes by the ITM gate; `review_cut` replaces the card policy's cut (higher: fewer
    reviews). ITM routing (cards without a policy) is trusted only when the card's
    validation evidence clears the floors below (models/routing/gate.py)."""

    use_card_policy: bool = True
    review_cut: float | None = None

    itm_threshold: float | None = None  # None: take the card's
    min_itm_auroc: float = 0.6
    min_routing_lift: float = 1.0
    uncertainty_band: float = 0.0  # |score - threshold| below this -> review

    min_itm_errors: int = MIN_ERRORS  # validation errors before a lift estimate may count against ITM

    def itm_trusted(self, card: ModelCard) -> tuple[bool, str]:
        """The card's evidence judged with this worker's floors (models/routing/gate.py)."""
        itm = {**card.itm, "threshold": self.threshold(card)}
        floors = GateFloors(self.min_itm_auroc, self.min_routing_lift, self.min_itm_errors)
        return decide_itm_routing(itm, floors)

    def itm_routes(self, card: ModelCard) -> bool:
        """Whether a weak image-text match can send this card's posts to review (the gauge
        `modstream_itm_routing_enabled`): through the card's policy, or the ITM gate."""
        spec = card.routing_policy() if self.use_card_policy else None
        if spec is None:
            return self.itm_trusted(card)[0]
        return spec.kind in ("itm", "combined") or spec.itm_weight > 0

    def describe(self, card: ModelCard) -> str:
        """What routes this card's posts, in one line for the worker's log."""
        spec = card.routing_policy() if self.use_card_policy else None
        if spec is None:
            trusted, why = self.itm_trusted(card)
            return why if trusted else f"ITM routing OFF ({why}): task uncertainty only"
        cut = self.review_cut if self.review_cut is not None else spec.cut
        curve = spec.curve.get(f"{spec.budget:g}", {}) if spec.budget is not None else {}
        lifts = ", ".join(
            f"{t} {v['lift']:.2f}" for t, v in curve.items() if isinstance(v, dict) and v.get("lift") is not None
        )
        budget = f"{spec.budget:.0%}" if spec.budget is not None else "an unknown share"
        return (
            f"review policy from the card: {card.routing.get('name', spec.kind)}, cut {cut:.4g}"
            f"{' (operator override)' if self.review_cut is not None else ''}, tuned to review {budget} of posts"
            + (f" (validated lift {lifts})" if lifts else "")
        )

    def threshold(self, card: ModelCard) -> float | None:
        return self.itm_threshold if self.itm_threshold is not None else card.itm.get("threshold")

    def overrides(self) -> dict[str, Any]:
        """The options this worker sets away from the defaults (what the card alone would do)."""
        defaults = RoutingPolicy()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)
        }

    def provenance(self, card: ModelCard) -> dict[str, Any]:
        """What routed a label, recorded on it: the policy's name, where it came from (`card`,
        or `worker` when this process overrides it) and the overrides in force. A Label
        routed under an operator's flags says so, so review rates and audits can be told apart."""
        spec = card.routing_policy() if self.use_card_policy else None
        name = card.routing.get("name", spec.kind) if spec is not None else "itm_gate"
        overrides = self.overrides()
        return {"policy": str(name), "source": "worker" if overrides else "card", "overrides": overrides}


@dataclass
class RouteDecision:
    route: str  # "auto" or "review"
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "reasons": self.reasons}


def route(prediction: Prediction, card: ModelCard, policy: RoutingPolicy, itm_trusted: bool) -> RouteDecision:
    scores = {task: (p.score, p.threshold) for task, p in prediction.tasks.items()}
    disagree = {task: p.neighbour_disagreement for task, p in prediction.tasks.items()}
    return route_scores(prediction.itm_match, scores, card, policy, itm_trusted, disagree)


def route_scores(
    itm_match: float | None,
    scores: dict[str, tuple[float, float]],
    card: ModelCard,
    policy: RoutingPolicy,
    itm_trusted: bool,
    disagreement: dict[str, float | None] | None = None,
) -> RouteDecision:
    """`scores`: task -> (score, threshold); `disagreement`: task -> the labelled neighbours'
    disagreement with the decision, where the label has one. Works from stored label values
    too, so a cached label is routed by the policy in force now, not the one it was made under."""
    reasons: list[str] = []
    spec = card.routing_policy() if policy.use_card_policy else None
    if spec is not None:
        cut = policy.review_cut if policy.review_cut is not None else spec.cut
        inputs = PolicyInputs.one(itm_match, scores, disagreement)
        if cut is not None and spec.review(inputs, cut)[0]:
            reasons.extend(spec.reasons(inputs))
    else:
        threshold = policy.threshold(card)
        # Text-only posts have no ITM score and are never routed by it.
        if itm_trusted and itm_match is not None and threshold is not None and itm_match < threshold:
            reasons.append(WEAK_MATCH)
    if policy.uncertainty_band > 0:
        for task, (score, task_threshold) in scores.items():
            if abs(score - task_threshold) < policy.uncertainty_band and f"uncertain_{task}" not in reasons:
                reasons.append(f"uncertain_{task}")
    return RouteDecision("review" if reasons else "auto", reasons)
