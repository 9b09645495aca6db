"""Dataset sink: reviewers' decisions (`reviewed` topic) -> the reviewed dataset folder.

Per batch: parse (malformed records go to `posts.dlq`, stage `dataset_sink`), plan with the
dataset rules (review/dataset.py: replays and older decisions are no-ops, skip/escalate-only
decisions never become lines), fetch the winners' images through the SSRF-guarded
MediaFetcher and save them as `media/<sha256>.png`, then write the manifest and fsync it;
the loop in review/kafka_sink.py commits the offsets only after that. An image that cannot
be fetched makes the example text-only with the error in `meta.media_error`: the decision
is kept. A disk failure is retried (nothing committed meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from modstream.records import MAX_ID, MAX_URL, RecordError, ReviewDecision, decode_json, parse_iso
from review import sink_metrics as metrics
from review.dataset import Plan, ReviewedDataset, manifest_line, plan_batch
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

NAME = "dataset"
DLQ_STAGE = "dataset_sink"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MediaSource(Protocol):
    """stream.media.MediaFetcher's `fetch` (tests pass a fake)."""

    async def fetch(self, url: str) -> Any: ...


def _text(value: Any, name: str, *, max_len: int, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > max_len:
        raise RecordError(name, f"must be a non-empty string of at most {max_len} characters")


def parse_decision(raw: bytes | None) -> ReviewDecision:
    """A `reviewed` record to a ReviewDecision, or RecordError naming the field. Checks what
    the dataset relies on: ids, a parseable decided_at (it orders decisions), label strings,
    and a media hash that is a sha256 (it names a file)."""
    if raw is None:
        raise RecordError("record", "empty value (tombstone)")
    d = ReviewDecision.from_json(known_fields(decode_json(raw), ReviewDecision))
    _text(d.decision_id, "decision_id", max_len=MAX_ID)
    _text(d.post_id, "post_id", max_len=MAX_ID)
    _text(d.reviewer, "reviewer", max_len=MAX_ID)
    _text(d.model_version, "model_version", max_len=MAX_ID)
    if not isinstance(d.text, str):
        raise RecordError("text", "must be a string")
    _text(d.image_url, "image_url", max_len=MAX_URL, required=False)
    if d.media_hash is not None and not (isinstance(d.media_hash, str) and _SHA256.fullmatch(d.media_hash)):
        raise RecordError("media_hash", "must be a lowercase hex sha256 or null")
    if not isinstance(d.decided_at, str):
        raise RecordError("decided_at", "must be an ISO 8601 timestamp")
    try:
        parse_iso(d.decided_at)
    except ValueError as exc:
        raise RecordError("decided_at", f"not an ISO 8601 timestamp: {d.decided_at!r}") from exc
    if not d.decisions:
        raise RecordError("decisions", "must name at least one task")
    for task, td in d.decisions.items():
        if not task.strip():
            raise RecordError("decisions", "task names must not be empty")
        if td.label is not None and not isinstance(td.label, str):
            raise RecordError(f"decisions.{task}.label", "must be a string")
    if not isinstance(d.model_labels, dict):
        raise RecordError("model_labels", "must be an object of task -> model output")
    if not isinstance(d.reasons, list):
        raise RecordError("reasons", "must be a list")
    return d


def parse_batch(records: Sequence[SinkRecord]) -> Parsed[ReviewDecision]:
    return split_batch(records, parse_decision, DLQ_STAGE, "dataset sink")


class DatasetSink:
    """The stage. Holds the dataset folder's writer lock while it runs."""

    name = NAME

    def __init__(self, dataset: ReviewedDataset, fetcher: MediaSource, dead_letters: DeadLetters | Any) -> None:
        self.dataset = dataset
        self.fetcher = fetcher
        self.dead_letters = dead_letters

    async def apply(self, records: Sequence[SinkRecord]) -> None:
        parsed = parse_batch(records)
        await self.dead_letters.send(parsed.dead, parsed.reasons)
        plan = plan_batch(parsed.good, self.dataset.lines)
        lines = await self._lines(plan)
        try:
            await asyncio.to_thread(self.dataset.commit, lines)
        except OSError as exc:
            raise TransientError("disk", "manifest_write", exc) from exc
        for outcome, count in Counter(plan.outcomes).items():
            metrics.RECORDS.labels(NAME, outcome).inc(count)
        metrics.RECORDS.labels(NAME, "dead_letter").inc(len(parsed.dead))

    async def _lines(self, plan: Plan) -> list[dict[str, Any]]:
        winners = list(plan.winners.values())
        media = await asyncio.gather(*(self._media(d) for d in winners))
        return [
            manifest_line(d, image, plan.revisions[d.post_id], media_meta)
            for d, (image, media_meta) in zip(winners, media, strict=True)
        ]

    async def _media(self, d: ReviewDecision) -> tuple[str | None, dict[str, Any] | None]:
        """(image path relative to the folder, extra meta) for a decision's image."""
        if not d.image_url:
            return None, None
        if d.media_hash and self.dataset.has_media(d.media_hash):
            return self.dataset.media_name(d.media_hash), None
        result = await self.fetcher.fetch(d.image_url)
        metrics.MEDIA.labels(result.status).inc()
        if not result.ok:
            log.warning("dataset sink: %s kept text-only, image %s: %s %s", d.post_id, d.image_url,
                        result.status, result.reason)  # fmt: skip
            return None, {"media_error": {"status": result.status, "reason": result.reason}}
        name, extra = str(result.content_hash), None
        if d.media_hash and d.media_hash != result.content_hash:
            # The URL now serves other bytes than the model saw: name the file by what it holds.
            extra = {"media_changed": {"classified_hash": d.media_hash, "fetched_hash": result.content_hash}}
        elif d.media_hash:
            name = d.media_hash
        try:
            image = await asyncio.to_thread(self.dataset.save_media, name, result.image)
        except OSError as exc:
            raise TransientError("disk", "media_write", exc) from exc
        return image, extra


async def run_dataset_sink(settings: SinkSettings, folder: Path, *, allow_loopback_media: bool = False) -> int:
    from stream.media import FetchConfig, MediaFetcher

    dataset = ReviewedDataset(folder)  # DatasetError when another sink holds the folder
    fetcher = MediaFetcher(FetchConfig(allow_loopback=allow_loopback_media))
    await fetcher.start()

    async def build(dead_letters: DeadLetters) -> DatasetSink:
        return DatasetSink(dataset, fetcher, dead_letters)

    try:
        return await run_sink(settings, build, name=NAME, dlq_stage=DLQ_STAGE)
    finally:
        await fetcher.close()
        dataset.close()
