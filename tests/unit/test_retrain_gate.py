"""The promotion gate as a pure function: numbers in, decision and why out."""

import pytest

from trainer.gate import Comparison, gate_verdict


def _c(holdout: str, task: str, n: int, current: float | None, candidate: float | None) -> Comparison:
    return Comparison(holdout, task, n, current, candidate)


def test_promotes_when_every_task_is_within_the_margin_and_names_the_closest_call():
    decision = gate_verdict(
        [
            _c("base", "hate", 120, 0.800, 0.850),
            _c("base", "sarcasm", 120, 0.700, 0.690),
            _c("reviewed", "hate", 40, 0.600, 0.700),
        ],
        margin=0.02,
        min_examples=20,
    )
    assert decision.promoted
    assert [c.verdict for c in decision.checks] == ["pass", "pass", "pass"]
    assert "Promoted" in decision.why
    # The closest call is sarcasm on base (a drop of 0.01), with both numbers.
    assert "sarcasm on the base holdout" in decision.why and "0.690" in decision.why and "0.700" in decision.why


def test_a_drop_exactly_at_the_margin_passes_and_just_beyond_fails():
    at_margin = gate_verdict([_c("base", "hate", 50, 0.80, 0.78)], margin=0.02, min_examples=20)
    assert at_margin.promoted, at_margin.why
    beyond = gate_verdict([_c("base", "hate", 50, 0.80, 0.7799)], margin=0.02, min_examples=20)
    assert not beyond.promoted
    assert beyond.checks[0].verdict == "fail"


def test_refusal_names_the_task_holdout_and_numbers_of_the_worst_drop():
    decision = gate_verdict(
        [
            _c("base", "hate", 100, 0.81, 0.80),
            _c("base", "sarcasm", 100, 0.75, 0.70),
            _c("reviewed", "hate", 60, 0.801, 0.612),
        ],
        margin=0.02,
        min_examples=20,
    )
    assert not decision.promoted
    assert decision.why.startswith("Refused: hate on the reviewed holdout: candidate 0.612 vs current 0.801 (n=60)")
    assert "drop of 0.189" in decision.why and "margin 0.020" in decision.why
    # The other failure is listed too; the passing check is not blamed.
    assert "sarcasm on the base holdout" in decision.why
    assert [c.verdict for c in decision.checks] == ["pass", "fail", "fail"]


def test_a_holdout_below_the_minimum_is_not_enough_evidence_and_does_not_block():
    decision = gate_verdict(
        [
            _c("base", "hate", 100, 0.80, 0.81),
            _c("base", "sarcasm", 100, 0.80, 0.80),
            # A huge drop, but on only 5 examples: reported, not gated.
            _c("reviewed", "hate", 5, 0.90, 0.20),
            # The reviewed data does not label sarcasm at all.
            _c("reviewed", "sarcasm", 0, None, None),
        ],
        margin=0.02,
        min_examples=20,
    )
    assert decision.promoted, decision.why
    assert [c.verdict for c in decision.checks][2:] == ["not enough evidence"] * 2
    assert "Not enough evidence" in decision.why and "hate on reviewed (n=5)" in decision.why


def test_refused_when_no_holdout_has_enough_evidence():
    decision = gate_verdict([_c("base", "hate", 10, 0.5, 0.9), _c("reviewed", "hate", 3, 0.5, 0.9)], 0.02, 20)
    assert not decision.promoted
    assert "no holdout has 20 or more labelled examples" in decision.why


def test_to_dict_carries_margin_minimum_and_checks():
    decision = gate_verdict([_c("base", "hate", 30, 0.8, 0.5)], margin=0.05, min_examples=25)
    data = decision.to_dict()
    assert data["promoted"] is False and data["margin"] == 0.05 and data["min_holdout"] == 25
    assert data["checks"][0]["verdict"] == "fail" and data["checks"][0]["drop"] == pytest.approx(0.3)


def test_bad_gate_settings_are_errors():
    with pytest.raises(ValueError, match="margin"):
        gate_verdict([], margin=-0.1)
    with pytest.raises(ValueError, match="min_examples"):
        gate_verdict([], min_examples=0)
