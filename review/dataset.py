"""The reviewed dataset: reviewers' decisions as training data, in the project's manifest format.

Layout (shared contract): `<folder>/manifest.jsonl`, one line per post id, each
`{"id", "text", "image": "media/<sha256>.png" | null, "labels": {task: label | null},
"meta": {decision_id, reviewer, decided_at, model_version, model_labels, reasons, ...}}`,
readable with modstream.manifest.read_manifest; images under `<folder>/media/`.

Rules (`plan_batch`), all idempotent so a redelivered batch changes nothing:
- a decision that labels no task (every task skipped or escalated) never becomes a line and
  leaves an existing line alone; a skipped or escalated task's label is null;
- a post's line reflects its latest labelling decision, ordered by (decided_at, decision_id):
  a replayed decision (same id as the line's) or an older one is a no-op;
- `meta.revision` counts the labelling decisions that took effect on the line, so
  `count_decisions` grows with re-decisions too (what the retraining trigger counts).

`ReviewedDataset` is the folder's single writer (an flock on `<folder>/.lock`): new posts
are appended, and a batch that changes an existing post's line rewrites the manifest to a
temporary file that replaces it atomically; both are fsynced before `commit` returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modstream.manifest import Example, complete_part, iter_manifest, read_complete_lines
from modstream.records import ReviewDecision, parse_iso

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
MEDIA_DIR = "media"
LOCK = ".lock"


class DatasetError(RuntimeError):
    """The dataset folder cannot be used as it is (corrupt manifest, second writer)."""


# -- reading (any process) -----------------------------------------------------------------


def load_reviewed(folder: Path) -> list[Example]:
    """The reviewed examples (image paths absolute), [] when nothing was reviewed yet. Safe
    while the dataset sink writes: a line being appended is left out until it is whole."""
    path = Path(folder) / MANIFEST
    return read_complete_lines(path) if path.exists() else []


def count_decisions(folder: Path) -> int:
    """Labelling decisions reflected in the dataset (re-decisions of a post included)."""
    return sum(int(ex.meta.get("revision", 1)) for ex in load_reviewed(folder))


# -- the rules -------------------------------------------------------------------------------


def order_key(decision_id: str, when: str) -> tuple[datetime, str]:
    """Which of two decisions on a post is the latest (the id breaks ties deterministically)."""
    return parse_iso(when), decision_id


def labels_something(decision: ReviewDecision) -> bool:
    return any(label is not None for label in decision.training_labels().values())


@dataclass
class Plan:
    """What a batch of decisions does to the dataset."""

    outcomes: list[str] = field(default_factory=list)  # per decision, in batch order
    winners: dict[str, ReviewDecision] = field(default_factory=dict)  # post id -> decision to write
    revisions: dict[str, int] = field(default_factory=dict)  # post id -> meta.revision of its new line


def plan_batch(decisions: Sequence[ReviewDecision], lines: Mapping[str, Mapping[str, Any]]) -> Plan:
    """Apply the rules to `decisions` in order against the current `lines` (post id -> line).
    Outcomes: added, replaced, replayed, superseded (older than the post's line), no_labels."""
    plan = Plan()
    best: dict[str, tuple[str, tuple[datetime, str]]] = {}  # post id -> (decision id, order key)
    for post_id, line in lines.items():
        meta = line.get("meta") or {}
        if meta.get("decision_id") and meta.get("decided_at"):
            best[post_id] = (meta["decision_id"], order_key(meta["decision_id"], meta["decided_at"]))
    for d in decisions:
        if not labels_something(d):
            plan.outcomes.append("no_labels")
            continue
        key = order_key(d.decision_id, d.decided_at)
        current = best.get(d.post_id)
        if current is not None and current[0] == d.decision_id:
            plan.outcomes.append("replayed")
            continue
        if current is not None and key < current[1]:
            plan.outcomes.append("superseded")
            continue
        existed = d.post_id in lines or d.post_id in plan.winners
        plan.outcomes.append("replaced" if existed else "added")
        best[d.post_id] = (d.decision_id, key)
        plan.winners[d.post_id] = d
        if d.post_id not in plan.revisions:
            existing = lines.get(d.post_id)
            plan.revisions[d.post_id] = int((existing.get("meta") or {}).get("revision", 1)) if existing else 0
        plan.revisions[d.post_id] += 1
    return plan


def manifest_line(
    decision: ReviewDecision,
    image: str | None,
    revision: int,
    media_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest line of a post's winning decision (`image` relative to the folder)."""
    meta: dict[str, Any] = {
        "decision_id": decision.decision_id,
        "reviewer": decision.reviewer,
        "decided_at": decision.decided_at,
        "model_version": decision.model_version,
        "model_labels": decision.model_labels,
        "reasons": decision.reasons,
        "actions": {task: d.action for task, d in decision.decisions.items()},
        "itm_match": decision.itm_match,
        "image_url": decision.image_url,
        "media_hash": decision.media_hash,
        "revision": revision,
    }
    if decision.note:
        meta["note"] = decision.note
    if media_meta:
        meta.update(media_meta)
    return {
        "id": decision.post_id,
        "text": decision.text,
        "image": image,
        "labels": decision.training_labels(),
        "meta": meta,
    }


# -- writing (the dataset sink only) ---------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dump(line: Mapping[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class ReviewedDataset:
    """The single writer of a reviewed dataset folder; keeps the lines in memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = self.folder / MANIFEST
        self.media = self.folder / MEDIA_DIR
        self.media.mkdir(parents=True, exist_ok=True)
        self._lock = (self.folder / LOCK).open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise DatasetError(f"{self.folder} is being written by another dataset sink") from exc
        self.lines: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.manifest.exists():
            return {}
        data, cut = complete_part(self.manifest)
        if cut:
            # Only an append cut short by a crash leaves a partial last line, and its batch
            # was never committed: it will be delivered again.
            log.warning("%s: dropping a partial last line (an interrupted append)", self.manifest)
            with self.manifest.open("r+b") as fh:
                fh.truncate(len(data))
                os.fsync(fh.fileno())
        try:
            for _ in iter_manifest(self.manifest):  # the format check the trainer will apply
                pass
        except ValueError as exc:
            raise DatasetError(f"reviewed dataset manifest is corrupt: {exc}") from exc
        return {line["id"]: line for line in map(json.loads, data.decode().splitlines()) if line}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    # -- media -----------------------------------------------------------------------------
    def media_name(self, sha256: str) -> str:
        return f"{MEDIA_DIR}/{sha256}.png"

    def has_media(self, sha256: str) -> bool:
        return (self.folder / self.media_name(sha256)).is_file()

    def save_media(self, sha256: str, image: Any) -> str:
        """Write a decoded image as `media/<sha256>.png` (fsynced, atomically) unless it is
        there already; returns its path relative to the folder."""
        name = self.media_name(sha256)
        target = self.folder / name
        if target.is_file():
            return name
        fd, tmp = tempfile.mkstemp(dir=self.media, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as fh:
                image.save(fh, format="PNG")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.media)
        return name

    # -- manifest ----------------------------------------------------------------------------
    def commit(self, lines: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Write `lines` (one per post id) durably: (appended, replaced). Appends when all are
        new posts, else rewrites the whole manifest atomically. Raises OSError on failure,
        leaving the file and the in-memory state as they were."""
        if not lines:
            return 0, 0
        replaced = sum(1 for line in lines if line["id"] in self.lines)
        if replaced:
            merged = dict(self.lines)
            merged.update({line["id"]: line for line in lines})
            self._rewrite(merged.values())
            self.lines = merged
        else:
            self._append(lines)
            self.lines.update({line["id"]: line for line in lines})
        return len(lines) - replaced, replaced

    def erase(self, post_ids: Sequence[str]) -> tuple[int, list[str]]:
        """Remove the posts' lines (the manifest rewritten atomically, so their text is gone
        from the file) and their image files that no remaining line uses: (lines removed,
        image files removed). Idempotent; raises OSError leaving the state as it was."""
        gone = {p for p in post_ids if p in self.lines}
        if not gone:
            return 0, []
        kept = {k: v for k, v in self.lines.items() if k not in gone}
        images = {self.lines[p]["image"] for p in gone if self.lines[p].get("image")}
        still_used = {line.get("image") for line in kept.values()}
        self._rewrite(kept.values())
        self.lines = kept
        removed = []
        for name in sorted(images - still_used):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
                removed.append(name)
        if removed:
            _fsync_dir(self.media)
        return len(gone), removed

    def _append(self, lines: Sequence[Mapping[str, Any]]) -> None:
        payload = b"".join(_dump(line) for line in lines)
        with self.manifest.open("ab") as fh:
            size = fh.tell()
            try:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                with contextlib.suppress(OSError):  # a half-written append must not stay behind
                    fh.truncate(size)
                raise
        if size == 0:
            _fsync_dir(self.folder)  # the manifest file itself is new

    def _rewrite(self, lines: Any) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".manifest-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(b"".join(_dump(line) for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.manifest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.folder)
