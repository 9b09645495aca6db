"""`modstream dlq replay`: send dead-lettered posts back to `posts` once their cause is fixed.

A DeadLetter's `raw` is the post exactly as it arrived (as text), so a replay re-sends it
unchanged, keyed by its original post id: the worker labels it as if it came the first time.
A dead letter of an oversized input keeps only a prefix (`raw_truncated`); it is never
replayed and shows in the summary as "not selected ... by truncated".
Repeating a replay is safe in the sense the sinks define (see docs/operations.md): the
label topic is keyed by post id (one label per post after compaction, and a dedupe-cache hit
gives the same scores) and the review stream enqueues a post once (ENQUEUE_ONCE in Redis).

The DLQ is read from the beginning with no consumer group (nothing is committed, so a dry
run and the real run see the same records), up to the end offsets taken when the replay
starts: posts that dead-letter again while it runs are not picked up in a loop.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modstream.kafka_auth import client_options
from modstream.options import add_kafka
from modstream.records import POST_STAGES, parse_iso

STAGES = POST_STAGES  # the sinks' dead letters hold review items or decisions, never posts
REPLAY_HEADER = "modstream-replayed-from"


def parse_time(text: str) -> datetime:
    """An ISO 8601 time for --since/--until; without a zone it is UTC."""
    try:
        return parse_iso(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-28T08:00:00Z)") from exc


def parse_regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({exc})") from exc


@dataclass(frozen=True)
class Selection:
    """Which dead letters to replay; every given criterion must hold."""

    stages: frozenset[str] = frozenset()
    reason_contains: str | None = None
    reason_regex: re.Pattern[str] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def why_not(self, letter: dict[str, Any]) -> str | None:
        """None when `letter` (a DeadLetter's JSON) is selected, else the criterion it misses."""
        if letter.get("raw_truncated"):
            # Only a prefix of an oversized input was kept: re-sending it would be another post.
            return "truncated"
        if letter.get("stage") not in (self.stages or STAGES):
            return "stage"
        reason = str(letter.get("reason", ""))
        if self.reason_contains is not None and self.reason_contains.lower() not in reason.lower():
            return "reason"
        if self.reason_regex is not None and not self.reason_regex.search(reason):
            return "reason"
        if self.since is not None or self.until is not None:
            try:
                failed = parse_time(str(letter.get("failed_at")))
            except argparse.ArgumentTypeError:
                return "failed_at unreadable"
            if self.since is not None and failed < self.since:
                return "time"
            if self.until is not None and failed >= self.until:
                return "time"
        return None


@dataclass
class Candidate:
    partition: int
    offset: int
    post_id: str | None
    stage: str
    reason: str
    failed_at: str
    raw: str

    @property
    def where(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass
class ReplayReport:
    scanned: int = 0
    unreadable: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    superseded: int = 0  # older dead letters of a post that dead-lettered again later
    selected: list[Candidate] = field(default_factory=list)
    sent: int = 0

    def summary(self, dry_run: bool, target: str) -> str:
        skipped = ", ".join(f"{n} by {why}" for why, n in sorted(self.skipped.items())) or "none"
        verb = "would send" if dry_run else "sent"
        count = len(self.selected) if dry_run else self.sent
        return (
            f"{verb} {count} posts to {target}; read {self.scanned} dead letters: not selected {skipped}; "
            f"{self.superseded} older copies of the same post; {self.unreadable} unreadable"
        )


def _candidate(partition: int, offset: int, value: bytes | None) -> Candidate | None:
    try:
        obj = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("raw"), str):
        return None
    post_id = obj.get("post_id")
    return Candidate(
        partition,
        offset,
        post_id if isinstance(post_id, str) and post_id else None,
        str(obj.get("stage", "")),
        str(obj.get("reason", "")),
        str(obj.get("failed_at", "")),
        obj["raw"],
    )


async def read_dead_letters(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[tuple[Candidate | None, Any]]:
    """Every record of `topic` from the beginning up to its end offsets now: (candidate or
    None when unreadable, the raw JSON object or None)."""
    from aiokafka import AIOKafkaConsumer

    from stream.topic_partitions import assign_all

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **client_options(),
    )
    out: list[tuple[Candidate | None, Any]] = []
    try:
        await consumer.start()
        tps = await assign_all(consumer, topic, bootstrap)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took longer than {timeout_s:g} s")
            batches = await consumer.getmany(*tps, timeout_ms=500, max_records=5000)
            for tp, messages in batches.items():
                for m in messages:
                    if m.offset < ends[tp]:
                        out.append((_candidate(tp.partition, m.offset, m.value), m.value))
    finally:
        await consumer.stop()
    return out


def select(records: Sequence[tuple[Candidate | None, Any]], selection: Selection) -> ReplayReport:
    """Selected candidates, one per post id (its latest dead letter), in DLQ order."""
    report = ReplayReport(scanned=len(records))
    latest: dict[str, Candidate] = {}
    chosen: list[Candidate] = []
    for candidate, value in records:
        if candidate is None:
            report.unreadable += 1
            continue
        why = selection.why_not(json.loads(value))
        if why is not None:
            report.skipped[why] = report.skipped.get(why, 0) + 1
            continue
        if candidate.post_id is None:
            chosen.append(candidate)
            continue
        if candidate.post_id in latest:
            report.superseded += 1
        latest[candidate.post_id] = candidate
    chosen.extend(latest.values())
    report.selected = sorted(chosen, key=lambda c: (c.failed_at, c.partition, c.offset))
    return report


async def replay(
    bootstrap: str,
    selection: Selection,
    *,
    dlq_topic: str = "posts.dlq",
    target: str = "posts",
    dry_run: bool = False,
    limit: int = 0,
) -> ReplayReport:
    report = select(await read_dead_letters(bootstrap, dlq_topic), selection)
    if limit > 0:
        report.selected = report.selected[:limit]
    if dry_run or not report.selected:
        return report
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **client_options())
    try:  # stop() also when start() fails, or aiokafka warns of an unclosed producer
        await producer.start()
        futures = []
        for c in report.selected:
            headers = [(REPLAY_HEADER, f"{dlq_topic}:{c.where}".encode())]
            key = c.post_id.encode() if c.post_id else None
            futures.append(await producer.send(target, value=c.raw.encode(), key=key, headers=headers))
        for future in futures:
            await future
            report.sent += 1
    finally:
        await producer.stop()
    return report


def cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    if args.since and args.until and args.since >= args.until:
        print("modstream dlq replay: error: --since must be before --until", file=sys.stderr)
        return 2
    selection = Selection(
        stages=frozenset(args.stage or ()),
        reason_contains=args.reason,
        reason_regex=args.reason_regex,
        since=args.since,
        until=args.until,
    )
    report = asyncio.run(
        replay(
            args.bootstrap, selection, dlq_topic=args.dlq_topic, target=args.to, dry_run=args.dry_run, limit=args.limit
        )
    )
    if args.dry_run:
        for c in report.selected:
            print(f"{c.where}\t{c.post_id or '-'}\t{c.stage}\t{c.failed_at}\t{c.reason[:120]}")
    print(report.summary(args.dry_run, args.to), file=sys.stderr)
    return 0


def add_parsers(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="inspect and replay the dead-letter topic")
    actions = dlq.add_subparsers(dest="dlq_action", required=True)
    p = actions.add_parser(
        "replay",
        help="re-send dead-lettered posts to the posts topic with their original ids",
        description="Re-send dead-lettered posts (their `raw` text, keyed by post id) once the cause is fixed. "
        "Criteria combine with AND; with none, every dead letter is replayed. A post that dead-lettered "
        "more than once is sent once.",
    )
    add_kafka(p)
    p.add_argument("--dlq-topic", default="posts.dlq", help="dead-letter topic to read (default posts.dlq)")
    p.add_argument("--to", default="posts", help="topic to send to (default posts)")
    p.add_argument("--stage", action="append", choices=STAGES, help="only this stage (repeatable)")
    p.add_argument("--reason", metavar="TEXT", help="only reasons containing TEXT (case-insensitive)")
    p.add_argument("--reason-regex", metavar="REGEX", type=parse_regex, help="only reasons matching REGEX")
    p.add_argument("--since", type=parse_time, help="only dead letters with failed_at >= this ISO time")
    p.add_argument("--until", type=parse_time, help="only dead letters with failed_at < this ISO time")
    p.add_argument("--limit", type=int, default=0, help="send at most this many (0: all)")
    p.add_argument("--dry-run", action="store_true", help="list what would be sent (tab-separated), send nothing")
    p.set_defaults(func=cmd_replay)
