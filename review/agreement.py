"""Reviewer agreement (issue 21 part 5): double review, Cohen's kappa and gold items.

A share of review items (`SecondReviewSampler`: a keyed hash of the post id, as audit
sampling picks posts, so a replay picks the same ones and nobody without the key can tell
which) is decided twice, by two different reviewers, the second blind to the first:

1. the first reviewer's labelling decision goes to `reviewed` with `review_stage="first"`;
   the entry stays pending in Redis, parked (review/queue.py `PARKED`) with the first verdict
   beside it, until a reviewer other than the first claims it; the page and API show the
   item exactly as the first reviewer saw it (an audit item stays blind), nothing of the
   first decision;
2. the second reviewer's decision is `agreed` when every task both labelled has the same
   label, else `disagreed`: the item ends either way, and a disagreement is copied to the
   escalated stream for an admin, whose final decision is `settled`.

Only `single`, `agreed` and `settled` decisions train (modstream.records.TRAINING_STAGES):
the dataset rules (review/dataset.py `plan_batch`) refuse every other stage, so the first
decision of a pair is never a training example on its own, whatever the console does next.

Agreement is Cohen's kappa per task over finished pairs (both reviewers labelled the task),
overall and per reviewer (the pairs that reviewer was part of, against their partner).
Gold items are admin-defined known answers mixed into the queue (blind, like audit items);
each reviewer's accuracy on them is measured, and their answers never train.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modstream.records import RecordError
from stream.audit_sampling import AuditSampler

if TYPE_CHECKING:
    from modstream.records import ReviewDecision
    from review.queue import Pair, ReviewQueue

DEFAULT_RATE = 0.05
MIN_PAIRS = 20  # fewer pairs than this: kappa is shown as "too few" and not exported


class SecondReviewSampler(AuditSampler):
    """Picks posts for a second review: HMAC-SHA256 of the post id under its own key domain
    (the audit key with a prefix, so the two samples are independent), below `rate`."""

    def picks(self, post_id: str) -> bool:
        return super().picks("second-review:" + post_id)


def second_review_sampler(rate: float) -> SecondReviewSampler:
    """The sampler under the deployment's audit key (MODSTREAM_AUDIT_KEY; unset: the
    development key, with a warning), for a rate that is not 0."""
    from modstream.settings import current

    key = current().audit_key if rate > 0 else None
    if rate <= 0:
        return SecondReviewSampler(0.0, b"unused: the rate is 0")
    return SecondReviewSampler(rate, key.get_secret_value() if key is not None else None)


def agreement_outcome(first: Mapping[str, str | None], second: Mapping[str, str | None]) -> str:
    """`agreed` when every task both reviewers labelled has one label, else `disagreed`."""
    for task, label in second.items():
        other = first.get(task)
        if label is not None and other is not None and label != other:
            return "disagreed"
    return "agreed"


async def review_stage(queue: ReviewQueue, sampler: SecondReviewSampler, post_id: str, decision: ReviewDecision) -> str:
    """Where `decision` on `post_id` stands in double review (modstream.records.REVIEW_STAGES),
    for the console and the Label Studio import alike: a gold item's answer; the second review of
    a pair (agreed, disagreed, or second when it labels nothing or escalates); the first of a pair
    when the sampler picks the post and it labels something; else single. RecordError when the
    decision's reviewer made the pair's first review: a different reviewer decides the second."""
    labels = decision.training_labels()
    labelled = any(label is not None for label in labels.values())
    if await queue.gold(post_id) is not None:
        return "gold"
    pair = await queue.pair(post_id)
    if pair is not None and pair.state == "first":
        if pair.first_reviewer == decision.reviewer:
            raise RecordError("reviewer", "you gave this item its first review; a different reviewer decides it")
        if not labelled or decision.escalated:
            return "second"  # skipped (back to the queue) or escalated (to an admin): no outcome yet
        return agreement_outcome(pair.first_labels, labels)
    if labelled and not decision.escalated and sampler.picks(post_id):
        return "first"
    return "single"


def disagreement_note(pair: Pair | None, decision: ReviewDecision) -> str:
    """The escalation's note for a disagreeing second review: each task's two labels, by whom
    (the admins settle it; reviewers never see it), and the second reviewer's own note."""
    first = pair.first_reviewer if pair else "?"
    said = "; ".join(
        f"{task}: {first} {(pair.first_labels.get(task) if pair else None) or '-'}, {decision.reviewer} {label or '-'}"
        for task, label in decision.training_labels().items()
    )
    note = f"double review disagreement ({said})"
    if decision.note:
        note += f"; {decision.reviewer}'s note: {decision.note}"
    return note


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e), p_e from
    each rater's own label frequencies. None with no pairs; 1.0 when both always give one and
    the same label (nothing to disagree on), 0.0 when p_e is 1 otherwise."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(1 for a, b in pairs if a == b) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    expected = sum(first[label] * second.get(label, 0) for label in first) / (n * n)
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - expected) / (1.0 - expected)


@dataclass
class KappaRow:
    task: str
    reviewer: str  # "all" for every pair
    pairs: int
    agreement: float | None  # the share of pairs with one label
    kappa: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "reviewer": self.reviewer,
            "pairs": self.pairs,
            "agreement": self.agreement,
            "kappa": self.kappa,
            "enough": self.pairs >= MIN_PAIRS,
        }


@dataclass
class GoldRow:
    task: str
    reviewer: str  # "all" for every answer
    answers: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answers if self.answers else None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "reviewer": self.reviewer,
            "answers": self.answers,
            "correct": self.correct,
            "accuracy": self.accuracy,
        }


@dataclass
class AgreementReport:
    kappa: list[KappaRow] = field(default_factory=list)
    gold: list[GoldRow] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)  # agreed / disagreed over the pairs read

    def to_json(self) -> dict[str, Any]:
        return {
            "kappa": [row.to_json() for row in self.kappa],
            "gold": [row.to_json() for row in self.gold],
            "outcomes": self.outcomes,
            "min_pairs": MIN_PAIRS,
        }


def _label_pairs(pairs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(task, reviewer or "all") -> [(that reviewer's label, the partner's label)], over the
    tasks both reviewers labelled. For "all" the order is (first, second)."""
    out: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for pair in pairs:
        first, second = pair.get("first_labels") or {}, pair.get("second_labels") or {}
        a, b = str(pair.get("first_reviewer", "")), str(pair.get("second_reviewer", ""))
        if not isinstance(first, Mapping) or not isinstance(second, Mapping):
            continue
        for task, x in first.items():
            y = second.get(task)
            if not isinstance(x, str) or not isinstance(y, str):
                continue
            out[(str(task), "all")].append((x, y))
            out[(str(task), a)].append((x, y))
            out[(str(task), b)].append((y, x))
    return out


def agreement_report(
    pairs: Sequence[Mapping[str, Any]], gold_answers: Sequence[Mapping[str, Any]] = ()
) -> AgreementReport:
    """Kappa per task, overall and per reviewer, from finished pairs (review/queue.py
    `pairs()`), and accuracy on gold items per task and reviewer (`gold_answers()`)."""
    report = AgreementReport()
    report.outcomes = dict(Counter(str(p.get("outcome", "")) for p in pairs if p.get("outcome")))
    for (task, reviewer), labelled in sorted(
        _label_pairs(pairs).items(), key=lambda kv: (kv[0][0], kv[0][1] != "all", kv[0][1])
    ):
        agreement = sum(1 for x, y in labelled if x == y) / len(labelled)
        report.kappa.append(KappaRow(task, reviewer, len(labelled), agreement, cohen_kappa(labelled)))
    gold: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for answer in gold_answers:
        result = answer.get("result") or {}
        reviewer = str(answer.get("reviewer", ""))
        if not isinstance(result, Mapping):
            continue
        for task, scored in result.items():
            if not isinstance(scored, Mapping) or scored.get("given") is None:
                continue
            right = int(scored.get("given") == scored.get("expected"))
            for who in ("all", reviewer):
                gold[(str(task), who)][0] += 1
                gold[(str(task), who)][1] += right
    for (task, reviewer), (answers, correct) in sorted(
        gold.items(), key=lambda kv: (kv[0][0], kv[0][1] != "all", kv[0][1])
    ):
        report.gold.append(GoldRow(task, reviewer, answers, correct))
    return report


def gold_result(expected: Mapping[str, str], given: Mapping[str, str | None]) -> dict[str, dict[str, str | None]]:
    """Per task with a known answer: {expected, given} (given None: the reviewer gave none)."""
    return {task: {"expected": label, "given": given.get(task)} for task, label in expected.items()}
