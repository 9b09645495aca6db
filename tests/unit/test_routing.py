from models.card import ModelCard
from models.inference import Prediction, TaskPrediction
from stream.routing import WEAK_MATCH, RoutingPolicy, route
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
