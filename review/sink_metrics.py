"""Prometheus metrics of the two Kafka sinks (review sink, dataset sink).

They live in their own registry so a sink's /metrics shows the sink and nothing of the
worker (both packages can be imported in one process, e.g. in tests, without clashing).
Names shared with the worker (`modstream_dependency_errors_total`,
`modstream_dead_letters_total`, `modstream_media_fetch_total`, `modstream_consumer_lag`) keep their label sets, so one
alert rule covers every role.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

RECORDS = Counter(
    "modstream_sink_records_total",
    "Records a sink finished, by outcome (review: queued, already_queued, dead_letter; "
    "dataset: added, replaced, replayed, superseded, no_labels, held, dead_letter, erased, erase_absent)",
    ["sink", "outcome"],
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "modstream_sink_batch_seconds",
    "Time to apply one batch, retries included",
    ["sink"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
COMMITS = Counter(
    "modstream_sink_commits_total", "Offset commits after a batch was applied", ["sink"], registry=REGISTRY
)
LAG = Gauge(
    "modstream_sink_lag",
    "Records on the partition past the last committed offset (as of the last fetch)",
    ["sink", "partition"],
    registry=REGISTRY,
)
BLOCKED = Gauge(
    "modstream_sink_blocked",
    "1 while the sink retries a batch (a dependency is down): it neither commits nor advances",
    ["sink"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "modstream_consumer_lag",
    "Messages past the group's committed offset, per partition, read from the broker",
    ["group", "topic", "partition"],
    registry=REGISTRY,
)
CONSUMER_TOPIC_LAG = Gauge(
    "modstream_consumer_topic_lag",
    "Consumer lag summed over the topic's partitions",
    ["group", "topic"],
    registry=REGISTRY,
)
DEPENDENCY_ERRORS = Counter(
    "modstream_dependency_errors_total",
    "Failed calls to Kafka, Redis or the disk (retried)",
    ["dependency", "op"],
    registry=REGISTRY,
)
DLQ = Counter(
    "modstream_dead_letters_total", "Records sent to the dead-letter topic", ["stage", "reason"], registry=REGISTRY
)
LIVE = Counter(
    "modstream_live_outcomes_total",
    "Reviewers' verdicts against the model, per task (tp, fp, fn, tn), by the item's kind (audit: a blind "
    "random sample; routed: what routing picked) and model version; each post's first labelling decision",
    ["kind", "task", "model_version", "outcome"],
    registry=REGISTRY,
)
MEDIA = Counter(
    "modstream_dataset_media_total",
    "Decisions' images read from the evidence store for the manifest, by outcome",
    ["outcome"],
    registry=REGISTRY,
)


def serve(port: int, host: str = "127.0.0.1") -> tuple[Any, threading.Thread] | None:
    """Serve this registry at http://host:port/metrics (port 0: not at all)."""
    if not port:
        return None
    try:
        return start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise SystemExit(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}") from exc
