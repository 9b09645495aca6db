"""Prometheus metrics of the worker (served on its web port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

POSTS = Counter("modstream_posts_total", "Posts finished, by outcome (auto, review, dead_letter)", ["outcome"])
DLQ = Counter("modstream_dead_letters_total", "Posts sent to the dead-letter topic", ["stage", "reason"])
REVIEW = Counter("modstream_review_routed_total", "Posts routed to human review, by reason", ["reason"])
MEDIA = Counter("modstream_media_fetch_total", "Media fetches by status", ["status"])
DEDUPE_HITS = Counter("modstream_dedupe_hits_total", "Posts labelled from the dedupe cache without the model")
DEPENDENCY_ERRORS = Counter(
    "modstream_dependency_errors_total", "Failed calls to Kafka or Redis (retried or degraded)", ["dependency", "op"]
)
STAGE_SECONDS = Histogram(
    "modstream_stage_seconds",
    "Latency of one micro-batch per stage",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "modstream_batch_size", "Posts per batch", ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
INFERENCE_SECONDS = Histogram(
    "modstream_inference_seconds",
    "Model time per device batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ITM_SCORE = Histogram(
    "modstream_itm_match",
    "ITM match probability of classified image posts",
    buckets=tuple(i / 10 for i in range(1, 11)),
)
MODEL = Info("modstream_model", "The model version the worker serves")
ITM_ROUTING = Gauge("modstream_itm_routing_enabled", "1 when ITM routing is trusted for the serving model")
READY = Gauge("modstream_worker_ready", "1 once the model is loaded and warmed up")
