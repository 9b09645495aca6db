"""`modstream review-sink` and `modstream dataset-sink` (argparse only here; heavy imports
inside the handlers, so `modstream --help` stays fast)."""

from __future__ import annotations

import argparse
from typing import Any

from modstream.options import add_evidence, add_kafka, add_redis


def _settings(args: argparse.Namespace) -> Any:
    from review.kafka_sink import SinkSettings

    return SinkSettings(
        bootstrap=args.bootstrap,
        topic=args.topic,
        group=args.group,
        dlq_topic=args.dlq_topic,
        max_records=args.max_records,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def cmd_review_sink(args: argparse.Namespace) -> int:
    import asyncio

    from review.review_sink import run_review_sink

    return asyncio.run(run_review_sink(_settings(args), args.redis))


def cmd_dataset_sink(args: argparse.Namespace) -> int:
    import asyncio
    import sys
    from pathlib import Path

    from review.dataset import DatasetError
    from review.dataset_sink import run_dataset_sink

    try:
        return asyncio.run(run_dataset_sink(_settings(args), Path(args.out), evidence=args.evidence))
    except DatasetError as exc:
        print(f"modstream dataset-sink: {exc}", file=sys.stderr)
        return 2


def _add_sink_options(p: argparse.ArgumentParser, topic: str, group: str, metrics_port: int) -> None:
    add_kafka(p)
    p.add_argument("--topic", default=topic, help=f"topic to consume (default {topic})")
    p.add_argument("--group", default=group, help=f"consumer group (default {group})")
    p.add_argument("--dlq-topic", default="posts.dlq", help="dead-letter topic for malformed records")
    p.add_argument("--max-records", type=int, default=500, help="records per batch (one commit each)")
    p.add_argument("--metrics-port", type=int, default=metrics_port, help="port of /metrics (0: none)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on")


def add_parsers(sub: Any) -> None:
    """Register this role's subcommands on the `modstream` parser."""
    p = sub.add_parser("review-sink", help="copy the review topic into the Redis review stream, once per post")
    _add_sink_options(p, "review", "modstream-review-sink", 6067)
    add_redis(p, "Redis URL of the review stream")
    p.set_defaults(func=cmd_review_sink)

    p = sub.add_parser("dataset-sink", help="turn reviewers' decisions (reviewed topic) into a labelled manifest")
    _add_sink_options(p, "reviewed", "modstream-dataset-sink", 6068)
    p.add_argument("--out", default="var/reviewed", help="dataset folder (manifest.jsonl + media/)")
    add_evidence(p, "where the worker keeps the media it scored (training images come only from there)")
    p.set_defaults(func=cmd_dataset_sink)
