"""Keeping post data only as long as it is needed, and erasing one post everywhere.

**Retention** (`modstream retention`, a cron job): post text lives in the Redis review streams
and post media in the evidence store; both are trimmed by age.
- The review stream is trimmed with XTRIM MINID below the cutoff, but never past its oldest
  pending entry (claimed, not acknowledged) nor past the group's last-delivered id (entries
  not handed to anyone yet): only items a reviewer finished are dropped.
- The dead-letter stream (items that failed delivery too often) is trimmed by age.
- The escalated stream is never trimmed: each entry is open work for an admin (the alert
  ModstreamReviewOldestItemTooOld covers it); the report counts the old ones.
- Evidence blobs older than their own age limit are deleted, except those still referenced
  by an item in any of the three streams.
The act is recorded on the audit topic first (`retention_applied`).

**Erasure** (`modstream purge --post ID`): the post's entries in the three streams (acked and
deleted), its evidence blobs (found through those entries, the reviewed dataset's line and
`--media-hash`), and a tombstone on `reviewed` keyed by the post id, on which the dataset sink
removes the post's line and image (review/dataset_sink.py). Recorded on the audit topic
first (`post_purged`, ids only). The `reviewed-once` and `decided` markers stay: they hold no
text and keep a replayed record from queueing the post again. Kafka topics (`posts`, `labels`,
`review`, `reviewed`) keep their records until their own retention ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from modstream.records import ReviewItem, decode_json
from review.queue import ReviewQueue
from stream.evidence import DIGEST, EvidenceStore

log = logging.getLogger(__name__)

SCAN_BATCH = 1000


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _next_id(entry_id: str) -> str:
    """The smallest stream id after `entry_id` (XTRIM MINID keeps ids >= its threshold)."""
    ms, seq = entry_id.split("-", 1)
    return f"{ms}-{int(seq) + 1}"


def media_hash_of(item_json: str | bytes | None) -> str | None:
    """The scored media hash a stream entry's review item names (None when none or unreadable)."""
    if not item_json:
        return None
    try:
        item = ReviewItem.from_json(item_json if isinstance(item_json, bytes) else item_json.encode())
    except Exception:  # a malformed entry has no blob to keep or erase
        return None
    value = (item.label.get("media") or {}).get("content_hash")
    return value if isinstance(value, str) and DIGEST.fullmatch(value) else None


async def _entries(queue: ReviewQueue, key: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream, read in pages."""
    out: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while True:
        rows = await queue._range(key, start, "+", count=SCAN_BATCH)
        if start != "-" and rows and rows[0][0] == start:
            rows = rows[1:]
        if not rows:
            return out
        out.extend(rows)
        start = rows[-1][0]


@dataclass
class RetentionReport:
    review_trimmed: int = 0
    review_kept_from: str | None = None  # the MINID used (None: nothing could be trimmed)
    dead_trimmed: int = 0
    escalated_older: int = 0  # open escalations older than the cutoff (never trimmed)
    blobs_expired: int = 0
    blobs_kept: int = 0  # referenced by items still in a stream

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def review_trim_threshold(queue: ReviewQueue, cutoff_ms: int) -> str | None:
    """The MINID for the review stream: below the cutoff, the oldest pending entry and the
    first undelivered one. None when the group does not exist (nothing was ever delivered)."""
    info = await queue._group_info()
    if not info:
        return None
    last = info.get("last-delivered-id")
    last_id = last.decode() if isinstance(last, bytes) else str(last or "0-0")
    limits = [f"{cutoff_ms}-0", _next_id(last_id)]
    oldest_pending = await queue._pending_rows("-", "+", 1)
    if oldest_pending:
        limits.append(oldest_pending[0]["id"])
    return min(limits, key=lambda i: tuple(int(p) for p in i.split("-")))


async def apply_retention(
    queue: ReviewQueue,
    evidence: EvidenceStore | None,
    *,
    max_age_s: float,
    evidence_max_age_s: float | None = None,
    now: float | None = None,
) -> RetentionReport:
    now = time.time() if now is None else now
    cutoff_ms = int((now - max_age_s) * 1000)
    report = RetentionReport()
    client = queue.client

    threshold = await review_trim_threshold(queue, cutoff_ms)
    if threshold is not None:
        report.review_kept_from = threshold
        report.review_trimmed = int(await client.xtrim(queue.stream, minid=threshold, approximate=False))
    report.dead_trimmed = int(await client.xtrim(queue.dead, minid=f"{cutoff_ms}-0", approximate=False))
    escalated = await _entries(queue, queue.escalated_stream)
    report.escalated_older = sum(1 for entry_id, _ in escalated if _entry_ms(entry_id) < cutoff_ms)

    if evidence is not None:
        keep: set[str] = set()
        for key in (queue.stream, queue.dead):
            keep.update(h for _, f in await _entries(queue, key) if (h := media_hash_of(f.get("item"))))
        keep.update(h for _, f in escalated if (h := media_hash_of(f.get("item"))))
        report.blobs_kept = len(keep)
        age = max_age_s if evidence_max_age_s is None else evidence_max_age_s
        report.blobs_expired = await evidence.expire(age, now=now, keep=frozenset(keep))
    return report


@dataclass
class PurgeReport:
    post_id: str
    review_entries: list[str] = field(default_factory=list)
    escalated_entries: list[str] = field(default_factory=list)
    dead_entries: list[str] = field(default_factory=list)
    blobs_deleted: list[str] = field(default_factory=list)
    blobs_shared: list[str] = field(default_factory=list)  # kept: other posts carry the same bytes
    tombstone_sent: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def purge_redis(queue: ReviewQueue, post_id: str, report: PurgeReport) -> tuple[set[str], set[str]]:
    """Remove the post's entries from the review, escalated and dead streams (a pending one is
    acked first, so no reviewer's claim points at a deleted entry). Returns (the media hashes
    those entries named, the hashes other posts' entries still need: a reposted meme shares
    one blob with every copy), from the one scan of the streams."""
    hashes: set[str] = set()
    others: set[str] = set()
    for key, found in (
        (queue.stream, report.review_entries),
        (queue.escalated_stream, report.escalated_entries),
        (queue.dead, report.dead_entries),
    ):
        for entry_id, fields in await _entries(queue, key):
            if fields.get("post_id") != post_id:
                if h := media_hash_of(fields.get("item")):
                    others.add(h)
                continue
            if h := media_hash_of(fields.get("item")):
                hashes.add(h)
            pipe = queue.client.pipeline(transaction=True)
            if key == queue.stream:
                pipe.xack(queue.stream, queue.group, entry_id)
            pipe.xdel(key, entry_id)
            await pipe.execute()
            found.append(entry_id)
    return hashes, others


def line_media_hash(line: dict[str, Any]) -> str | None:
    """The hash a reviewed manifest line's image is named by (`media/<sha256>.png`), if any."""
    if not line.get("image"):
        return None
    stem = str(line["image"]).rsplit("/", 1)[-1].removesuffix(".png")
    return stem if DIGEST.fullmatch(stem) else None


def dataset_media_hashes(lines: Iterable[dict[str, Any]], post_id: str) -> set[str]:
    """Media hashes of the post's lines in a reviewed manifest."""
    return {h for line in lines if line.get("id") == post_id and (h := line_media_hash(line))}


def read_manifest_lines(path: Any) -> list[dict[str, Any]]:
    """The raw lines of a manifest, [] when it does not exist (safe while the sink appends)."""
    from modstream.manifest import complete_part

    try:
        data, _ = complete_part(path)
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):  # not str.splitlines: post text may hold U+2028 raw
        if raw.strip():
            try:
                out.append(decode_json(raw))
            except Exception:
                continue
    return out
