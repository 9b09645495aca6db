"""`modstream purge --post ID` and `modstream retention` (review/retention.py does the work;
argparse only here). Both write their audit record first and do nothing when it fails."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from modstream.options import DEFAULT_HOME, add_evidence, add_kafka, add_redis

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """'30d', '12h', '90m', '3600s' or seconds, as seconds (argparse type)."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration such as 30d, 12h, 90m or 3600")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _audit(args: argparse.Namespace, action: str, subject: str, **detail: Any) -> None:
    from review.audit import record_from_cli

    record_from_cli(args.bootstrap, action, subject, topic=args.audit_topic, timeout_s=args.audit_timeout, **detail)


def _queue(redis_url: str) -> Any:
    import redis.asyncio as aioredis

    from review.queue import ReviewQueue

    return ReviewQueue(aioredis.Redis.from_url(redis_url, socket_timeout=10.0, socket_connect_timeout=5.0))


def cmd_purge(args: argparse.Namespace) -> int:
    import asyncio

    from modstream.records import MAX_ID, has_control
    from review.audit import AuditUnavailable
    from review.decisions import DecisionProducer, KafkaUnavailable
    from review.retention import (
        PurgeReport,
        dataset_media_hashes,
        line_media_hash,
        purge_redis,
        read_manifest_lines,
    )
    from stream.evidence import EvidenceError, check_digest, open_store

    post_id = args.post
    if not post_id.strip() or len(post_id) > MAX_ID or has_control(post_id):
        print(f"error: --post must be a post id (1-{MAX_ID} characters, no control characters)", file=sys.stderr)
        return 2
    try:
        extra = {check_digest(h) for h in args.media_hash}
    except ValueError as exc:
        print(f"error: --media-hash: {exc}", file=sys.stderr)
        return 2
    try:
        _audit(args, "post_purged", post_id, media_hashes=sorted(extra))
    except AuditUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> PurgeReport:
        report = PurgeReport(post_id)
        queue = _queue(args.redis)
        store = open_store(args.evidence)
        producer = DecisionProducer(args.bootstrap)
        try:
            lines = read_manifest_lines(Path(args.dataset) / "manifest.jsonl")
            hashes, shared = await purge_redis(queue, post_id, report)
            hashes |= extra | dataset_media_hashes(lines, post_id)
            shared |= {h for line in lines if line.get("id") != post_id and (h := line_media_hash(line))}
            for digest in sorted(hashes):
                if digest in shared and digest not in extra:  # --media-hash says: delete it anyway
                    report.blobs_shared.append(digest)
                elif await store.delete(digest):
                    report.blobs_deleted.append(digest)
            await producer.send_tombstone(args.reviewed_topic, post_id)
            report.tombstone_sent = True
        finally:
            await producer.close()
            store.close()
            await queue.client.aclose()
        return report

    try:
        report = asyncio.run(run())
    except (KafkaUnavailable, EvidenceError, OSError) as exc:
        print(f"error: purge of {post_id} incomplete: {exc}; run it again (every step is idempotent)", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json(), indent=2))
    print(
        f"purged {post_id}: the dataset sink removes its reviewed line and image when it reads the tombstone",
        file=sys.stderr,
    )
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    import asyncio

    from review.audit import AuditUnavailable
    from review.retention import RetentionReport, apply_retention
    from stream.evidence import EvidenceError, open_store

    evidence_age = args.evidence_max_age or args.max_age
    try:
        _audit(args, "retention_applied", "retention", max_age_s=args.max_age, evidence_max_age_s=evidence_age)
    except AuditUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> RetentionReport:
        queue = _queue(args.redis)
        store = None if args.keep_evidence else open_store(args.evidence)
        try:
            return await apply_retention(queue, store, max_age_s=args.max_age, evidence_max_age_s=evidence_age)
        finally:
            if store is not None:
                store.close()
            await queue.client.aclose()

    try:
        report = asyncio.run(run())
    except (EvidenceError, OSError) as exc:
        print(f"error: retention incomplete: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json(), indent=2))
    return 0


def _audit_options(p: argparse.ArgumentParser) -> None:
    add_kafka(p)
    p.add_argument("--audit-topic", default="audit", help="append-only topic of people's acts (default audit)")
    p.add_argument("--audit-timeout", type=float, default=15.0, help="seconds to wait for the audit record")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("purge", help="erase one post's text and media from Redis, the evidence store and the dataset")
    p.add_argument("--post", required=True, help="the post id to erase")
    p.add_argument(
        "--media-hash",
        action="append",
        default=[],
        help="also delete this evidence blob (sha256; repeatable), even when other posts carry the same bytes",
    )
    p.add_argument("--dataset", default=str(DEFAULT_HOME / "reviewed"), help="reviewed dataset folder (read only)")
    p.add_argument("--reviewed-topic", default="reviewed", help="topic the dataset sink reads (gets the tombstone)")
    add_redis(p, "Redis URL of the review queue")
    add_evidence(p)
    _audit_options(p)
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("retention", help="trim the review streams and expire evidence by age (run from cron)")
    p.add_argument("--max-age", type=duration, default=duration("30d"), help="keep finished items this long (30d)")
    p.add_argument("--evidence-max-age", type=duration, help="keep evidence blobs this long (default: --max-age)")
    p.add_argument("--keep-evidence", action="store_true", help="trim the streams only")
    add_redis(p, "Redis URL of the review queue")
    add_evidence(p)
    _audit_options(p)
    p.set_defaults(func=cmd_retention)
