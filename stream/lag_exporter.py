"""`modstream lag-exporter`: every consumer group's lag, read from the broker by a process
that is none of the consumers.

The worker and the sinks export the lag of their own group, so when one is frozen (SIGSTOP,
a GC pause, a hung await) or dead its series disappear with it, exactly when they matter:
an operator saw Kafka's group tool report a lag of 340 and growing while Prometheus had
nothing. This role keeps measuring, and also exports the committed offsets summed per topic,
which stop changing when a group makes no progress (`ModstreamConsumerStalled`).

It is the project's own LagMonitor rather than a separate kafka_exporter binary: the same
code the roles already run and test, one image, and no Go binary to fetch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from modstream.options import add_kafka
from stream.lag import LagMonitor

log = logging.getLogger(__name__)

# The groups of a default deployment and the topics each consumes.
DEFAULT_GROUPS = (
    "modstream-worker=posts",
    "modstream-review-sink=review",
    "modstream-dataset-sink=reviewed",
)


class ExporterMetrics:
    """The exporter's own registry: the lag gauges under the names the worker and the sinks
    use (so one alert rule covers every source, aggregated with max), plus progress."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lag = Gauge(
            "modstream_consumer_lag",
            "Messages past the group's committed offset, per partition, read from the broker",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.topic_lag = Gauge(
            "modstream_consumer_topic_lag",
            "Consumer lag summed over the topic's partitions",
            ["group", "topic"],
            registry=r,
        )
        self.committed = Gauge(
            "modstream_consumer_committed_offset",
            "The group's committed offsets summed over the topic's partitions (flat: no progress)",
            ["group", "topic"],
            registry=r,
        )
        self.measured_at = Gauge(
            "modstream_lag_exporter_last_success_timestamp_seconds",
            "When the group's lag was last measured completely (Unix time)",
            ["group"],
            registry=r,
        )
        self.errors = Counter(
            "modstream_dependency_errors_total",
            "Failed calls to Kafka (retried)",
            ["dependency", "op"],
            registry=r,
        )
        self.errors.labels("kafka", "consumer_lag")  # at 0 from the start


def parse_group(text: str) -> tuple[str, list[str]]:
    """GROUP=TOPIC[,TOPIC...] -> (group, topics)."""
    group, sep, topics = text.partition("=")
    names = [t.strip() for t in topics.split(",") if t.strip()]
    if not sep or not group.strip() or not names:
        raise argparse.ArgumentTypeError(f"expected GROUP=TOPIC[,TOPIC...], not {text!r}")
    return group.strip(), names


def monitors(
    bootstrap: str, groups: Sequence[tuple[str, list[str]]], m: ExporterMetrics, interval_s: float
) -> list[LagMonitor]:
    return [
        LagMonitor(
            bootstrap,
            group,
            topics,
            m.lag,
            m.topic_lag,
            m.errors,
            interval_s=interval_s,
            committed=m.committed,
            measured_at=m.measured_at,
        )
        for group, topics in groups
    ]


async def run_exporter(
    bootstrap: str, groups: Sequence[tuple[str, list[str]]], m: ExporterMetrics, interval_s: float
) -> None:
    await asyncio.gather(*(monitor.run() for monitor in monitors(bootstrap, groups, m, interval_s)))


def cmd_lag_exporter(args: argparse.Namespace) -> int:
    groups = args.group or [parse_group(g) for g in DEFAULT_GROUPS]
    m = ExporterMetrics()
    server: Any = start_http_server(args.metrics_port, addr=args.metrics_host, registry=m.registry)
    names = ", ".join(f"{g} on {'/'.join(t)}" for g, t in groups)
    log.warning("lag exporter on %s:%d measuring %s", args.metrics_host, args.metrics_port, names)
    try:
        asyncio.run(run_exporter(args.bootstrap, groups, m, args.interval))
    finally:
        if isinstance(server, tuple):  # prometheus_client >= 0.17 returns (server, thread)
            server[0].shutdown()
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "lag-exporter",
        help="export every consumer group's lag from the broker (keeps going when a consumer is frozen or dead)",
    )
    add_kafka(p)
    p.add_argument(
        "--group",
        action="append",
        type=parse_group,
        metavar="GROUP=TOPIC[,TOPIC]",
        help=f"a consumer group and the topics it reads (repeatable; default: {' '.join(DEFAULT_GROUPS)})",
    )
    p.add_argument("--interval", type=float, default=5.0, help="seconds between two measurements")
    p.add_argument("--metrics-port", type=int, default=6070, help="port of /metrics")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on (0.0.0.0 in a container)")
    p.set_defaults(func=cmd_lag_exporter)
