"""`modstream labels`: read the `labels` topic as a person would, without a Kafka client.

One line per label (post id, route, model version, each task's decision and score, reasons,
media status), filtered by route, model version or post-id prefix; from the beginning or only
new ones; stops at the end of the topic unless `--follow`. `--json` prints the records as
they are. No consumer group: reading moves no one's offsets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from modstream.kafka_auth import client_options
from modstream.records import RecordError, decode_json


@dataclass(frozen=True)
class LabelFilter:
    route: str | None = None
    version: str | None = None
    prefix: str | None = None

    def __call__(self, label: dict[str, Any]) -> bool:
        return (
            (self.route is None or label.get("route") == self.route)
            and (self.version is None or label.get("model_version") == self.version)
            and (self.prefix is None or str(label.get("post_id", "")).startswith(self.prefix))
        )


def summary_line(label: dict[str, Any]) -> str:
    """One readable line of a Label record."""
    tasks = []
    for task, value in sorted((label.get("labels") or {}).items()):
        if isinstance(value, dict):
            flag = "+" if value.get("decision") else "-"
            score = value.get("score")
            tasks.append(f"{task}{flag}{score:.2f}" if isinstance(score, (int, float)) else f"{task}{flag}")
    itm = label.get("itm_match")
    media = (label.get("media") or {}).get("status", "?")
    parts = [
        str(label.get("post_id", "?")),
        str(label.get("route", "?")),
        str(label.get("model_version", "?")),
        " ".join(tasks),
        f"itm={itm:.2f}" if isinstance(itm, (int, float)) else "itm=-",
        f"media={media}",
    ]
    reasons = label.get("reasons") or []
    if reasons:
        parts.append("reasons=" + ",".join(map(str, reasons)))
    return "  ".join(parts)


async def read_labels(
    bootstrap: str,
    topic: str,
    keep: Callable[[dict[str, Any]], bool],
    emit: Callable[[dict[str, Any], bytes], None],
    *,
    from_beginning: bool,
    follow: bool,
    limit: int | None,
) -> int:
    """Emit matching labels; returns how many. Without `follow`, stops at the end offsets as
    they were when it started."""
    from aiokafka import AIOKafkaConsumer

    from stream.topic_partitions import assign_all

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **client_options()
    )
    shown = 0
    try:
        await consumer.start()
        tps = await assign_all(consumer, topic, bootstrap)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        ends = await consumer.end_offsets(tps)
        while True:
            if not follow and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                return shown
            batches = await consumer.getmany(*tps, timeout_ms=500, max_records=1000)
            for tp, messages in batches.items():
                for m in messages:
                    if not follow and m.offset >= ends[tp]:
                        continue
                    try:
                        label = decode_json(m.value or b"")
                    except RecordError:
                        continue
                    if isinstance(label, dict) and keep(label):
                        emit(label, m.value or b"")
                        shown += 1
                        if limit is not None and shown >= limit:
                            return shown
    finally:
        await consumer.stop()


def cmd_labels(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    keep = LabelFilter(args.route, args.version, args.post_prefix)

    def emit(label: dict[str, Any], raw: bytes) -> None:
        out.write((json.dumps(label, ensure_ascii=False) if args.json else summary_line(label)) + "\n")
        out.flush()

    try:
        asyncio.run(
            read_labels(
                args.bootstrap,
                args.topic,
                keep,
                emit,
                from_beginning=not args.new,
                follow=args.follow,
                limit=args.limit,
            )
        )
    except LookupError as exc:
        print(f"modstream labels: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
