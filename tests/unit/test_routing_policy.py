import math

import numpy as np
import pytest

from models.routing.policy import (
    LIKELY_ERROR,
    WEAK_MATCH,
    PolicyInputs,
    RoutingPolicySpec,
    TaskHead,
    binary_entropy,
    feature_matrix,
    itm_only,
    margin_uncertainty,
    review_cut,
    uncertainty,
)


def _inputs(hate, sarcasm, itm, th=(0.5, 0.4)):
    return PolicyInputs(
        scores={"hate": np.array(hate, float), "sarcasm": np.array(sarcasm, float)},
        thresholds={"hate": th[0], "sarcasm": th[1]},
        itm=np.array(itm, float),
    )


def test_itm_policy_scores_lowest_match_first_and_never_routes_text_only():
    x = _inputs([0.5] * 3, [0.5] * 3, [0.9, 0.1, math.nan])
    s = itm_only().scores(x)
    assert s[1] > s[0] and s[2] == -np.inf
    assert itm_only().review(x, cut=-0.95).tolist() == [True, True, False]


def test_margin_uncertainty_is_relative_to_the_threshold_on_each_side():
    # threshold 0.4: p = 0.4 is maximally uncertain, 0.7 is halfway up (0.3 of 0.6), 0.2 halfway down (0.2 of 0.4).
    np.testing.assert_allclose(margin_uncertainty(np.array([0.4, 0.7, 0.2, 1.0, 0.0]), 0.4), [1, 0.5, 0.5, 0, 0])
    np.testing.assert_allclose(binary_entropy(np.array([0.5, 0.0, 1.0])), [1, 0, 0], atol=1e-9)


def test_uncertainty_policy_takes_the_most_uncertain_task():
    x = _inputs([0.99, 0.6, 0.9], [0.95, 0.05, 0.41], [0.5, 0.5, math.nan])
    s = uncertainty("margin").scores(x)
    np.testing.assert_allclose(s, [max(0.02, 1 - 0.55 / 0.6), 0.8, 1 - 0.01 / 0.6])
    assert np.argmax(s) == 2  # text-only posts are scored by their tasks
    assert uncertainty("margin").reasons(_inputs([0.9], [0.41], [0.5])) == ["uncertain_sarcasm"]
    np.testing.assert_allclose(uncertainty("entropy").scores(_inputs([0.5], [0.9], [0.5])), [1.0])


def _combined(**kw):
    names = ["itm", "itm_missing", "margin_hate", "margin_sarcasm"]
    return RoutingPolicySpec(
        kind="combined",
        features=names,
        mean=[0.0] * 4,
        scale=[1.0] * 4,
        heads={"hate": TaskHead([-2.0, 1.0, 3.0, 0.0], -1.0), "sarcasm": TaskHead([0.0, 0.0, 0.0, 1.0], -2.0)},
        **kw,
    )


def test_combined_policy_is_the_sum_of_per_task_logistic_error_probabilities():
    x = _inputs([0.5, 0.9], [0.4, 0.1], [0.2, math.nan])
    m_h = margin_uncertainty(np.array([0.5, 0.9]), 0.5)
    m_s = margin_uncertainty(np.array([0.4, 0.1]), 0.4)
    p_h = 1 / (1 + np.exp(-(-2 * np.array([0.2, 0.0]) + np.array([0, 1.0]) + 3 * m_h - 1)))
    p_s = 1 / (1 + np.exp(-(m_s - 2)))
    np.testing.assert_allclose(_combined().scores(x), p_h + p_s)
    np.testing.assert_allclose(_combined(combine="max").scores(x), np.maximum(p_h, p_s))


def test_combined_reasons_name_the_main_contributor():
    spec = RoutingPolicySpec(
        kind="combined",
        features=["itm", "margin_hate"],
        mean=[0.5, 0.5],
        scale=[0.1, 0.1],
        heads={"hate": TaskHead([-1.0, 0.2], 0.0)},
    )
    assert spec.reasons(_inputs([0.9], [0.1], [0.1])) == [LIKELY_ERROR, WEAK_MATCH]
    assert spec.reasons(_inputs([0.5], [0.1], [0.6])) == [LIKELY_ERROR, "uncertain_hate"]


def test_feature_matrix_handles_text_only_posts_explicitly():
    x = _inputs([0.7, 0.2], [0.5, 0.5], [0.3, math.nan])
    f = feature_matrix(x, ["itm", "itm_missing", "p_hate", "signed_hate", "itm_x_margin_hate"])
    np.testing.assert_allclose(f[:, :4], [[0.3, 0, 0.7, 0.2], [0, 1, 0.2, -0.3]])
    assert f[1, 4] == 0
    with pytest.raises(ValueError, match="unknown routing feature"):
        feature_matrix(x, ["p_toxicity"])


def test_budget_cut_reviews_the_intended_share_on_a_known_distribution():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=10_000)
    for budget in (0.05, 0.1, 0.2):
        cut = review_cut(scores, budget)
        assert (scores >= cut).mean() == pytest.approx(budget, abs=1e-4)
        fresh = rng.normal(size=20_000)  # the cut carries over to new posts of the same distribution
        assert (fresh >= cut).mean() == pytest.approx(budget, abs=0.01)
    # Posts that can never be reviewed (ITM on text-only) still count in the budget's denominator.
    s = np.array([-np.inf] * 5 + [1.0, 2.0, 3.0, 4.0, 5.0])
    assert review_cut(s, 0.2) == 4.0
    with pytest.raises(ValueError):
        review_cut(s, 0.0)


def test_card_round_trip_and_malformed_policies_refused():
    spec = _combined(cut=0.7, budget=0.1, curve={"0.1": {"hate": {"lift": 1.5}}})
    again = RoutingPolicySpec.from_dict(spec.to_dict())
    x = _inputs([0.5, 0.9], [0.4, 0.1], [0.2, math.nan])
    np.testing.assert_allclose(again.scores(x), spec.scores(x))
    assert again.cut == 0.7 and again.budget == 0.1 and again.curve == spec.curve
    assert RoutingPolicySpec.from_dict(uncertainty("entropy").to_dict()).uncertainty == "entropy"
    with pytest.raises(ValueError, match="kind"):
        RoutingPolicySpec.from_dict({"kind": "vibes"})
    with pytest.raises(ValueError, match="coefficients"):
        RoutingPolicySpec.from_dict({**spec.to_dict(), "heads": {"hate": {"coef": [1.0], "intercept": 0}}})
    with pytest.raises(ValueError):
        RoutingPolicySpec.from_dict({"kind": "combined", "features": ["itm"]})


def test_uncertainty_plus_weak_match_and_its_reasons():
    spec = RoutingPolicySpec(kind="uncertainty", itm_weight=0.5, itm_fill=0.6)
    x = _inputs([0.99, 0.5, 0.99], [0.99, 0.99, 0.99], [0.0, 1.0, math.nan])
    base = uncertainty("margin").scores(x)
    np.testing.assert_allclose(spec.scores(x), base + np.array([0.5, 0.0, 0.5 * 0.4]))
    assert spec.reasons(_inputs([0.99], [0.99], [0.0])) == [WEAK_MATCH, "uncertain_hate"]
    assert spec.reasons(_inputs([0.5], [0.99], [0.9])) == ["uncertain_hate"]
    assert RoutingPolicySpec.from_dict(spec.to_dict()).itm_weight == 0.5
    with pytest.raises(ValueError):
        RoutingPolicySpec(kind="uncertainty", itm_weight=-1.0)


def test_a_task_outside_the_policy_never_routes():
    spec = RoutingPolicySpec(kind="uncertainty", tasks=["hate"])
    near_sarcasm = PolicyInputs.one(0.5, {"hate": (0.99, 0.5), "sarcasm": (0.5, 0.5)})
    assert spec.scores(near_sarcasm)[0] < 0.1
    assert spec.reasons(near_sarcasm) == ["uncertain_hate"]
    assert RoutingPolicySpec.from_dict(spec.to_dict()).tasks == ["hate"]
    with pytest.raises(ValueError, match="needs the scores"):
        _combined(tasks=["hate", "toxicity"]).scores(near_sarcasm)


def test_uncertainty_summed_over_tasks_prefers_posts_unsure_on_both():
    x = _inputs([0.5, 0.75], [0.99, 0.55], [0.5, 0.5], th=(0.5, 0.5))
    # max: post 0 (one task at its threshold) first; sum: post 1 (both tasks half-unsure) first.
    assert np.argmax(uncertainty("margin").scores(x)) == 0
    np.testing.assert_allclose(uncertainty("margin", "sum").scores(x), [1.0 + 0.02, 0.5 + 0.9])
    assert RoutingPolicySpec.from_dict(uncertainty("margin", "sum").to_dict()).task_combine == "sum"
