"""From a reviewer's decision to a verdict-bank entry, and from the banks to a review page's
precedent (issue 20: decide once, apply everywhere).

Which decisions are banked: a decision on a post with an image, in which the reviewer saw
that image (the scored bytes from the evidence store: `seen_media_hash` equals the item's
content hash) and gave every task a label (confirm, correct, not violating). An escalated,
skipped or partial decision, or one made without seeing the image (an escalation settled on
the admin page, which shows none; "media unavailable"), banks nothing: a hash bank applies a
verdict to every copy of a picture, so it takes only verdicts about that picture.

One entry per image: the entry id is the image's content hash, so the latest banked decision
on the same bytes replaces the earlier one (a reversed verdict moves the image from one bank
to the other instead of leaving both). Violating when any task's label is not the task's
negative one (the first of its label set), benign when every task is negative.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from models.images import ImageError, decode_for_model
from modstream.records import LABELLING_ACTIONS, ReviewDecision, ReviewItem
from stream.banks.bank import BankEntry, BankMatch, VerdictBanks
from stream.banks.hashing import PdqHash, is_pdq_hex, pdq_hash
from stream.banks.variants import bank_variants
from stream.evidence import EvidenceStore

log = logging.getLogger(__name__)

REVIEW_SOURCE = "review"
# Precedent reaches a little past the match distance: near images people decided that did not
# match still tell a reviewer what was decided before.
PRECEDENT_EXTRA_BITS = 16


def entry_id_for(content_hash: str) -> str:
    return f"{REVIEW_SOURCE}:{content_hash}"


def entry_for(decision: ReviewDecision, item: ReviewItem) -> BankEntry | None:
    """The bank entry a decision adds (see the module docstring), or None."""
    media = item.label.get("media") or {}
    content_hash = media.get("content_hash")
    if not item.image_url or not content_hash or decision.seen_media_hash != content_hash:
        return None
    if decision.escalated or not decision.decisions:
        return None
    verdicts: dict[str, int] = {}
    for task, choice in decision.decisions.items():
        labels = item.tasks.get(task) or []
        if choice.action not in LABELLING_ACTIONS or not labels or choice.label not in labels:
            return None
        verdicts[task] = 0 if choice.label == labels[0] else 1
    pdq = media.get("pdq") if is_pdq_hex(media.get("pdq")) else None
    quality = media.get("pdq_quality") if pdq is not None else None
    return BankEntry(
        entry_id=entry_id_for(content_hash),
        bank="violating" if any(verdicts.values()) else "benign",
        source=REVIEW_SOURCE,
        content_hash=content_hash,
        pdq=pdq,
        pdq_quality=quality if isinstance(quality, int) and not isinstance(quality, bool) else None,
        verdicts=verdicts,
        decision_id=decision.decision_id,
        decided_by=decision.reviewer,
        decided_at=decision.decided_at,
    )


def hashes_of(data: bytes) -> tuple[PdqHash, list[PdqHash]]:
    """The decided image's PDQ as the worker takes it (decoded as the default worker decodes:
    stream.media.FetchConfig's sides) and its crop and bar variants (stream/banks/variants.py)."""
    with decode_for_model(data) as image:
        return pdq_hash(image), bank_variants(image)


async def with_variants(entry: BankEntry, store: EvidenceStore) -> BankEntry:
    """`entry` with the PDQ variants of the bytes the reviewer saw, read from the evidence
    store (and its own PDQ when the worker did not hash it). Without the bytes (purged since,
    a store outage) the entry stays as it is: exact and whole-image matches still work."""
    if entry.content_hash is None:
        return entry
    blob = await store.get(entry.content_hash)
    if not blob.ok or blob.data is None:
        log.warning("bank entry %s without crop variants: evidence %s", entry.entry_id, blob.status)
        return entry
    try:
        own, variants = await asyncio.to_thread(hashes_of, blob.data)
    except ImageError as exc:
        log.warning("bank entry %s without crop variants: %s", entry.entry_id, exc)
        return entry
    changes: dict[str, Any] = {"pdq_variants": tuple(v.hex for v in variants if v.hex != (entry.pdq or own.hex))}
    if entry.pdq is None and own.usable:
        changes.update(pdq=own.hex, pdq_quality=own.quality)
    if entry.pdq is None and "pdq" not in changes:
        changes["pdq_variants"] = ()
    return dataclasses.replace(entry, **changes)


def precedent(banks: VerdictBanks, item: ReviewItem, k: int = 5) -> list[dict[str, Any]]:
    """The decided images nearest to this item's (exact bytes first), as rows for the page:
    distance, bank, per-task verdict labels, who decided and when, the decision id."""
    media = item.label.get("media") or {}
    pdq_hex, quality = media.get("pdq"), media.get("pdq_quality")
    pdq = None
    valid_quality = isinstance(quality, int) and not isinstance(quality, bool) and 0 <= quality <= 100
    if isinstance(pdq_hex, str) and is_pdq_hex(pdq_hex) and isinstance(quality, int) and valid_quality:
        pdq = PdqHash.from_hex(pdq_hex, quality)
    content_hash = media.get("content_hash") if isinstance(media.get("content_hash"), str) else None
    if pdq is None and content_hash is None:
        return []
    radius = min(64, banks.max_distance + PRECEDENT_EXTRA_BITS)
    return [_row(m, item, banks.max_distance) for m in banks.nearest(pdq, k, radius, content_hash=content_hash)]


def _row(match: BankMatch, item: ReviewItem, max_distance: int) -> dict[str, Any]:
    entry = match.entry
    verdicts = {}
    for task, verdict in entry.verdicts.items():
        labels = item.tasks.get(task) or []
        verdicts[task] = labels[verdict] if len(labels) == 2 else ("positive" if verdict else "negative")
    return {
        "entry_id": entry.entry_id,
        "bank": entry.bank,
        "distance": match.distance,
        "match": match.kind,
        "verdicts": verdicts,
        "decided_by": entry.decided_by,
        "decided_at": entry.decided_at,
        "decision_id": entry.decision_id,
        "source": entry.source,
        # Within the distance the workers match at (the console's banks use the workers' default).
        "matches": match.kind == "exact" or match.distance <= max_distance,
    }
