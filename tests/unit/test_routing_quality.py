"""The routing lift the retrain gate judges: the card policy's catch of wrong decisions at its
budget on a holdout, its intervals, and the gate refusing a candidate that routes worse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.card import ModelCard
from models.config import ModelConfig
from trainer.gate import gate_verdict
from trainer.retrain import PREDICTIONS, ROUTED, comparisons
from trainer.routing_quality import RoutedHoldout, card_policy, lift_at_budget, lift_drop_interval, lift_interval

TASKS = {"hate": ["not_hate", "hate"]}


def _holdout(scores: np.ndarray, wrong: np.ndarray, budget: float = 0.1) -> RoutedHoldout:
    return RoutedHoldout(scores.astype(float), wrong.astype(float), np.ones(len(scores), dtype=bool), budget)


def _sharp_and_blind(n: int = 1000, seed: int = 0) -> tuple[RoutedHoldout, RoutedHoldout]:
    """Two models making the same 150 wrong decisions: one scores them highest, the other
    scores posts at random."""
    rng = np.random.default_rng(seed)
    wrong = np.zeros(n)
    wrong[rng.choice(n, 150, replace=False)] = 1
    sharp = np.where(wrong == 1, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.6, n))
    return _holdout(sharp, wrong), _holdout(rng.uniform(0, 1, n), wrong)


def test_lift_is_the_share_of_errors_caught_over_the_share_reviewed():
    wrong = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.arange(10, 0, -1)  # the two wrong posts score highest
    out = lift_at_budget(_holdout(scores, wrong, budget=0.2))
    assert out["reviewed_share"] == 0.2 and out["recall"] == 1.0 and out["lift"] == pytest.approx(5.0)
    reversed_scores = lift_at_budget(_holdout(scores[::-1], wrong, budget=0.2))
    assert reversed_scores["lift"] == 0.0
    # Two wrong decisions on one post count twice (pooled over tasks).
    pooled = lift_at_budget(_holdout(scores, np.array([2, 0, 1, 0, 0, 0, 0, 0, 0, 0]), budget=0.1))
    assert pooled["recall"] == pytest.approx(2 / 3) and pooled["n_errors"] == 3


def test_posts_the_policy_can_never_review_count_in_the_share_but_are_never_reviewed():
    scores = np.array([-np.inf, -np.inf, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    wrong = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    out = lift_at_budget(_holdout(scores, wrong, budget=0.2))
    assert out["recall"] == 0.0 and out["reviewed_share"] == 0.2


def test_no_error_or_no_labelled_post_gives_no_lift():
    assert math.isnan(lift_at_budget(_holdout(np.arange(10.0), np.zeros(10)))["lift"])
    empty = RoutedHoldout(np.arange(3.0), np.ones(3), np.zeros(3, dtype=bool), 0.1)
    assert lift_at_budget(empty)["n"] == 0 and lift_interval(empty) == [math.nan, math.nan]


def test_a_sharp_policy_has_a_lift_interval_above_one_and_a_blind_one_around_one():
    sharp, blind = _sharp_and_blind()
    low, high = lift_interval(sharp)
    assert low > 2.0 and high < 10.0
    low, high = lift_interval(blind)
    assert low < 1.0 < high


def test_the_paired_drop_interval_is_zero_for_the_same_model_and_above_zero_for_an_eroded_one():
    sharp, blind = _sharp_and_blind()
    assert lift_drop_interval(sharp, sharp) == [0.0, 0.0]
    low, _ = lift_drop_interval(sharp, blind)
    assert low > 1.0
    mismatched = _holdout(np.arange(5.0), np.ones(5))
    assert lift_drop_interval(sharp, mismatched) == [math.nan, math.nan]


def _evaluation(current: RoutedHoldout, candidate: RoutedHoldout) -> dict[str, dict[str, dict]]:
    """Both models with identical labels (so identical F1) and ITM scores, and the given routing."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, len(current.scores))
    pred = np.where(rng.uniform(size=y.size) < 0.85, y, 1 - y)
    pairs = (rng.uniform(0.4, 1.0, 300), rng.uniform(0.0, 0.6, 300))

    def model(routed: RoutedHoldout) -> dict:
        return {
            "n": {"hate": int(y.size)},
            "macro_f1": {"hate": 0.85},
            "itm_auroc": 0.9,
            "n_itm": 300,
            "routing": lift_at_budget(routed),
            "_itm_pairs": pairs,
            PREDICTIONS: {"hate": (y, pred)},
            ROUTED: routed,
        }

    return {"base": {"current": model(current), "candidate": model(candidate)}}


def test_the_gate_refuses_a_candidate_with_equal_f1_and_itm_whose_routing_lift_eroded():
    sharp, blind = _sharp_and_blind()
    decision = gate_verdict(comparisons(_evaluation(sharp, blind), TASKS))
    assert not decision.promoted, decision.why
    assert decision.why.startswith("Refused: routing lift on the base holdout"), decision.why
    f1 = next(c for c in decision.checks if c.metric == "macro_f1")
    assert f1.verdict == "pass" and f1.drop == 0 and f1.drop_ci == (0.0, 0.0)
    # The same pair the other way round (the candidate routes better) is promoted.
    better = gate_verdict(comparisons(_evaluation(blind, sharp), TASKS))
    assert better.promoted and "routing lift no more than 0.10 below on 1 holdout" in better.why, better.why


def test_a_lift_drop_the_errors_cannot_tell_from_chance_does_not_refuse():
    """Few errors: the point drop exceeds the margin but its paired interval straddles zero."""
    rng = np.random.default_rng(5)
    n = 200
    wrong = np.zeros(n)
    wrong[rng.choice(n, 25, replace=False)] = 1
    current = _holdout(np.where(wrong == 1, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 1.0, n)), wrong)
    candidate = _holdout(np.where(wrong == 1, rng.uniform(0.25, 1.0, n), rng.uniform(0.0, 1.0, n)), wrong)
    decision = gate_verdict(comparisons(_evaluation(current, candidate), TASKS))
    lift = next(c for c in decision.checks if c.metric == "routing_lift")
    assert lift.drop_ci is not None and lift.drop_ci[0] <= 0 < lift.drop_ci[1]
    assert lift.verdict == "pass" and decision.promoted, decision.why


def test_a_holdout_with_too_few_errors_does_not_gate_routing():
    wrong = np.zeros(100)
    wrong[:5] = 1
    current = _holdout(np.where(wrong == 1, 1.0, 0.0), wrong)
    candidate = _holdout(np.where(wrong == 1, 0.0, 1.0), wrong)
    decision = gate_verdict(comparisons(_evaluation(current, candidate), TASKS))
    lift = next(c for c in decision.checks if c.metric == "routing_lift")
    assert lift.n == 5 and lift.verdict == "not enough evidence" and decision.promoted


def test_the_card_policy_routes_or_the_weak_itm_rule_when_the_card_has_none():
    spec = card_policy(ModelCard(config=ModelConfig(), routing={"kind": "uncertainty", "cut": 0.5, "budget": 0.05}))
    assert spec is not None and spec[0].kind == "uncertainty" and spec[1] == 0.05
    itm = card_policy(ModelCard(config=ModelConfig(), itm={"trained": True, "threshold": 0.2}))
    assert itm is not None and itm[0].kind == "itm" and itm[1] == 0.1
    assert card_policy(ModelCard(config=ModelConfig(), itm={"trained": False})) is None


def test_the_table_and_plot_show_the_routing_check_with_its_interval(tmp_path):
    from trainer.retrain_report import summary_table, write_plot

    sharp, blind = _sharp_and_blind()
    decision = gate_verdict(comparisons(_evaluation(sharp, blind), TASKS))
    table = summary_table(decision, "v0001", "v0002")
    row = next(line for line in table.splitlines() if line.startswith("base") and "routing lift" in line)
    assert "fail" in row and "[+" in row, row
    assert "lift margin 0.10" in table
    plot = write_plot(decision, "v0001", "v0002", tmp_path / "gate.png")
    assert plot.stat().st_size > 10_000
