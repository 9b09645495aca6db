"""The console's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modstream.records import REVIEW_STAGES
from review.agreement import MIN_PAIRS, AgreementReport
from review.queue import QueueStats, ReviewQueue


class Metrics:
    """The console's own registry, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "modstream_review_decisions_total", "Task decisions written to Kafka, by action", ["action"], registry=r
        )
        self.items_decided = Counter("modstream_review_items_decided_total", "Review items decided", registry=r)
        self.claims = Counter("modstream_review_claims_total", "New review items handed to a reviewer", registry=r)
        self.reclaims = Counter(
            "modstream_review_reclaims_total", "Abandoned claims taken over by another reviewer", registry=r
        )
        self.dead = Counter("modstream_review_dead_lettered_total", "Items moved to the dead-letter stream", registry=r)
        self.renewals = Counter(
            "modstream_review_renewals_total", "Claims renewed by their holder (page heartbeat or API)", registry=r
        )
        self.claims_lost = Counter(
            "modstream_review_claims_lost_total",
            "Requests refused because the caller did not hold the item: a renewal, a submit (nothing "
            "recorded), or the close after the decision was produced (item left to its new holder)",
            ["stage"],
            registry=r,
        )
        self.kafka_errors = Counter(
            "modstream_review_kafka_errors_total", "Decisions that could not be written to Kafka", registry=r
        )
        self.depth = Gauge("modstream_review_queue_depth", "Review entries not yet acknowledged", registry=r)
        self.oldest = Gauge("modstream_review_oldest_item_age_seconds", "Age of the oldest open item", registry=r)
        self.escalations_settled = Counter(
            "modstream_review_escalations_settled_total",
            "Escalated items settled by an admin: decided (a labelled decision written to Kafka) or dismissed",
            ["outcome"],
            registry=r,
        )
        self.dead_depth = Gauge(
            "modstream_review_dead_letter_depth", "Items in the review dead-letter stream", registry=r
        )
        self.latency = Histogram(
            "modstream_review_request_seconds",
            "Console request latency by route",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.banked = Counter(
            "modstream_review_banked_total",
            "Decided images added to a verdict bank (stream/banks), by bank (violating, benign)",
            ["bank"],
            registry=r,
        )
        self.bank_curation = Counter(
            "modstream_review_bank_curation_total",
            "Verdict-bank entries an admin removed or imported, by action",
            ["action"],
            registry=r,
        )
        self.stages = Counter(
            "modstream_review_stage_decisions_total",
            "Decisions by double-review stage: single, first (of two blind reviews), agreed / disagreed "
            "(the second review; a disagreement is escalated), second (a second review that labelled nothing), "
            "settled (an admin's decision on a pair), gold (an answer to a gold item)",
            ["stage"],
            registry=r,
        )
        for stage in REVIEW_STAGES:
            self.stages.labels(stage)
        self.kappa = Gauge(
            "modstream_review_agreement_kappa",
            'Cohen\'s kappa of double-reviewed items per task, over every pair (reviewer="all") or the pairs '
            "a reviewer was part of; only with at least review/agreement.py MIN_PAIRS pairs",
            ["task", "reviewer"],
            registry=r,
        )
        self.kappa_pairs = Gauge(
            "modstream_review_agreement_pairs",
            "Double-reviewed pairs behind modstream_review_agreement_kappa (both reviewers labelled the task)",
            ["task", "reviewer"],
            registry=r,
        )
        self.gold_accuracy = Gauge(
            "modstream_review_gold_accuracy",
            "Share of answers to gold items that match the admin's known answer, per task and reviewer",
            ["task", "reviewer"],
            registry=r,
        )
        self.gold_answers = Gauge(
            "modstream_review_gold_answers",
            "Answers to gold items behind modstream_review_gold_accuracy",
            ["task", "reviewer"],
            registry=r,
        )
        for bank in ("violating", "benign"):
            self.banked.labels(bank)
        for action in ("remove", "import"):
            self.bank_curation.labels(action)
        self._seen = (0, 0, 0)

    def sync_queue(self, queue: ReviewQueue) -> None:
        events = queue.events
        claims, reclaims, dead = events.claims, events.reclaims, events.dead_lettered
        self.claims.inc(claims - self._seen[0])
        self.reclaims.inc(reclaims - self._seen[1])
        self.dead.inc(dead - self._seen[2])
        self._seen = (claims, reclaims, dead)

    def set_stats(self, stats: QueueStats) -> None:
        self.depth.set(stats.depth)
        self.oldest.set(stats.oldest_age_s or 0)
        self.dead_depth.set(stats.dead_letters)

    def set_agreement(self, report: AgreementReport) -> None:
        """The agreement gauges from a fresh report: series of reviewers no longer in the window go."""
        for gauge in (self.kappa, self.kappa_pairs, self.gold_accuracy, self.gold_answers):
            gauge.clear()
        for row in report.kappa:
            self.kappa_pairs.labels(row.task, row.reviewer).set(row.pairs)
            if row.kappa is not None and row.pairs >= MIN_PAIRS:
                self.kappa.labels(row.task, row.reviewer).set(row.kappa)
        for gold in report.gold:
            self.gold_answers.labels(gold.task, gold.reviewer).set(gold.answers)
            if gold.accuracy is not None:
                self.gold_accuracy.labels(gold.task, gold.reviewer).set(gold.accuracy)

    def stats_unknown(self) -> None:
        """Redis did not answer: NaN, not the last value nor 0 (a queue depth of 0 while Redis
        was down read as "all reviewed"). NaN compares false, so no queue alert fires on it."""
        for gauge in (self.depth, self.oldest, self.dead_depth):
            gauge.set(float("nan"))
