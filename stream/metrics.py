"""Prometheus metrics of the worker (served on its web port at /metrics).

Every metric here is catalogued in docs/metrics.md (tests/integration/test_metric_catalogue.py
checks both ways). Inference metrics follow Triton's shape: request successes and failures,
inference count (posts) vs execution count (device batches), so the mean batch size is
rate(inference_count) / rate(exec_count); durations are histograms, never summaries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Up to past the longest timeout in use (an inference may take 60 s before it times out, a
# fetch 10 s), so a p99 near a timeout is read from a bucket edge, not interpolated to 30 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120)

POSTS = Counter(
    "modstream_posts_total", "Posts finished, by outcome (auto, review, bank_match, dead_letter, lost)", ["outcome"]
)
LABELS = Counter(
    "modstream_labels_total",
    "Labels acknowledged by the broker, by the model version serving and route (auto, review, bank_match)",
    ["model_version", "route"],
)
TASK_DECISIONS = Counter(
    "modstream_task_decisions_total",
    "Labels acknowledged by the broker, per task and decision (positive: score >= threshold)",
    ["model_version", "task", "decision"],
)
DLQ = Counter("modstream_dead_letters_total", "Posts sent to the dead-letter topic", ["stage", "reason"])
REVIEW = Counter("modstream_review_routed_total", "Posts routed to human review, by reason", ["reason"])
MEDIA = Counter("modstream_media_fetch_total", "Media fetches by status", ["status"])
DEDUPE_HITS = Counter("modstream_dedupe_hits_total", "Posts labelled from the dedupe cache without the model")
DECODE_SKIPPED = Counter(
    "modstream_media_decode_skipped_total",
    "Images not decoded: the dedupe cache's entry carried the decode's facts (stream/media_facts.py)",
)
DEVICE_PDQ_ON_HOST = Counter(
    "modstream_media_device_pdq_on_host_total",
    "JPEGs decoded on the device whose banks' PDQ was taken on the host: no device hash came with "
    "their result (a dedupe entry written without one, a device hash that failed)",
)
DEVICE_DECODED = Counter(
    "modstream_media_device_decoded_total",
    "JPEGs handed to the classifier undecoded (--device-decode), by result: ok (decoded on the GPU, or on "
    "the host where the GPU refused it), failed (neither could: scored on the text alone)",
    ["result"],
)
DECODE_MEMO_HITS = Counter(
    "modstream_media_decode_memo_hits_total",
    "Images not decoded again: an earlier post of the same bytes in this process answered (stream/decode_memo.py)",
)
DEPENDENCY_ERRORS = Counter(
    "modstream_dependency_errors_total", "Failed calls to Kafka or Redis (retried or degraded)", ["dependency", "op"]
)
STAGE_SECONDS = Histogram(
    "modstream_stage_seconds", "Latency of one micro-batch per stage", ["stage"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "modstream_batch_size", "Posts per batch", ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
PRODUCE_TO_LABEL = Histogram(
    "modstream_produce_to_label_seconds",
    "From the post's created_at to its label acknowledged by the broker (posts carrying created_at)",
    # Steps of at most 1.5x past a minute: p99 read 288 s for a 140 s maximum with a 120 -> 300 jump.
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600, 900),
)
CARD_F1 = Gauge(
    "modstream_model_card_macro_f1",
    "Validation macro-F1 per task from the serving model's card (what live quality is held against)",
    ["model_version", "task"],
)
AUDIT_SAMPLED = Counter(
    "modstream_audit_sampled_total",
    "Model-labelled posts sent to review as blind audit items, by whether routing picked them too "
    "(stream/audit_sampling.py)",
    ["routed"],
)
EVIDENCE = Counter(
    "modstream_evidence_writes_total",
    "Scored media bytes of review items written to the evidence store, by outcome (stored, present, failed)",
    ["outcome"],
)
# -- verdict banks (stream/banks, stream/bank_stage.py) ------------------------------------
BANK_MATCHES = Counter(
    "modstream_bank_matches_total",
    "Posts whose image matched a verdict bank, by bank (violating, benign) and how (exact, pdq)",
    ["bank", "kind"],
)
BANK_HITS = Counter(
    "modstream_bank_hits_total",
    "Bank matches per bank and task (each task the matched entry's verdict covers)",
    ["bank", "task"],
)
BANK_DISTANCE = Histogram(
    "modstream_bank_match_distance_bits",
    "PDQ Hamming distance of bank matches, by bank (0: exact bytes or an identical hash)",
    ["bank"],
    buckets=(0, 2, 4, 8, 12, 16, 20, 24, 28, 31, 36, 40, 48),
)
BANK_ENTRIES = Gauge("modstream_bank_entries", "Entries in this process's verdict banks", ["bank"])
BANK_VERSION = Gauge("modstream_bank_version", "Bank updates this process has applied (its bank version)")
BANK_UPDATES = Counter(
    "modstream_bank_updates_total",
    "Records read from the bank-updates topic, by outcome (applied, refused)",
    ["outcome"],
)
BANK_KEPT_FROM_REVIEW = Counter(
    "modstream_bank_benign_kept_from_review_total",
    "Posts the model would have routed for review that a benign-bank match kept out of the queue",
)
BANK_LOADED = Gauge("modstream_bank_loaded", "1 once this process has read the bank-updates topic to its end")

SEND_BLOCKED = Gauge(
    "modstream_worker_send_blocked",
    "1 while the worker resends records the broker has not acknowledged (it consumes nothing meanwhile)",
    ["topic"],
)

# Every series whose labels are known up front exists from the start at 0: a series born at 1
# is invisible to increase() and rate(), so the first dead letter after a start fired nothing.
# lost: not even a 1 KiB dead letter could be written (a broker whose record limit is tiny).
POST_OUTCOMES = ("auto", "review", "bank_match", "dead_letter", "lost")
# Dead-letter reasons as a closed set per stage (the free text is on the dead letter itself).
DEAD_LETTER_REASONS: dict[str, tuple[str, ...]] = {
    "parse": ("record", "v", "id", "text", "image_urls", "author", "created_at", "internal", "other"),
    "classify": ("InferenceTimeout", "ReplicaFailed", "internal", "other"),
    "sink": ("too_large", "other"),
}
DEPENDENCY_OPS = (
    ("kafka", "send"),
    ("kafka", "consumer_lag"),
    ("kafka", "bank_updates"),
    ("redis", "dedupe_get"),
    ("redis", "dedupe_put"),
)
OUTPUT_TOPICS = ("labels", "review", "dlq")
EVIDENCE_OUTCOMES = ("stored", "present", "failed")
BANKS = ("violating", "benign")  # stream.banks.bank.BANKS (not imported: this module loads first)


def dead_letter_reason(stage: str, reason: str) -> str:
    """The bounded metric label of a dead letter's free-text reason ("field: why" at parse,
    the exception's repr at classify, "internal error: ..." anywhere)."""
    head = reason.split(":", 1)[0].split("(", 1)[0].split("[", 1)[0].strip()
    if head == "internal error":
        head = "internal"
    known = DEAD_LETTER_REASONS.get(stage, ())
    return head if head in known else "other"


def _create_known_series() -> None:
    for outcome in POST_OUTCOMES:
        POSTS.labels(outcome)
    for stage, reasons in DEAD_LETTER_REASONS.items():
        for reason in reasons:
            DLQ.labels(stage, reason)
    for dependency, op in DEPENDENCY_OPS:
        DEPENDENCY_ERRORS.labels(dependency, op)
    for topic in OUTPUT_TOPICS:
        SEND_BLOCKED.labels(topic).set(0)
    for outcome in EVIDENCE_OUTCOMES:
        EVIDENCE.labels(outcome)
    for bank in BANKS:
        BANK_ENTRIES.labels(bank).set(0)
        BANK_DISTANCE.labels(bank)
        for kind in ("exact", "pdq"):
            BANK_MATCHES.labels(bank, kind)
    for outcome in ("applied", "refused"):
        BANK_UPDATES.labels(outcome)
    for routed in ("true", "false"):
        AUDIT_SAMPLED.labels(routed)


def create_version_series(version: str, tasks: Sequence[str], media_statuses: Sequence[str] = ()) -> None:
    """The series of a model version at 0, once it serves: the review-share and label-drift
    alerts compare shares, and a share whose first review label started its series sees no jump."""
    for route in ("auto", "review", "bank_match"):
        LABELS.labels(version, route)
    for task in tasks:
        for decision in ("positive", "negative"):
            TASK_DECISIONS.labels(version, task, decision)
        for bank in BANKS:
            BANK_HITS.labels(bank, task)
    INFERENCE_SUCCESS.labels(version)
    INFERENCE_FAILURE.labels(version)
    for status in media_statuses:
        MEDIA.labels(status)


# -- inference (Triton-style) -------------------------------------------------------------
INFERENCE_SUCCESS = Counter(
    "modstream_inference_request_success_total", "Posts the model scored, by model version", ["model_version"]
)
INFERENCE_FAILURE = Counter(
    "modstream_inference_request_failure_total",
    "Posts the model failed to score (error or timeout), by the version serving then",
    ["model_version"],
)
INFERENCE_COUNT = Counter(
    "modstream_inference_count_total", "Posts inferred on a device (sum of device batch sizes)", ["model_version"]
)
EXEC_COUNT = Counter("modstream_inference_exec_count_total", "Device batches executed", ["model_version"])
INFERENCE_REQUEST_SECONDS = Histogram(
    "modstream_inference_request_seconds",
    "Per post: from asking the device pool to the answer (queue + preparation + compute)",
    ["model_version"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_COMPUTE_SECONDS = Histogram(
    "modstream_inference_compute_seconds",
    "Per device batch: the model's forward pass and the copy back",
    ["model_version"],
    buckets=LATENCY_BUCKETS,
)
ITM_SCORE = Histogram(
    "modstream_itm_match",
    "ITM match probability of classified image posts",
    buckets=tuple(i / 10 for i in range(1, 11)),
)

# -- state ----------------------------------------------------------------------------------
MODEL = Info("modstream_model", "The model version the worker serves (value 1, version in the label)")
ITM_ROUTING = Gauge("modstream_itm_routing_enabled", "1 when ITM routing is trusted for the serving model")
READY = Gauge("modstream_worker_ready", "1 once the model is loaded and warmed up")
CONSUMER_LAG = Gauge(
    "modstream_consumer_lag",
    "Messages past the group's committed offset, per partition (broker end offset - committed offset)",
    ["group", "topic", "partition"],
)
CONSUMER_TOPIC_LAG = Gauge(
    "modstream_consumer_topic_lag", "Consumer lag summed over the topic's partitions", ["group", "topic"]
)


_create_known_series()


class InstrumentedClassifier:
    """Wraps the device pool: per-post request latency and success/failure by model version."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def version(self) -> str:
        return str(self.inner.version)

    async def predict(self, texts: Sequence[str], images: Sequence[Any]) -> list[Any]:
        started = time.perf_counter()
        results: list[Any] = await self.inner.predict(texts, images)
        elapsed = time.perf_counter() - started
        for result in results:
            if isinstance(result, BaseException):
                INFERENCE_FAILURE.labels(self.version).inc()
            else:
                INFERENCE_SUCCESS.labels(result.model_version).inc()
                INFERENCE_REQUEST_SECONDS.labels(result.model_version).observe(elapsed)
        return results


def observe_device_batch(version: str, size: int, seconds: float) -> None:
    INFERENCE_COUNT.labels(version).inc(size)
    EXEC_COUNT.labels(version).inc()
    INFERENCE_COMPUTE_SECONDS.labels(version).observe(seconds)
    BATCH_SIZE.labels("device").observe(size)


class GpuCollector(Collector):
    """GPU memory and utilisation per visible CUDA device, read at scrape time. Registered only
    when CUDA is available, so a CPU worker exports none of these. Utilisation needs NVML
    (`pynvml`); without it that gauge is absent."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        allocated = GaugeMetricFamily(
            "modstream_gpu_memory_allocated_bytes", "Memory held by tensors on the GPU", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "modstream_gpu_memory_reserved_bytes", "Memory reserved by torch's caching allocator", labels=["device"]
        )
        utilisation = GaugeMetricFamily(
            "modstream_gpu_utilization_ratio", "Share of the last sample period the GPU was busy", labels=["device"]
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            allocated.add_metric([device], torch.cuda.memory_allocated(index))
            reserved.add_metric([device], torch.cuda.memory_reserved(index))
            with contextlib.suppress(Exception):  # no NVML (pynvml) here: leave the gauge out, don't lie
                utilisation.add_metric([device], torch.cuda.utilization(index) / 100)
        yield allocated
        yield reserved
        if utilisation.samples:
            yield utilisation


_gpu_registered = False


def register_gpu_collector(devices: Sequence[Any]) -> bool:
    """Export GPU gauges when the worker runs on at least one CUDA device (once per process)."""
    global _gpu_registered
    if _gpu_registered or not any(getattr(d, "type", None) == "cuda" for d in devices):
        return _gpu_registered
    REGISTRY.register(GpuCollector())
    _gpu_registered = True
    return True
