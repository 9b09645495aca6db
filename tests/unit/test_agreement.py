"""Reviewer agreement (issue 21 part 5), pure logic: Cohen's kappa against scripted reviewers
with known error rates (the acceptance: within +-0.05 of the truth over 2,000 items), the
pair outcome, the dataset rule that only single, agreed and settled decisions train, and the
gold item checks."""

from __future__ import annotations

import random
from typing import Any

import pytest

from modstream.records import RecordError, ReviewDecision, TaskDecision
from review.agreement import MIN_PAIRS, SecondReviewSampler, agreement_outcome, agreement_report, cohen_kappa
from review.console.agreement import gold_item
from review.dataset import plan_batch

N_ITEMS = 2000


def true_kappa(prevalence: float, e1: float, e2: float) -> float:
    """Kappa of two reviewers who each flip a binary truth with their own error rate."""
    observed = (1 - e1) * (1 - e2) + e1 * e2
    q1 = prevalence * (1 - e1) + (1 - prevalence) * e1
    q2 = prevalence * (1 - e2) + (1 - prevalence) * e2
    expected = q1 * q2 + (1 - q1) * (1 - q2)
    return (observed - expected) / (1 - expected)


def scripted(truth: str, error: float, rng: random.Random, labels: tuple[str, str]) -> str:
    if rng.random() < error:
        return labels[0] if truth == labels[1] else labels[1]
    return truth


@pytest.mark.parametrize(
    ("prevalence", "e1", "e2", "seed"),
    [(0.5, 0.05, 0.10, 1), (0.3, 0.10, 0.20, 2), (0.2, 0.02, 0.25, 3), (0.4, 0.15, 0.15, 4), (0.1, 0.05, 0.05, 5)],
)
def test_kappa_of_scripted_reviewers_is_within_005_of_the_truth_over_2000_items(
    prevalence: float, e1: float, e2: float, seed: int
) -> None:
    rng = random.Random(seed)
    labels = ("not_hateful", "hateful")
    pairs: list[dict[str, Any]] = []
    for i in range(N_ITEMS):
        truth = labels[1] if rng.random() < prevalence else labels[0]
        a, b = scripted(truth, e1, rng, labels), scripted(truth, e2, rng, labels)
        outcome = agreement_outcome({"hate": a}, {"hate": b})
        pairs.append(
            {"post_id": f"p{i}", "first_reviewer": "ann", "second_reviewer": "bob",
             "first_labels": {"hate": a}, "second_labels": {"hate": b}, "outcome": outcome}
        )  # fmt: skip
    report = agreement_report(pairs)
    rows = {(r.task, r.reviewer): r for r in report.kappa}
    truth = true_kappa(prevalence, e1, e2)
    overall = rows[("hate", "all")]
    assert overall.pairs == N_ITEMS
    assert overall.kappa is not None and abs(overall.kappa - truth) <= 0.05, (overall.kappa, truth)
    # Each reviewer's row is the same pairs seen from their side: the same kappa.
    for who in ("ann", "bob"):
        assert rows[("hate", who)].kappa == pytest.approx(overall.kappa)
    # Raw agreement is not kappa: at low prevalence it is far above it (the chance part).
    assert overall.agreement is not None and overall.agreement - overall.kappa > 0.05
    assert report.outcomes["agreed"] + report.outcomes["disagreed"] == N_ITEMS


def test_kappa_over_200_simulated_reviewer_pairs_is_unbiased_and_within_005_nearly_always() -> None:
    """200 random reviewer pairs (prevalence 0.1-0.6, error rates 0-0.3), 2,000 items each.
    Kappa over 2,000 items has a standard error near 0.015-0.03 here, so +-0.05 is about two
    to three of them: measured 196 of 200 within (median error 0.013, 95th percentile 0.035,
    worst 0.062). The test asks for at least 95% within, a median under 0.02 and no bias."""
    rng = random.Random(21)
    errors = []
    for _ in range(200):
        prevalence, e1, e2 = rng.uniform(0.1, 0.6), rng.uniform(0, 0.3), rng.uniform(0, 0.3)
        labelled = []
        for _ in range(N_ITEMS):
            truth = "y" if rng.random() < prevalence else "n"
            labelled.append((scripted(truth, e1, rng, ("n", "y")), scripted(truth, e2, rng, ("n", "y"))))
        estimate = cohen_kappa(labelled)
        assert estimate is not None
        errors.append(estimate - true_kappa(prevalence, e1, e2))
    within = sum(abs(e) <= 0.05 for e in errors)
    assert within >= 190, (within, sorted(map(abs, errors))[-10:])
    assert sorted(map(abs, errors))[100] < 0.02
    assert abs(sum(errors) / len(errors)) < 0.01  # unbiased: a wrong chance term would shift every estimate


def test_kappa_of_a_textbook_table() -> None:
    # 20 yes-yes, 5 yes-no, 10 no-yes, 15 no-no: p_o 0.7, p_e 0.5, kappa 0.4
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa([]) is None
    assert cohen_kappa([("y", "y")] * 5) == 1.0  # one label throughout: nothing to disagree on
    assert cohen_kappa([("y", "n"), ("n", "y")]) == pytest.approx(-1.0)


def test_per_reviewer_rows_count_the_pairs_they_were_part_of_and_skip_unlabelled_tasks() -> None:
    pairs = [
        {"first_reviewer": "ann", "second_reviewer": "bob", "first_labels": {"hate": "h", "sarc": None},
         "second_labels": {"hate": "h", "sarc": "s"}, "outcome": "agreed"},
        {"first_reviewer": "cy", "second_reviewer": "ann", "first_labels": {"hate": "n"},
         "second_labels": {"hate": "h"}, "outcome": "disagreed"},
        {"first_reviewer": "cy", "second_reviewer": "bob", "first_labels": "not a mapping", "second_labels": {}},
    ]  # fmt: skip
    rows = {(r.task, r.reviewer): r for r in agreement_report(pairs).kappa}
    assert rows[("hate", "all")].pairs == 2 and rows[("hate", "ann")].pairs == 2
    assert rows[("hate", "bob")].pairs == 1 and rows[("hate", "cy")].pairs == 1
    assert ("sarc", "all") not in rows  # only one reviewer labelled it
    assert not rows[("hate", "all")].to_json()["enough"] and MIN_PAIRS > 2


def test_a_pair_disagrees_only_on_a_task_both_labelled_differently() -> None:
    assert agreement_outcome({"hate": "hateful"}, {"hate": "hateful"}) == "agreed"
    assert agreement_outcome({"hate": "hateful"}, {"hate": "not_hateful"}) == "disagreed"
    assert agreement_outcome({"hate": None, "sarc": "s"}, {"hate": "hateful", "sarc": "s"}) == "agreed"
    assert agreement_outcome({"hate": "h", "sarc": "s"}, {"hate": "h", "sarc": "not_s"}) == "disagreed"


def test_gold_accuracy_per_task_and_reviewer() -> None:
    answers = [
        {"reviewer": "ann", "result": {"hate": {"expected": "h", "given": "h"}}},
        {"reviewer": "ann", "result": {"hate": {"expected": "h", "given": "n"}}},
        {
            "reviewer": "bob",
            "result": {"hate": {"expected": "n", "given": "n"}, "sarc": {"expected": "s", "given": None}},
        },
    ]
    rows = {(r.task, r.reviewer): r for r in agreement_report([], answers).gold}
    assert rows[("hate", "ann")].accuracy == 0.5 and rows[("hate", "bob")].accuracy == 1.0
    assert rows[("hate", "all")].answers == 3 and rows[("hate", "all")].correct == 2
    assert ("sarc", "bob") not in rows  # no answer given: not scored


def test_the_sampler_picks_about_its_rate_by_post_id_and_none_at_zero() -> None:
    sampler = SecondReviewSampler(0.05, b"test key")
    picked = sum(sampler.picks(f"post-{i}") for i in range(20_000))
    assert 800 <= picked <= 1200
    assert all(sampler.picks(f"post-{i}") == sampler.picks(f"post-{i}") for i in range(100))  # a replay agrees
    assert not any(SecondReviewSampler(0.0, b"k").picks(f"post-{i}") for i in range(1000))
    # its own key domain: not the audit sample's posts
    from stream.audit_sampling import AuditSampler

    audit = AuditSampler(0.05, b"test key")
    both = sum(sampler.picks(f"post-{i}") and audit.picks(f"post-{i}") for i in range(20_000))
    assert both < 150


def _decision(
    decision_id: str, stage: str, label: str = "hateful", at: str = "2026-01-01T00:00:00+00:00"
) -> ReviewDecision:
    return ReviewDecision(
        decision_id=decision_id, post_id="p1", reviewer="ann",
        decisions={"hate": TaskDecision("correct", label)}, model_version="v1",
        model_labels={"hate": {"label": "not_hateful", "decision": False}}, text="t",
        decided_at=at, review_stage=stage,
    )  # fmt: skip


@pytest.mark.parametrize("stage", ["first", "disagreed", "gold", "second"])
def test_a_stage_that_does_not_train_never_becomes_or_replaces_a_line(stage: str) -> None:
    plan = plan_batch([_decision("d1", stage)], {})
    assert plan.outcomes == ["held"] and plan.winners == {}
    line = {"id": "p1", "meta": {"decision_id": "d0", "decided_at": "2025-01-01T00:00:00+00:00", "revision": 1}}
    plan = plan_batch([_decision("d1", stage)], {"p1": line})
    assert plan.outcomes == ["held"] and plan.winners == {}


def test_the_pair_trains_only_from_the_agreeing_second_or_the_settlement() -> None:
    t = "2026-01-01T00:0{}:00+00:00".format
    first, agreed = _decision("d1", "first", at=t(1)), _decision("d2", "agreed", at=t(2))
    plan = plan_batch([first, agreed], {})
    assert plan.outcomes == ["held", "added"] and plan.winners["p1"].decision_id == "d2"
    disagreed, settled = _decision("d3", "disagreed", "not_hateful", at=t(3)), _decision("d4", "settled", at=t(4))
    plan = plan_batch([first, disagreed], {})
    assert plan.outcomes == ["held", "held"] and not plan.winners
    plan = plan_batch([first, disagreed, settled], {})
    assert plan.outcomes == ["held", "held", "added"] and plan.winners["p1"].decision_id == "d4"


def test_a_decision_record_with_an_unknown_or_forged_stage_is_refused() -> None:
    body = _decision("d1", "single").to_json()
    assert ReviewDecision.from_json({k: v for k, v in body.items() if k != "review_stage"}).review_stage == "single"
    for bad in ("trained", "", None, ["agreed"], {"agreed": 1}, 1):
        with pytest.raises(RecordError, match="review_stage"):
            ReviewDecision.from_json({**body, "review_stage": bad})


def test_gold_items_are_checked_and_queued_blind() -> None:
    good = {
        "post_id": "g1",
        "text": "hello",
        "tasks": {"hate": ["not_hateful", "hateful"]},
        "expected": {"hate": "hateful"},
    }
    item, expected = gold_item(good)
    assert item.kind == "audit" and expected == {"hate": "hateful"}
    assert "hateful" not in str(item.blinded()["label"])
    bad: list[tuple[dict[str, Any], str]] = [
        ({**good, "post_id": {"$ne": 1}}, "post_id"),
        ({**good, "post_id": "x" * 300}, "post_id"),
        ({**good, "post_id": "a\nb"}, "post_id"),
        ({**good, "text": ["nested", ["list"]]}, "text"),
        ({**good, "text": "x" * 20_001}, "text"),
        ({**good, "tasks": {"hate": "hateful"}}, "tasks.hate"),
        ({**good, "tasks": {f"t{i}": ["a", "b"] for i in range(17)}}, "tasks"),
        ({**good, "tasks": {"hate": ["a", "a"]}, "expected": {"hate": "a"}}, "tasks.hate"),
        ({**good, "tasks": {"hate": [["nested"], "b"]}}, "tasks.hate"),
        ({**good, "expected": {"hate": "maybe"}}, "expected.hate"),
        ({**good, "expected": {"other": "hateful"}}, "expected"),
        ({**good, "expected": {}}, "expected"),
        ({**good, "expected": {"hate": {"label": "hateful"}}}, "expected.hate"),
    ]
    for body, field in bad:
        with pytest.raises(RecordError) as exc:
            gold_item(body)
        assert exc.value.field == field, (body, exc.value)
