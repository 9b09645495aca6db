"""Review sink: copies the `review` topic into the Redis review stream, once per post.

The topic is the source of truth (the worker only writes there). Each batch is parsed,
malformed records go to `posts.dlq` (stage `review_sink`), the rest are written with the
ENQUEUE_ONCE script (SET NX on `modstream:reviewed-once:<post_id>` + XADD) in one
pipeline, and the loop in review/kafka_sink.py commits the offsets only after Redis
accepted the whole batch. While Redis is down the batch is retried with backoff and the
group's offsets stay put, so kill -9 at any moment loses nothing, and the SET NX key makes
the redelivered batch add nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import RedisError

from modstream.records import MAX_ID, RecordError, ReviewItem, decode_json
from review import sink_metrics as metrics
from review.kafka_sink import (
    DeadLetters,
    Parsed,
    SinkRecord,
    SinkSettings,
    TransientError,
    known_fields,
    run_sink,
    split_batch,
)

log = logging.getLogger(__name__)

NAME = "review"
DLQ_STAGE = "review_sink"


class ReviewStore(Protocol):
    async def enqueue_review_many(self, items: Sequence[ReviewItem]) -> list[bool]: ...


def parse_review_item(raw: bytes | None) -> ReviewItem:
    """A `review` record to a ReviewItem, or RecordError naming the field. Checks the fields
    the Redis stream and the console rely on (ReviewItem.from_json checks only names)."""
    if raw is None:
        raise RecordError("record", "empty value (tombstone)")
    item = ReviewItem.from_json(known_fields(decode_json(raw), ReviewItem))
    if not isinstance(item.post_id, str) or not item.post_id.strip() or len(item.post_id) > MAX_ID:
        raise RecordError("post_id", f"must be a non-empty string of at most {MAX_ID} characters")
    if not isinstance(item.text, str):
        raise RecordError("text", "must be a string")
    if item.image_url is not None and not isinstance(item.image_url, str):
        raise RecordError("image_url", "must be a URL string or null")
    if not isinstance(item.reasons, list) or not all(isinstance(r, str) for r in item.reasons):
        raise RecordError("reasons", "must be a list of strings")
    if not isinstance(item.label, dict):
        raise RecordError("label", "must be the Label record's JSON object")
    if not isinstance(item.tasks, dict) or not all(
        isinstance(labels, list) and all(isinstance(x, str) for x in labels) for labels in item.tasks.values()
    ):
        raise RecordError("tasks", "must map each task to its list of labels")
    return item


def parse_batch(records: Sequence[SinkRecord]) -> Parsed[ReviewItem]:
    """Split a batch into review items (in topic order) and dead letters."""
    return split_batch(records, parse_review_item, DLQ_STAGE, "review sink")


class ReviewSink:
    """The stage: dead letters to Kafka, review items to Redis; raises unless both worked."""

    name = NAME

    def __init__(self, store: ReviewStore, dead_letters: DeadLetters | Any) -> None:
        self.store = store
        self.dead_letters = dead_letters

    async def apply(self, records: Sequence[SinkRecord]) -> None:
        parsed = parse_batch(records)
        await self.dead_letters.send(parsed.dead, parsed.reasons)
        # A record redelivered after a failed pipeline was partly written answers False
        # ("already queued"), so the counts below are per attempt that succeeded.
        try:
            added = await self.store.enqueue_review_many(parsed.good)
        except (RedisError, OSError, TimeoutError) as exc:
            raise TransientError("redis", "review_xadd", exc) from exc
        queued = sum(added)
        metrics.RECORDS.labels(NAME, "queued").inc(queued)
        metrics.RECORDS.labels(NAME, "already_queued").inc(len(added) - queued)
        metrics.RECORDS.labels(NAME, "dead_letter").inc(len(parsed.dead))


async def run_review_sink(settings: SinkSettings, redis_url: str) -> int:
    from stream.redis_store import RedisStore

    store = RedisStore(redis_url)

    async def build(dead_letters: DeadLetters) -> ReviewSink:
        return ReviewSink(store, dead_letters)

    try:
        return await run_sink(settings, build, name=NAME, dlq_stage=DLQ_STAGE)
    finally:
        await store.close()
