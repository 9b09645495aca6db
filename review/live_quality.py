"""How good the live model is, from reviewers' verdicts (issue: live quality).

Every labelling decision on `reviewed` is one outcome per task it labels: the model said
positive or not (`model_labels[task].decision`), the reviewer said positive or not (confirm:
as the model; not_violating: negative; correct: the other label, tasks being binary). Counted
by the item's kind. The dataset sink counts each post's first labelling decision once it is
committed (`modstream_live_outcomes_total`); Prometheus turns the counters into rates, Wilson
intervals and alerts (deploy/prometheus/rules).

- `audit` decisions: the worker draws the audit sample by a keyed hash of the post id from
  every post the model labels, before routing (stream/audit_sampling.py, stream/pipeline.py),
  and a picked post is reviewed once, blind, as `audit`, routed or not. So the audited posts are
  a uniform random sample of the model-labelled stream and their verdicts estimate the stream's
  precision, recall, F1 and error rate without bias. (The first design audited only `auto`
  labels: routing removes the model's hardest ~9%, so the audit read the F1 of the easier rest,
  0.720 / 0.639 on CM-Off where the stream's is 0.698 / 0.626, and the lift's denominator was
  the unrouted posts' error rate: BENCHMARKS.md, "Live quality from a blind audit".)
- `routed` decisions: items routing sent to review and the audit did not pick. Whether the hash
  picks a post does not depend on the post (a keyed hash of its id), so removing the audit's
  share from the routed stratum removes a random share of it: what remains is still a uniform
  sample of the routed stratum (99% of it at the default rate), and its error rate is the
  routed posts' error rate without bias. The audit items of routed posts say so in
  `routed_by_policy` (true), for anyone who wants the routed stratum's audit verdicts too.
- The live routing lift = the routed decisions' error rate / the audit decisions' error rate:
  the error rate among what routing picks over the error rate among all posts, which is the
  offline lift's definition (a random choice of the same size would score 1). Both sides are
  unbiased samples of their populations, so the lift's ratio estimate is consistent.
- A `routed` decision whose item was not routed by the policy (`routed_by_policy` false: an
  audit item escalated and settled by an admin, who sees the model's view, is recorded as
  `routed`) belongs to neither population and is not counted (`live_kind`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from modstream.records import ReviewDecision

OUTCOMES = ("tp", "fp", "fn", "tn")


def task_outcomes(decision: ReviewDecision) -> Iterator[tuple[str, str]]:
    """(task, outcome) for every task the decision labels and the model scored."""
    for task, verdict in decision.decisions.items():
        model = decision.model_labels.get(task) or {}
        model_positive = model.get("decision")
        if not isinstance(model_positive, bool):
            continue
        if verdict.action == "confirm":
            human_positive = model_positive
        elif verdict.action == "not_violating":
            human_positive = False
        elif verdict.action == "correct":
            human_positive = not model_positive
        else:  # skip, escalate: no verdict
            continue
        if model_positive:
            yield task, "tp" if human_positive else "fp"
        else:
            yield task, "fn" if human_positive else "tn"


def live_kind(decision: ReviewDecision) -> str | None:
    """The population a decision's verdicts measure for live quality: "audit" (a uniform sample
    of the stream), "routed" (the routed stratum), or None (neither: a `routed` decision on a
    post routing did not pick, i.e. an escalated audit item settled in view of the model)."""
    if decision.kind == "routed" and decision.routed_by_policy is False:
        return None
    return decision.kind


# -- the shipped rules' statistics, in Python ------------------------------------------------
#
# deploy/prometheus/rules/modstream.rules.yml computes these from the 7-day outcome counts
# (modstream:live_outcomes:7d); the console's live-quality page and the coverage study
# (studies/live_quality_coverage.py) compute them here from the same counts, with the same
# constants, so what they show is what the alerts see. tests/integration/test_live_quality_page.py
# checks the two agree on a real Prometheus.

Z = 1.96


@dataclass(frozen=True)
class Interval:
    value: float  # NaN when undefined (no trials)
    lower: float
    upper: float


NO_INTERVAL = Interval(math.nan, math.nan, math.nan)


def wilson(x: float, n: float) -> Interval:
    """x successes out of n with the Wilson 95% score interval, written as the rules write it:
    (p + 1.9208/n -+ 1.96 sqrt(p(1-p)/n + 0.9604/n^2)) / (1 + 3.8416/n)."""
    if not n > 0:
        return NO_INTERVAL
    p = x / n
    centre = p + 1.9208 / n
    spread = Z * math.sqrt(max(p * (1 - p) / n + 0.9604 / n**2, 0.0))
    scale = 1 + 3.8416 / n
    return Interval(p, (centre - spread) / scale, (centre + spread) / scale)


@dataclass(frozen=True)
class Counts:
    """One task's verdicts of one kind (audit or routed) on one model version."""

    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    tn: float = 0.0

    @property
    def n(self) -> float:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def errors(self) -> float:
        return self.fp + self.fn

    @classmethod
    def of(cls, outcomes: Iterable[str]) -> Counts:
        tally = dict.fromkeys(OUTCOMES, 0)
        for outcome in outcomes:
            tally[outcome] += 1
        return cls(**tally)


def macro_f1(c: Counts) -> Interval:
    """Macro-F1 of a binary task with the rules' interval: each class's F1 as a share
    x / n (positive: 2tp / (2tp + fp + fn); negative: 2tn / (2tn + fp + fn)) with its Wilson
    interval; the macro value and both bounds are the means of the two classes'. Undefined
    (NaN) when either class has no trials, as the rules' division by zero is."""
    pos = wilson(2 * c.tp, 2 * c.tp + c.fp + c.fn)
    neg = wilson(2 * c.tn, 2 * c.tn + c.fp + c.fn)
    return Interval((pos.value + neg.value) / 2, (pos.lower + neg.lower) / 2, (pos.upper + neg.upper) / 2)


def precision(c: Counts) -> Interval:
    return wilson(c.tp, c.tp + c.fp)


def recall(c: Counts) -> Interval:
    return wilson(c.tp, c.tp + c.fn)


def error_rate(c: Counts) -> Interval:
    return wilson(c.errors, c.n)


def routing_lift(routed: Counts, audit: Counts) -> Interval:
    """Routing's error rate over the audit sample's (modstream:live_routing_lift:7d), with a
    95% interval for a ratio of two independent proportions (Katz's log method: log lift
    +- 1.96 sqrt(1/x1 - 1/n1 + 1/x2 - 1/n2)). The rules record no interval for it (their alert
    compares the two Wilson intervals instead); undefined when either side has no errors."""
    if not (routed.n > 0 and audit.n > 0 and routed.errors > 0 and audit.errors > 0):
        value = (
            (routed.errors / routed.n) / (audit.errors / audit.n) if routed.n and audit.n and audit.errors else math.nan
        )
        return Interval(value, math.nan, math.nan)
    value = (routed.errors / routed.n) / (audit.errors / audit.n)
    se = math.sqrt(1 / routed.errors - 1 / routed.n + 1 / audit.errors - 1 / audit.n)
    return Interval(value, value * math.exp(-Z * se), value * math.exp(Z * se))
