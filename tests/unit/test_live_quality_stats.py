"""The live-quality statistics as the shipped Prometheus rules compute them (Wilson per class
F1, averaged into macro-F1), checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from review.live_quality import Counts, error_rate, macro_f1, precision, recall, routing_lift, wilson


def test_macro_f1_interval_matches_a_hand_computed_case() -> None:
    # tp 30, fp 10, fn 20, tn 40.
    # positive class: x = 60, n = 90, p = 2/3; centre 2/3 + 1.9208/90 = 0.688009;
    #   half-width 1.96 sqrt(0.2222/90 + 0.9604/8100) = 0.099703; scale 1 + 3.8416/90 = 1.042684
    #   -> [0.564223, 0.755466]
    # negative class: x = 80, n = 110, p = 0.727273; centre 0.744735; half-width 0.085040;
    #   scale 1.034924 -> [0.637433, 0.801774]
    # macro: 0.696970 [0.600828, 0.778620]
    got = macro_f1(Counts(tp=30, fp=10, fn=20, tn=40))
    assert got.value == pytest.approx(0.696970, abs=1e-6)
    assert got.lower == pytest.approx(0.600828, abs=1e-5)
    assert got.upper == pytest.approx(0.778620, abs=1e-5)
    pos = wilson(60, 90)
    assert (pos.lower, pos.upper) == (pytest.approx(0.564223, abs=1e-5), pytest.approx(0.755466, abs=1e-5))


def test_rates_and_their_intervals() -> None:
    c = Counts(tp=30, fp=10, fn=20, tn=40)
    assert precision(c).value == pytest.approx(0.75) and recall(c).value == pytest.approx(0.6)
    assert error_rate(c).value == pytest.approx(0.3)
    for interval in (precision(c), recall(c), error_rate(c)):
        assert 0 < interval.lower < interval.value < interval.upper < 1
    # A class with no trials: undefined, as the rules' division by zero is, never a crash.
    assert math.isnan(macro_f1(Counts(tp=5)).value)
    assert math.isnan(wilson(0, 0).value)
    assert Counts.of(["tp", "tp", "fn"]) == Counts(tp=2, fn=1)


def test_routing_lift_with_katz_interval() -> None:
    # routed: 5 errors of 10 (0.5); audit: 30 of 100 (0.3): lift 5/3;
    # se = sqrt(1/5 - 1/10 + 1/30 - 1/100) = 0.351188, factor exp(1.96 se) = 1.990388
    lift = routing_lift(Counts(tp=5, fp=5), Counts(tp=30, fp=10, fn=20, tn=40))
    assert lift.value == pytest.approx(5 / 3)
    assert lift.lower == pytest.approx(5 / 3 / 1.990388, rel=1e-5)
    assert lift.upper == pytest.approx(5 / 3 * 1.990388, rel=1e-5)
    assert math.isnan(routing_lift(Counts(tp=5), Counts(tp=30, fp=10)).lower)  # routing found no error
