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


def _itm(holdout: str, n: int, current: float | None, candidate: float | None) -> Comparison:
    return Comparison(holdout, "itm", n, current, candidate, metric="itm_auroc")


def test_equal_labels_but_eroded_itm_auroc_is_refused_and_says_which():
    """The promotion issue 24 found: every task F1 equal, ITM AUROC 0.887 -> 0.851 on base."""
    labels = [_c("base", "hate", 120, 0.80, 0.80), _c("base", "sarcasm", 120, 0.70, 0.70)]
    decision = gate_verdict([*labels, _itm("base", 240, 0.887, 0.851)], margin=0.02, min_examples=20)
    assert not decision.promoted
    assert "ITM AUROC on the base holdout" in decision.why and "0.036" in decision.why, decision.why
    assert [c.verdict for c in decision.checks] == ["pass", "pass", "fail"]
    # Within its own margin it passes; a looser ITM margin is the operator's call.
    assert gate_verdict([*labels, _itm("base", 240, 0.887, 0.870)]).promoted
    assert gate_verdict([*labels, _itm("base", 240, 0.887, 0.851)], itm_margin=0.05).promoted


def test_itm_with_too_few_known_pairs_or_no_itm_head_does_not_block_but_says_so():
    labels = [_c("base", "hate", 120, 0.80, 0.81)]
    thin = gate_verdict([*labels, _itm("reviewed", 5, 0.9, 0.1)], min_examples=20)
    assert thin.promoted and "itm on reviewed (n=5)" in thin.why
    untrained = gate_verdict([*labels, _itm("base", 200, None, None)])
    assert untrained.promoted and "ITM AUROC not gated" in untrained.why
    # ITM evidence alone never promotes: no label check with enough examples is a refusal.
    only_itm = gate_verdict([_c("base", "hate", 3, 0.8, 0.8), _itm("base", 200, 0.8, 0.9)], min_examples=20)
    assert not only_itm.promoted and "no holdout has 20" in only_itm.why


def test_the_report_table_and_json_name_the_itm_check():
    from trainer.retrain_report import summary_table

    decision = gate_verdict([_c("base", "hate", 120, 0.8, 0.8), _itm("base", 240, 0.887, 0.851)])
    table = summary_table(decision, "v0001", "v0002")
    assert "ITM AUROC" in table and "hate F1" in table and "-0.036" in table
    as_json = decision.to_dict()
    assert as_json["itm_margin"] == 0.02 and as_json["checks"][1]["metric"] == "itm_auroc"


def test_an_itm_drop_beyond_the_margin_refuses_only_when_its_interval_is_above_zero():
    labels = [_c("base", "hate", 120, 0.80, 0.80)]
    noisy = Comparison("base", "itm", 40, 0.544, 0.521, metric="itm_auroc", drop_ci=(-0.05, 0.09))
    real = Comparison("base", "itm", 600, 0.887, 0.851, metric="itm_auroc", drop_ci=(0.02, 0.05))
    assert gate_verdict([*labels, noisy]).promoted, "a drop the pairs cannot tell from chance"
    refused = gate_verdict([*labels, real])
    assert not refused.promoted and "drop 95% CI [0.020, 0.050]" in refused.why


def test_a_candidate_that_learnt_reviewed_weak_pairs_as_matches_is_caught_on_real_scores():
    """The scores, not a hand-made number: a candidate that scores mismatched pairs as matches
    (what taking routed pairs as ITM positives teaches) against the current model, on the same
    pairs, through the same paired interval the retrain job computes."""
    import numpy as np

    from trainer.evaluate import auroc_drop_interval, itm_auroc

    rng = np.random.default_rng(3)
    pos = rng.uniform(0.4, 1.0, 300)  # true pairs
    neg = rng.uniform(0.0, 0.6, 300)  # swapped pairs
    current = (pos, neg)
    # The eroded candidate: a third of the non-pairs now look like matches.
    eroded_neg = neg.copy()
    eroded_neg[:100] = rng.uniform(0.6, 1.0, 100)
    candidate = (pos, eroded_neg)
    low, high = auroc_drop_interval(current, candidate)
    comparison = Comparison(
        "base", "itm", 300, itm_auroc(*current), itm_auroc(*candidate), metric="itm_auroc", drop_ci=(low, high)
    )
    decision = gate_verdict([_c("base", "hate", 120, 0.8, 0.8), comparison])
    assert low > 0.02 and not decision.promoted, decision.why
    same = auroc_drop_interval(current, current)
    assert same == [0.0, 0.0]


def test_a_candidate_worse_on_the_audit_holdout_is_refused_though_the_routed_one_is_fine():
    """The audit holdout is a sample of the stream as it is: a candidate that improved on the
    hard, routed posts at the expense of the ordinary ones is caught there."""
    decision = gate_verdict(
        [
            _c("base", "hate", 120, 0.80, 0.80),
            _c("reviewed", "hate", 60, 0.55, 0.70),  # better on what routing found hard
            _c("audit", "hate", 80, 0.90, 0.82),  # worse on the stream as it is
        ]
    )
    assert not decision.promoted and "hate on the audit holdout" in decision.why, decision.why
    thin = gate_verdict([_c("base", "hate", 120, 0.80, 0.80), _c("audit", "hate", 8, 0.90, 0.10)])
    assert thin.promoted and "hate on audit (n=8)" in thin.why, "a young audit holdout does not block yet"


def test_a_candidate_without_an_itm_score_fails_where_the_current_model_has_one():
    """A candidate trained without the ITM head (or with no score) would leave routing blind."""
    decision = gate_verdict([_c("base", "hate", 120, 0.80, 0.85), _itm("base", 240, 0.887, None)])
    assert not decision.promoted and "no score where the current model has one" in decision.why, decision.why
    assert "candidate none vs current 0.887" in decision.why
