"""The reviewed dataset: reviewers' decisions as training data, in the project's manifest format.

Layout (shared contract): `<folder>/manifest.jsonl`, an append-only manifest: each line
`{"id", "text", "image": "media/<sha256>.png" | null, "labels": {task: label | null},
"meta": {decision_id, reviewer, decided_at, model_version, model_labels, reasons, ...}}`,
and a post re-decided later gets a new line at the end that replaces its earlier one; read it
with modstream.manifest.read_manifest(..., latest=True) (load_reviewed does). Images under
`<folder>/media/`.

Rules (`plan_batch`), all idempotent so a redelivered batch changes nothing:
- a decision that labels no task (every task skipped or escalated) never becomes a line and
  leaves an existing line alone; a skipped or escalated task's label is null;
- a decision whose `review_stage` does not train (the first of a double review, a second
  that disagreed, an answer to a gold item: modstream.records.TRAINING_STAGES) never becomes
  a line either and leaves an existing line alone (outcome `held`): a double-reviewed item
  trains only from the second reviewer's agreeing decision or an admin's settlement;
- a post's line reflects its latest labelling decision, ordered by (decided_at, decision_id):
  a replayed decision (same id as the line's) or an older one is a no-op;
- `meta.revision` counts the labelling decisions that took effect on the line, so
  `count_decisions` grows with re-decisions too (what the retraining trigger counts).

`ReviewedDataset` is the folder's single writer (an flock on `<folder>/.lock`). It keeps
only a small index in memory (per post: the winning decision's id, time, revision, image and
where its line starts), never the lines themselves. Every commit is an fsynced append; when
replaced lines make up more than half the file, it is compacted: the current lines copied, by
their offsets, to a temporary file that replaces the manifest atomically. Erasing a post
(`erase`) rewrites the file the same way without any of its lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
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
    return read_complete_lines(path, latest=True) if path.exists() else []


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
class IndexEntry:
    """What the writer remembers of a post's current line (what plan_batch needs, and where
    the line is). `meta` holds decision_id, decided_at and revision; never the text."""

    offset: int
    image: str | None
    meta: dict[str, Any]


def _index_entry(line: Mapping[str, Any], offset: int) -> IndexEntry:
    meta = line.get("meta") or {}
    kept = {k: meta[k] for k in ("decision_id", "decided_at", "revision") if k in meta}
    return IndexEntry(offset, line.get("image"), kept)


def _meta_of(current: Any) -> Mapping[str, Any]:
    """A post's current meta, from the writer's index or from a manifest line (tests)."""
    if isinstance(current, IndexEntry):
        return current.meta
    return current.get("meta") or {} if current is not None else {}


@dataclass
class Plan:
    """What a batch of decisions does to the dataset."""

    outcomes: list[str] = field(default_factory=list)  # per decision, in batch order
    winners: dict[str, ReviewDecision] = field(default_factory=dict)  # post id -> decision to write
    revisions: dict[str, int] = field(default_factory=dict)  # post id -> meta.revision of its new line


def plan_batch(decisions: Sequence[ReviewDecision], current: Mapping[str, Any]) -> Plan:
    """Apply the rules to `decisions` in order against `current` (post id -> the writer's
    IndexEntry, or a manifest line). Looks up only the batch's posts, so a batch costs the
    same however large the dataset grew. Outcomes: added, replaced, replayed, superseded
    (older than the post's line), no_labels, held (a review stage that never trains)."""
    plan = Plan()
    best: dict[str, tuple[str, tuple[datetime, str]] | None] = {}  # post id -> (decision id, order key)

    def best_of(post_id: str) -> tuple[str, tuple[datetime, str]] | None:
        if post_id not in best:
            meta = _meta_of(current.get(post_id))
            found = meta.get("decision_id") and meta.get("decided_at")
            best[post_id] = (meta["decision_id"], order_key(meta["decision_id"], meta["decided_at"])) if found else None
        return best[post_id]

    for d in decisions:
        if not labels_something(d):
            plan.outcomes.append("no_labels")
            continue
        if not d.trains:  # pending a second review, disagreed, or gold: never a training example
            plan.outcomes.append("held")
            continue
        key = order_key(d.decision_id, d.decided_at)
        now = best_of(d.post_id)
        if now is not None and now[0] == d.decision_id:
            plan.outcomes.append("replayed")
            continue
        if now is not None and key < now[1]:
            plan.outcomes.append("superseded")
            continue
        existed = d.post_id in current or d.post_id in plan.winners
        plan.outcomes.append("replaced" if existed else "added")
        best[d.post_id] = (d.decision_id, key)
        plan.winners[d.post_id] = d
        if d.post_id not in plan.revisions:
            existing = current.get(d.post_id)
            plan.revisions[d.post_id] = int(_meta_of(existing).get("revision", 1)) if existing is not None else 0
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
        "seen_media_hash": decision.seen_media_hash,
        # The reviewer's image-text answer: the only ITM target a reviewed pair gets.
        "image_text_match": decision.image_text_match,
        "kind": decision.kind,  # audit verdicts are the retrain gate's unbiased holdout
        "revision": revision,
    }
    if decision.routed_by_policy is not None:  # an audit verdict on a post routing picked too: True
        meta["routed_by_policy"] = decision.routed_by_policy
    if decision.note:
        meta["note"] = decision.note
    if decision.recorded_by:
        meta["recorded_by"] = decision.recorded_by  # the console's Kafka principal
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
    """The single writer of a reviewed dataset folder (see the module docstring)."""

    def __init__(self, folder: Path, *, compact_min_lines: int = 1000) -> None:
        self.folder = Path(folder)
        self.manifest = self.folder / MANIFEST
        self.media = self.folder / MEDIA_DIR
        self.media.mkdir(parents=True, exist_ok=True)
        self.compact_min_lines = compact_min_lines
        self._lock = (self.folder / LOCK).open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise DatasetError(f"{self.folder} is being written by another dataset sink") from exc
        self.index: dict[str, IndexEntry] = {}
        self.total_lines = 0  # lines in the file, replaced ones included
        self.size = 0  # bytes of the file
        self.compactions = 0
        self._load()

    def _load(self) -> None:
        if not self.manifest.exists():
            return
        with self.manifest.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            partial = size > 0 and fh.seek(size - 1) >= 0 and fh.read(1) != b"\n"
            if partial:
                # Only an append cut short by a crash leaves a partial last line, and its batch
                # was never committed: it will be delivered again.
                data, _ = complete_part(self.manifest)
                log.warning("%s: dropping a partial last line (an interrupted append)", self.manifest)
                with self.manifest.open("r+b") as out:
                    out.truncate(len(data))
                    os.fsync(out.fileno())
        try:
            for _ in iter_manifest(self.manifest, duplicates=True):  # the format check the trainer applies
                pass
        except ValueError as exc:
            raise DatasetError(f"reviewed dataset manifest is corrupt: {exc}") from exc
        offset = 0
        with self.manifest.open("rb") as fh:
            for raw in fh:  # streamed: memory is the index, not the file
                if raw.strip():
                    line = json.loads(raw)
                    self.index[line["id"]] = _index_entry(line, offset)
                    self.total_lines += 1
                offset += len(raw)
        self.size = offset

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
    @property
    def replaced_lines(self) -> int:
        return self.total_lines - len(self.index)

    def commit(self, lines: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Append `lines` (one per post id) durably: (added, replaced). A line for a post
        already in the dataset replaces its earlier line for readers (latest=True). Raises
        OSError on failure, leaving the file and the index as they were."""
        if not lines:
            return 0, 0
        replaced = sum(1 for line in lines if line["id"] in self.index)
        payloads = [_dump(line) for line in lines]
        start = self._append(payloads)
        offset = start
        for line, payload in zip(lines, payloads, strict=True):
            self.index[line["id"]] = _index_entry(line, offset)
            offset += len(payload)
        self.total_lines += len(lines)
        self.size = offset
        if self.replaced_lines > max(self.compact_min_lines, len(self.index)):
            self.compact()
        return len(lines) - replaced, replaced

    def compact(self) -> None:
        """Rewrite the manifest with only each post's current line (streamed, by offset)."""
        self._rewrite(keep=set(self.index))
        self.compactions += 1
        log.info("%s compacted to %d lines", self.manifest, len(self.index))

    def erase(self, post_ids: Sequence[str]) -> tuple[int, list[str]]:
        """Remove every line of the posts (the manifest rewritten atomically, so their text is
        gone from the file) and their image files that no remaining line uses: (posts
        removed, image files removed). Idempotent; raises OSError leaving the state as it was."""
        gone = {p for p in post_ids if p in self.index}
        if not gone:
            return 0, []
        still_used = {entry.image for post, entry in self.index.items() if post not in gone}
        # Every line of the posts goes, earlier (replaced) lines too: so do all their images.
        images = self._rewrite(keep=set(self.index) - gone, images_of=gone)
        removed = []
        for name in sorted(images - still_used):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / str(name)).unlink()
                removed.append(str(name))
        if removed:
            _fsync_dir(self.media)
        return len(gone), removed

    def _append(self, payloads: Sequence[bytes]) -> int:
        """Append and fsync; returns the offset the payload starts at."""
        with self.manifest.open("ab") as fh:
            size = fh.tell()
            try:
                fh.write(b"".join(payloads))
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                with contextlib.suppress(OSError):  # a half-written append must not stay behind
                    fh.truncate(size)
                raise
        if size == 0:
            _fsync_dir(self.folder)  # the manifest file itself is new
        return size

    def _rewrite(self, keep: set[str], images_of: Collection[str] = ()) -> set[str]:
        """Copy the current lines of the posts in `keep` to a new file that replaces the
        manifest; the index and counters follow only once it is in place. Returns the image
        names of every line (current or replaced) of the posts in `images_of`."""
        current = {entry.offset: post for post, entry in self.index.items() if post in keep}
        new_index: dict[str, IndexEntry] = {}
        images: set[str] = set()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".manifest-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, self.manifest.open("rb") as src:
                offset = written = 0
                for raw in src:
                    post = current.get(offset)
                    if images_of and post is None and raw.strip():
                        line = json.loads(raw)
                        if line.get("id") in images_of and line.get("image"):
                            images.add(str(line["image"]))
                    if post is not None:
                        out.write(raw)
                        old = self.index[post]
                        new_index[post] = IndexEntry(written, old.image, old.meta)
                        written += len(raw)
                    offset += len(raw)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.manifest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.folder)
        self.index = new_index
        self.total_lines = len(new_index)
        self.size = written
        return images
