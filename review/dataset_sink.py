"""Dataset sink: reviewers' decisions (`reviewed` topic) -> the reviewed dataset folder.

Per batch: parse (malformed records go to `posts.dlq`, stage `dataset_sink`), plan with the
dataset rules (review/dataset.py: replays and older decisions are no-ops, skip/escalate-only
decisions never become lines), read the winners' images from the evidence store by the hash
the model scored (stream/evidence.py; the post's URL is never fetched: it may serve other
bytes now) and save them as `media/<sha256>.png`, then write the manifest and fsync it; the
loop in review/kafka_sink.py commits the offsets only after that.

A tombstone (a null value keyed by a post id, sent by `modstream purge`) erases that post's
line and its image file (when no other line uses it).

An image becomes a training image only when the reviewer was shown those very bytes
(`seen_media_hash == media_hash`) and the store still holds them, verified. Otherwise the
example is text-only with the reason in `meta.media_error`: the decision is kept. A disk or
an unreachable store is retried (nothing committed meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.images import MAX_PIXELS, MAX_SIDE, ImageError, decode_image
from modstream.records import MAX_ID, MAX_URL, REVIEW_KINDS, RecordError, ReviewDecision, decode_json, parse_iso
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
from review.live_quality import OUTCOMES, live_kind, task_outcomes
from stream.evidence import UNAVAILABLE, EvidenceError, EvidenceStore, open_store

log = logging.getLogger(__name__)

NAME = "dataset"
DLQ_STAGE = "dataset_sink"
_SHA256 = re.compile(r"[0-9a-f]{64}")
MEDIA_OUTCOMES = ("ok", "not_scored", "not_seen", "missing", "mismatch", "undecodable")


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
    _text(d.recorded_by, "recorded_by", max_len=MAX_ID, required=False)
    _text(d.model_version, "model_version", max_len=MAX_ID)
    if not isinstance(d.text, str):
        raise RecordError("text", "must be a string")
    _text(d.image_url, "image_url", max_len=MAX_URL, required=False)
    for name in ("media_hash", "seen_media_hash"):
        value = getattr(d, name)
        if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
            raise RecordError(name, "must be a lowercase hex sha256 or null")
    if d.kind not in REVIEW_KINDS:
        raise RecordError("kind", f"must be one of {', '.join(REVIEW_KINDS)}")
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

    def __init__(self, dataset: ReviewedDataset, evidence: EvidenceStore, dead_letters: DeadLetters | Any) -> None:
        self.dataset = dataset
        self.evidence = evidence
        self.dead_letters = dead_letters
        for outcome in MEDIA_OUTCOMES:  # every series from 0, so the first failure shows in rate()
            metrics.MEDIA.labels(outcome)

    async def apply(self, records: Sequence[SinkRecord]) -> None:
        """Decisions in order; a tombstone (null value keyed by a post id: `modstream purge`)
        erases that post's line and image where it stands in the batch."""
        run: list[SinkRecord] = []
        for record in records:
            if record.value is None and record.key_text:
                await self._decisions(run)
                run = []
                await self._erase(record.key_text)
            else:
                run.append(record)
        await self._decisions(run)

    async def _erase(self, post_id: str) -> None:
        try:
            erased, media = await asyncio.to_thread(self.dataset.erase, [post_id])
        except OSError as exc:
            raise TransientError("disk", "manifest_write", exc) from exc
        metrics.RECORDS.labels(NAME, "erased" if erased else "erase_absent").inc()
        log.warning("dataset sink: erased post %s (%d line, %d image file)", post_id, erased, len(media))

    async def _decisions(self, records: Sequence[SinkRecord]) -> None:
        if not records:
            return
        parsed = parse_batch(records)
        await self.dead_letters.send(parsed.dead, parsed.reasons)
        plan = plan_batch(parsed.good, self.dataset.index)
        lines = await self._lines(plan)
        try:
            await asyncio.to_thread(self.dataset.commit, lines)
        except OSError as exc:
            raise TransientError("disk", "manifest_write", exc) from exc
        for outcome, count in Counter(plan.outcomes).items():
            metrics.RECORDS.labels(NAME, outcome).inc(count)
        for decision, outcome in zip(parsed.good, plan.outcomes, strict=True):
            if outcome == "added" and live_kind(decision) is not None:  # a post's first verdict, once on disk
                for task, result in task_outcomes(decision):
                    # All four outcomes from 0: a model that never says negative (no tn, fn)
                    # must still get a live F1, or the alert could never fire on it.
                    for other in OUTCOMES:
                        metrics.LIVE.labels(decision.kind, task, decision.model_version, other)
                    metrics.LIVE.labels(decision.kind, task, decision.model_version, result).inc()
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
        if not d.media_hash:
            return self._no_image(d, "not_scored", "the worker read no image for this post")
        if d.seen_media_hash != d.media_hash:
            return self._no_image(d, "not_seen", "the reviewer was not shown the image the model scored")
        if self.dataset.has_media(d.media_hash):
            metrics.MEDIA.labels("ok").inc()
            return self.dataset.media_name(d.media_hash), None
        blob = await self.evidence.get(d.media_hash)
        if blob.status == UNAVAILABLE:  # the store is down, not the blob gone: retry the batch
            raise TransientError("evidence", "read", EvidenceError(blob.reason))
        if not blob.ok or blob.data is None:
            return self._no_image(d, blob.status, blob.reason)
        try:
            image = await asyncio.to_thread(decode_image, blob.data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
        except ImageError as exc:
            return self._no_image(d, "undecodable", str(exc))
        try:
            path = await asyncio.to_thread(self.dataset.save_media, d.media_hash, image)
        except OSError as exc:
            raise TransientError("disk", "media_write", exc) from exc
        finally:
            image.close()
        metrics.MEDIA.labels("ok").inc()
        return path, None

    def _no_image(self, d: ReviewDecision, status: str, reason: str) -> tuple[None, dict[str, Any]]:
        metrics.MEDIA.labels(status).inc()
        log.warning("dataset sink: %s kept text-only: %s (%s)", d.post_id, status, reason)
        return None, {"media_error": {"status": status, "reason": reason}}


async def run_dataset_sink(settings: SinkSettings, folder: Path, *, evidence: str | None = None) -> int:
    dataset = ReviewedDataset(folder)  # DatasetError when another sink holds the folder
    store = open_store(evidence)

    async def build(dead_letters: DeadLetters) -> DatasetSink:
        return DatasetSink(dataset, store, dead_letters)

    try:
        return await run_sink(settings, build, name=NAME, dlq_stage=DLQ_STAGE)
    finally:
        store.close()
        dataset.close()
