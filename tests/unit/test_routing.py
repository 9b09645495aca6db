import json

import pytest

from models.card import ModelCard
from models.inference import Prediction, TaskPrediction
from models.routing.route import WEAK_MATCH, RoutingPolicy, route
from tests.tiny import tiny_config


def _card(**itm):
    return ModelCard(config=tiny_config(), itm=itm)


def _pred(itm, score=0.9):
    task = TaskPrediction("hateful", score, score >= 0.5, 0.5, {})
    return Prediction({"hate": task}, itm, "v1")


GOOD = dict(trained=True, auroc=0.8, routing_lift={"hate": 1.4}, threshold=0.3)


def test_itm_routing_needs_validated_auroc_and_lift():
    policy = RoutingPolicy()
    assert policy.itm_trusted(_card(**GOOD))[0]
    assert not policy.itm_trusted(_card(**{**GOOD, "trained": False}))[0]
    assert "AUROC" in policy.itm_trusted(_card(**{**GOOD, "auroc": 0.55}))[1]
    # A lift measured on enough errors whose whole interval is below the floor switches it off.
    against = {"hate": {"lift": 0.6, "lift_ci": [0.3, 0.9], "n_errors": 60}}
    trusted, why = policy.itm_trusted(_card(**{**GOOD, "routing_evidence": against}))
    assert not trusted and "does not concentrate errors" in why and "60 errors" in why
    assert not policy.itm_trusted(_card(**{**GOOD, "auroc": None}))[0]
    # A model with no validation errors has no defined lift: the AUROC decides alone.
    assert policy.itm_trusted(_card(**{**GOOD, "routing_lift": {"hate": float("nan")}}))[0]


def test_weak_match_goes_to_review_but_text_only_never_by_itm():
    card, policy = _card(**GOOD), RoutingPolicy()
    assert route(_pred(0.1), card, policy, True).to_dict() == {"route": "review", "reasons": [WEAK_MATCH]}
    assert route(_pred(0.9), card, policy, True).route == "auto"
    assert route(_pred(None), card, policy, True).route == "auto"
    assert route(_pred(0.1), card, policy, False).route == "auto"  # untrusted ITM routes nothing


def test_uncertainty_band_and_configured_threshold():
    card = _card(**GOOD)
    policy = RoutingPolicy(uncertainty_band=0.1, itm_threshold=0.05)
    decision = route(_pred(0.1, score=0.55), card, policy, True)
    assert decision.reasons == ["uncertain_hate"]  # 0.1 is above the configured 0.05


# A card policy: review the posts whose hate score is near its threshold (margin uncertainty >= 0.8).
CARD_POLICY = {"kind": "uncertainty", "uncertainty": "margin", "cut": 0.8, "budget": 0.1, "curve": {}}


def test_card_policy_routes_instead_of_the_itm_gate():
    card = ModelCard(config=tiny_config(), itm=GOOD, routing=CARD_POLICY)
    policy = RoutingPolicy()
    # A weak match with a confident score: the ITM gate would review it, the card's policy does not.
    assert route(_pred(0.1, score=0.99), card, policy, True).route == "auto"
    # An uncertain score with a strong match: only the card's policy reviews it.
    decision = route(_pred(0.95, score=0.55), card, policy, True)
    assert decision.to_dict() == {"route": "review", "reasons": ["uncertain_hate"]}
    # Text-only posts are scored by the policy like any other.
    assert route(_pred(None, score=0.52), card, policy, False).route == "review"
    assert route(_pred(None, score=0.99), card, policy, False).route == "auto"


def test_operator_overrides_the_card_policy():
    card = ModelCard(config=tiny_config(), itm=GOOD, routing=CARD_POLICY)
    assert route(_pred(0.95, score=0.55), card, RoutingPolicy(review_cut=0.95), True).route == "auto"
    legacy = RoutingPolicy(use_card_policy=False)
    assert route(_pred(0.1, score=0.99), card, legacy, True).reasons == [WEAK_MATCH]
    assert route(_pred(0.95, score=0.55), card, legacy, True).route == "auto"


def test_an_old_card_without_a_policy_still_routes_by_itm():
    data = ModelCard(config=tiny_config(), itm=GOOD).to_dict()
    del data["routing"]  # as written before the field existed
    card = ModelCard.from_dict(data)
    assert card.routing == {} and card.routing_policy() is None
    assert route(_pred(0.1), card, RoutingPolicy(), True).reasons == [WEAK_MATCH]
    assert route(_pred(0.9, score=0.51), card, RoutingPolicy(), True).route == "auto"


def test_a_card_with_a_malformed_policy_is_refused_at_load():
    data = ModelCard(config=tiny_config(), itm=GOOD, routing=CARD_POLICY).to_dict()
    assert ModelCard.from_dict(data).routing_policy() is not None
    for bad in ({"kind": "combined", "cut": 0.5}, {"kind": "itm"}, ["itm"]):
        with pytest.raises(ValueError):
            ModelCard.from_dict({**data, "routing": bad})


def test_stored_label_values_route_by_the_card_policy_after_a_json_round_trip():
    from models.routing.route import route_scores

    card = ModelCard.from_dict(json.loads(ModelCard(config=tiny_config(), itm=GOOD, routing=CARD_POLICY).to_json()))
    near, far = {"hate": (0.55, 0.5)}, {"hate": (0.99, 0.5)}
    assert route_scores(0.9, near, card, RoutingPolicy(), True).reasons == ["uncertain_hate"]
    assert route_scores(0.1, far, card, RoutingPolicy(), True).route == "auto"


def test_describe_says_which_policy_routes():
    with_policy = ModelCard(
        config=tiny_config(), itm=GOOD, routing={**CARD_POLICY, "curve": {"0.1": {"hate": {"lift": 1.7}}}}
    )
    line = RoutingPolicy().describe(with_policy)
    assert "review policy from the card" in line and "10%" in line and "hate 1.70" in line
    assert "override" in RoutingPolicy(review_cut=0.9).describe(with_policy)
    assert "ITM routing enabled" in RoutingPolicy().describe(ModelCard(config=tiny_config(), itm=GOOD))
