"""The coverage machinery of studies/live_quality_coverage.py on synthetic predictions (no data
needed): the oracle's verdicts go through the product's path and count exactly; the worker's
rule (audit drawn from every post before routing, a picked routed post audited once and not
also routed) gives intervals that cover the all-posts F1 and the offline lift at about their
nominal rate, also when routing takes the model's errors; the first design (audit of the posts
routing left alone) does not, which the simulation must be able to show."""

from __future__ import annotations

import numpy as np
import pytest

from review.live_quality import Counts, macro_f1
from studies.live_quality_coverage import IGNORE, PostPool, coverage, simulate_stream, truths

TASKS = {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]}


def synthetic(n: int = 1500, seed: int = 0, *, routing_finds_errors: bool) -> PostPool:
    rng = np.random.default_rng(seed)
    decision, truth = {}, {}
    wrong_any = np.zeros(n, dtype=bool)
    for k, task in enumerate(TASKS):
        y = (rng.random(n) < 0.4 + 0.1 * k).astype(np.int64)
        wrong = rng.random(n) < 0.3
        decision[task] = np.where(wrong, 1 - y, y).astype(bool)
        y[rng.random(n) < 0.01] = IGNORE  # a few posts without a label for this task
        truth[task] = y
        wrong_any |= wrong
    if routing_finds_errors:  # 20% routed, mostly the wrong ones
        score = wrong_any + rng.random(n) * 0.9
        routed = score >= np.quantile(score, 0.8)
    else:
        routed = rng.random(n) < 0.1
    return PostPool(TASKS, decision, truth, routed)


def _expected(stream: PostPool, task: str, members: np.ndarray) -> Counts:
    keep = members & (stream.truth[task] != IGNORE)
    y, d = stream.truth[task][keep] == 1, stream.decision[task][keep]
    return Counts(
        tp=float((y & d).sum()), fp=float((~y & d).sum()), fn=float((y & ~d).sum()), tn=float((~y & ~d).sum())
    )


def test_the_oracle_counts_exactly_through_the_products_path() -> None:
    stream = synthetic(routing_finds_errors=True)
    everyone = np.ones(len(stream), dtype=bool)
    # The worker's rule at rate 1: every post is an audit item, routed ones too, and none is routed.
    result = simulate_stream(stream, "k", 1.0, None, np.random.default_rng(0))
    for task in TASKS:
        assert result.audit[task] == _expected(stream, task, everyone)
        assert result.f1[task].value == pytest.approx(truths(stream)[task].f1_all)
        assert result.routed[task].n == 0
    # The first design at rate 1: the posts routing left alone are audited, the routed ones routed.
    first = simulate_stream(stream, "k", 1.0, None, np.random.default_rng(0), audit="auto")
    for task in TASKS:
        assert first.audit[task] == _expected(stream, task, ~stream.routed)
        assert first.f1[task].value == pytest.approx(truths(stream)[task].f1_auto)
        assert first.routed[task] == _expected(stream, task, stream.routed)
    assert macro_f1(first.audit["hate"]).lower < first.f1["hate"].value
    with pytest.raises(ValueError, match="audit"):
        simulate_stream(stream, "k", 1.0, None, np.random.default_rng(0), audit="routed")


def test_a_picked_routed_post_is_audited_once_and_not_also_routed() -> None:
    stream = synthetic(routing_finds_errors=True)
    result = simulate_stream(stream, "k", 0.3, None, np.random.default_rng(0))
    first = simulate_stream(stream, "k", 0.3, None, np.random.default_rng(0), audit="auto")
    for task in TASKS:
        routed = _expected(stream, task, stream.routed).n
        # Each picked routed post moved from the routed items to the audit items, nothing counted twice.
        moved = result.audit[task].n - first.audit[task].n
        assert moved > 0.15 * routed
        assert result.routed[task].n == routed - moved == first.routed[task].n - moved


def test_coverage_is_near_nominal_when_routing_is_random() -> None:
    stream = synthetic(routing_finds_errors=False)
    result = coverage(stream, n_streams=150, rate=0.1, size=6000, seed=3)
    for task, r in result.items():
        assert r["audit_verdicts_mean"] == pytest.approx(600, rel=0.1)  # 10% of every post
        assert r["covers_f1_all"] >= 0.88, (task, r)
        assert r["covers_f1_auto"] >= 0.88, (task, r)  # random routing: both populations alike


def test_the_audit_of_every_post_covers_the_stream_where_an_audit_of_auto_labels_does_not() -> None:
    stream = synthetic(routing_finds_errors=True)
    t = truths(stream)
    assert all(t[task].f1_auto > t[task].f1_all + 0.02 for task in TASKS)
    result = coverage(stream, n_streams=150, rate=0.1, size=6000, seed=4)
    for task, r in result.items():  # the worker's rule
        assert r["covers_f1_all"] >= 0.88, (task, r)
        assert r["covers_lift_offline"] >= 0.88, (task, r)
        assert r["covers_f1_auto"] <= 0.5 and r["covers_lift_auto"] <= 0.5, (task, r)
    first = coverage(stream, n_streams=150, rate=0.1, size=6000, seed=4, audit="auto")
    for task, r in first.items():  # the first design: the interval covers what it samples, not the stream
        assert r["covers_f1_auto"] >= 0.88, (task, r)
        assert r["covers_f1_all"] <= 0.5, (task, r)
        assert r["covers_lift_auto"] >= 0.88 and r["covers_lift_offline"] <= 0.5, (task, r)
