"""The coverage machinery of studies/live_quality_coverage.py on synthetic predictions (no data
needed): the oracle's verdicts go through the product's path and count exactly; the rules'
interval covers the F1 of the audited population at about its nominal rate; and when routing
takes the model's errors out of the audited population, coverage of the all-posts F1 drops,
which the simulation must be able to show."""

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


def test_the_oracle_counts_exactly_through_the_products_path() -> None:
    stream = synthetic(routing_finds_errors=True)
    result = simulate_stream(stream, "k", 1.0, None, np.random.default_rng(0))  # audit everything not routed
    for task in TASKS:
        auto = ~stream.routed & (stream.truth[task] != IGNORE)
        y, d = stream.truth[task][auto] == 1, stream.decision[task][auto]
        expected = Counts(
            tp=float((y & d).sum()), fp=float((~y & d).sum()), fn=float((y & ~d).sum()), tn=float((~y & ~d).sum())
        )
        assert result.audit[task] == expected
        assert result.f1[task].value == pytest.approx(truths(stream)[task].f1_auto)
        routed = stream.routed & (stream.truth[task] != IGNORE)
        assert result.routed[task].n == routed.sum()
        assert result.routed[task].errors == (stream.truth[task][routed] != stream.decision[task][routed]).sum()
    assert macro_f1(result.audit["hate"]).lower < result.f1["hate"].value


def test_coverage_is_near_nominal_when_routing_is_random() -> None:
    stream = synthetic(routing_finds_errors=False)
    result = coverage(stream, n_streams=150, rate=0.1, size=6000, seed=3)
    for task, r in result.items():
        assert r["audit_verdicts_mean"] == pytest.approx(540, rel=0.1)  # 10% of the ~90% not routed
        assert r["covers_f1_auto"] >= 0.88, (task, r)
        assert r["covers_f1_all"] >= 0.88, (task, r)  # random routing: both populations alike


def test_coverage_of_the_all_posts_f1_drops_when_routing_removes_errors() -> None:
    stream = synthetic(routing_finds_errors=True)
    t = truths(stream)
    assert all(t[task].f1_auto > t[task].f1_all + 0.02 for task in TASKS)
    result = coverage(stream, n_streams=150, rate=0.1, size=6000, seed=4)
    for task, r in result.items():
        assert r["covers_f1_auto"] >= 0.88, (task, r)
        assert r["covers_f1_all"] <= 0.5, (task, r)
        assert r["covers_lift_live"] >= 0.88 and r["covers_lift_offline"] <= 0.5, (task, r)
