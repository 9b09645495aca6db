from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from trainer.evaluate import (
    TaskReport,
    choose_threshold,
    decide,
    expected_calibration_error,
    fit_temperature,
    itm_auroc,
    routing_lift,
    softmax,
    task_report,
)

# --- task_report ---------------------------------------------------------------------------


def test_task_report_hand_computed() -> None:
    # class 0: tp=1 fp=1 fn=1 -> F1 1/2; class 1: tp=2 fp=1 fn=1 -> F1 2/3; class 2: F1 1.
    # The trailing -1 row is unlabelled and must be dropped.
    y_true = np.array([0, 0, 1, 1, 1, 2, -1])
    y_pred = np.array([0, 1, 1, 1, 0, 2, 2])
    r = task_report(y_true, y_pred, ["a", "b", "c"])
    assert isinstance(r, TaskReport)
    assert r.n == 6
    assert r.macro_f1 == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)  # 13/18
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.per_class["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2.0})
    assert r.per_class["b"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3.0})
    assert r.per_class["c"]["f1"] == pytest.approx(1.0)
    assert r.confusion == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    d = r.to_dict()
    assert d["confusion"] == r.confusion and d["n"] == 6


def test_confusion_rows_are_true_labels() -> None:
    r = task_report(np.array([0, 0, 0]), np.array([1, 1, 1]), ["neg", "pos"])
    assert r.confusion == [[0, 3], [0, 0]]
    # Class "pos" never occurs nor is correct: it still counts (as F1 0) in the macro average.
    assert r.macro_f1 == 0.0
    assert r.per_class["pos"]["support"] == 0.0


def test_absent_class_counts_in_macro_average() -> None:
    r = task_report(np.array([0, 1]), np.array([0, 1]), ["x", "y", "z"])
    assert r.macro_f1 == pytest.approx(2 / 3)
    assert r.confusion == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_task_report_empty() -> None:
    r = task_report(np.array([-1, -1]), np.array([0, 1]), ["a", "b"])
    assert r.n == 0
    assert math.isnan(r.macro_f1)
    assert r.confusion == [[0, 0], [0, 0]]


# --- temperature scaling and calibration ---------------------------------------------------


def _overconfident(seed: int = 0, n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """Logits 3x too sharp: labels drawn from softmax(true), model outputs 3 * true."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(scale=1.5, size=(n, 3))
    p = softmax(true_logits)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return true_logits * 3.0, y


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    z = np.array([[2.0, 0.0], [0.0, 0.0]])
    p = softmax(z)
    assert p.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert p[0, 0] == pytest.approx(1 / (1 + math.exp(-2)))
    assert softmax(z, temperature=2.0)[0, 0] == pytest.approx(1 / (1 + math.exp(-1)))


def test_fit_temperature_recovers_known_temperature() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert abs(t - 3.0) / 3.0 < 0.15


def test_fit_temperature_degenerate_inputs() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    assert fit_temperature(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([0, 0])) == 1.0
    # Only one labelled class once unlabelled rows are dropped.
    assert fit_temperature(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([0, -1])) == 1.0


def test_ece_hand_computed() -> None:
    probs = np.array([[0.8, 0.2], [0.6, 0.4]])
    y = np.array([0, 1])
    # Separate bins: |1 - 0.8| and |0 - 0.6|, each weighted 1/2.
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    # One bin: |accuracy 0.5 - mean confidence 0.7|.
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.2)
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)))


def test_ece_decreases_after_temperature_scaling() -> None:
    logits, y = _overconfident(seed=1)
    before = expected_calibration_error(softmax(logits), y)
    after = expected_calibration_error(softmax(logits, fit_temperature(logits, y)), y)
    assert after < before / 2
    assert after < 0.05


# --- thresholds ----------------------------------------------------------------------------


def test_choose_threshold_separable() -> None:
    p = np.array([0.05, 0.1, 0.3, 0.4])
    y = np.array([0, 0, 1, 1])
    t = choose_threshold(p, y)
    assert 0.1 < t <= 0.3
    assert t == pytest.approx(0.2)  # the midpoint between the classes
    assert decide(p, t).tolist() == [0, 0, 1, 1]


def test_choose_threshold_tie_goes_to_closest_to_half() -> None:
    # Candidates 0.2 and 0.75 both reach macro-F1 (0.8 + 2/3) / 2; 0.75 is closer to 0.5.
    p = np.array([0.1, 0.3, 0.6, 0.9])
    y = np.array([0, 1, 0, 1])
    assert choose_threshold(p, y) == pytest.approx(0.75)


def test_choose_threshold_matches_sklearn_best() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=120)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, size=120), 0, 1)
    t = choose_threshold(p, y)
    uniq = np.unique(p)
    candidates = [*((uniq[:-1] + uniq[1:]) / 2), 0.5]
    best = max(f1_score(y, decide(p, c), average="macro") for c in candidates)
    assert f1_score(y, decide(p, t), average="macro") == pytest.approx(best)


def test_choose_threshold_degenerate_returns_default() -> None:
    assert choose_threshold(np.array([0.2, 0.9]), np.array([1, 1]), default=0.4) == 0.4
    assert choose_threshold(np.array([]), np.array([], dtype=int)) == 0.5


def test_decide() -> None:
    assert decide(np.array([0.2, 0.5, 0.7]), 0.5).tolist() == [0, 1, 1]


# --- ITM -----------------------------------------------------------------------------------


def test_itm_auroc() -> None:
    assert itm_auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert itm_auroc(np.array([0.1, 0.2]), np.array([0.9, 0.8])) == 0.0
    # Pairs (pos > neg): 0.5>0.1, 0.9>0.6, 0.9>0.1 but not 0.5>0.6 -> 3/4.
    assert itm_auroc(np.array([0.5, 0.9]), np.array([0.6, 0.1])) == pytest.approx(0.75)
    assert math.isnan(itm_auroc(np.array([]), np.array([0.3])))
    assert math.isnan(itm_auroc(np.array([0.3]), np.array([np.nan])))


def test_routing_lift_hand_case() -> None:
    scores = np.array([0.5, 0.05, 0.9, 0.3, 0.7, 0.6, 0.2, 0.8, 0.4, 0.95])
    errors = np.zeros(10, dtype=bool)
    errors[1] = True  # the lowest-ITM post is the only error
    r = routing_lift(errors, scores, fraction=0.1)
    ci = r.pop("lift_ci")
    assert r == {
        "low_itm_error_rate": 1.0,
        "overall_error_rate": 0.1,
        "lift": pytest.approx(10.0),
        "n_low": 1.0,
        "n": 10.0,
        "n_errors": 1.0,
    }
    assert ci[0] <= 10.0 <= ci[1]
    # ceil(0.25 * 10) = 3 lowest: indices 1, 6, 3 -> 1 error of 3.
    r = routing_lift(errors, scores, fraction=0.25)
    assert r["n_low"] == 3.0
    assert r["low_itm_error_rate"] == pytest.approx(1 / 3)
    # 0.7 * 10 is 7.000000000000001 in floating point; still 7 posts.
    assert routing_lift(errors, scores, fraction=0.7)["n_low"] == 7.0


def test_routing_lift_excludes_nan_scores() -> None:
    scores = np.array([0.5, 0.05, np.nan, 0.9, np.nan])
    errors = np.array([False, True, True, False, True])
    r = routing_lift(errors, scores, fraction=0.1)
    # Text-only (NaN) posts are out of both the low set and the overall rate.
    assert r["n"] == 3.0
    assert r["n_low"] == 1.0
    assert r["low_itm_error_rate"] == 1.0
    assert r["overall_error_rate"] == pytest.approx(1 / 3)
    assert r["lift"] == pytest.approx(3.0)


def test_routing_lift_stable_ties_and_no_errors() -> None:
    errors = np.array([True, False, False, False])
    r = routing_lift(errors, np.full(4, 0.5), fraction=0.25)
    assert r["low_itm_error_rate"] == 1.0  # stable sort keeps the first of equal scores
    r = routing_lift(np.zeros(4, dtype=bool), np.array([0.1, 0.2, 0.3, 0.4]))
    assert r["overall_error_rate"] == 0.0
    assert math.isnan(r["lift"])
    r = routing_lift(np.array([True]), np.array([np.nan]))
    assert r["n"] == 0.0 and math.isnan(r["low_itm_error_rate"])


def test_routing_lift_interval_separates_a_real_lift_from_chance() -> None:
    rng = np.random.default_rng(3)
    scores = rng.random(600)
    # Errors three times as likely in the lowest-ITM tenth: the whole interval is above 1.
    concentrated = rng.random(600) < np.where(scores < 0.1, 0.45, 0.15)
    lo, hi = routing_lift(concentrated, scores)["lift_ci"]
    assert 1.0 < lo < 3.0 < hi
    # Errors independent of ITM: the interval contains 1.
    lo, hi = routing_lift(rng.random(600) < 0.15, scores)["lift_ci"]
    assert lo < 1.0 < hi
    # No errors: no interval.
    assert all(math.isnan(v) for v in routing_lift(np.zeros(10, dtype=bool), scores[:10])["lift_ci"])


def test_the_itm_auroc_interval_survives_unequal_groups_and_respects_known_mismatches():
    """Text-only posts, unknown reviewed pairs and known mismatches make the two groups differ
    in size; the paired bootstrap returned [nan, nan] then (v0002's card in issue 24)."""
    import math

    import numpy as np

    from trainer.evaluate import itm_auroc_interval
    from trainer.train import EvalOutput

    rng = np.random.default_rng(0)
    match = np.concatenate([rng.uniform(0.5, 1.0, 80), [np.nan] * 10, rng.uniform(0.0, 0.4, 10), [0.99] * 5])
    target = np.concatenate([np.ones(80), [np.nan] * 10, np.zeros(10), [np.nan] * 5])
    swapped = rng.uniform(0.0, 0.6, 85)
    split = EvalOutput({}, {}, match, swapped, target)
    pos, neg = split.itm_pairs()
    assert len(pos) == 80 and len(neg) == 95, "unknown pairs are neither; known mismatches are negatives"
    low, high = itm_auroc_interval(pos, neg)
    assert math.isfinite(low) and math.isfinite(high) and low <= split.itm_auroc() <= high
    # Taking every actual pair as a match (no targets) scores the known mismatches as misses.
    assert split.itm_auroc() > EvalOutput({}, {}, match, swapped).itm_auroc() + 0.02
