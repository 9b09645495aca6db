"""The reviewed dataset's rules and the dataset sink's stage in a temporary folder, with a
local evidence store and no Kafka."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from modstream.manifest import read_manifest
from modstream.records import DeadLetter, RecordError, ReviewDecision, TaskDecision, encode
from review.dataset import (
    DatasetError,
    ReviewedDataset,
    count_decisions,
    load_reviewed,
    manifest_line,
    plan_batch,
)
from review.dataset_sink import DatasetSink, parse_decision
from review.kafka_sink import SinkRecord, TransientError
from stream.evidence import EvidenceStore, LocalBackend

TASKS = {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]}


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def decision(
    decision_id: str,
    post_id: str,
    hate: tuple[str, str | None] = ("confirm", "hateful"),
    sarcasm: tuple[str, str | None] = ("not_violating", "not_sarcastic"),
    decided_at: str = "2026-11-28T10:00:00+00:00",
    image_url: str | None = None,
    media_hash: str | None = None,
    seen: bool = True,
) -> ReviewDecision:
    return ReviewDecision(
        decision_id=decision_id,
        post_id=post_id,
        reviewer="alice",
        decisions={"hate": TaskDecision(*hate), "sarcasm": TaskDecision(*sarcasm)},
        model_version="v0001",
        model_labels={"hate": {"label": "hateful", "score": 0.7}},
        text=f"text of {post_id}",
        image_url=image_url,
        media_hash=media_hash,
        seen_media_hash=media_hash if seen else None,
        reasons=["itm_low"],
        decided_at=decided_at,
    )


SKIP = ("skip", None)
ESCALATE = ("escalate", None)


class CountingBackend(LocalBackend):
    """The real folder backend, counting reads (a replay must not read the store again)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0
        self.down = False

    def get(self, digest: str) -> bytes | None:
        self.reads += 1
        if self.down:
            raise OSError(5, "Input/output error")
        return super().get(digest)


async def _store(root: Path, *blobs: bytes) -> tuple[EvidenceStore, CountingBackend]:
    backend = CountingBackend(root)
    store = EvidenceStore(backend)
    for blob in blobs:
        await store.put(hashlib.sha256(blob).hexdigest(), blob)
    return store, backend


class FakeDeadLetters:
    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter], reasons: Sequence[str]) -> None:
        self.sent.extend(letters)


def _records(*decisions: ReviewDecision | bytes) -> list[SinkRecord]:
    return [
        SinkRecord("reviewed", 0, i, None, d if isinstance(d, bytes) else encode(d)) for i, d in enumerate(decisions)
    ]


def _manifest(folder: Path) -> dict[str, dict]:
    """The current line per post (an append-only manifest: the latest line wins)."""
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    return {x["id"]: x for x in lines}


# -- rules ---------------------------------------------------------------------------------


def test_plan_outcomes_follow_the_rules() -> None:
    existing = {"p1": manifest_line(decision("d1", "p1"), None, revision=1)}
    batch = [
        decision("d1", "p1"),  # replay of the line's own decision
        decision("d0", "p1", decided_at="2026-11-28T09:00:00+00:00"),  # older than the line
        decision("d2", "p2", hate=SKIP, sarcasm=ESCALATE),  # labels nothing
        decision("d3", "p3"),
        decision("d4", "p3", hate=("correct", "not_hateful"), decided_at="2026-11-28T11:00:00+00:00"),
        decision("d5", "p1", hate=("correct", "not_hateful"), decided_at="2026-11-28T12:00:00Z"),
    ]
    plan = plan_batch(batch, existing)
    assert plan.outcomes == ["replayed", "superseded", "no_labels", "added", "replaced", "replaced"]
    assert {p: d.decision_id for p, d in plan.winners.items()} == {"p3": "d4", "p1": "d5"}
    assert plan.revisions == {"p3": 2, "p1": 2}


def test_a_skipped_or_escalated_task_has_a_null_label() -> None:
    line = manifest_line(decision("d1", "p1", sarcasm=ESCALATE), None, revision=1)
    assert line["labels"] == {"hate": "hateful", "sarcasm": None}
    assert line["meta"]["actions"] == {"hate": "confirm", "sarcasm": "escalate"}
    for key in ("decision_id", "reviewer", "decided_at", "model_version", "model_labels", "reasons"):
        assert key in line["meta"]


# -- the folder ------------------------------------------------------------------------------


def test_every_commit_appends_the_latest_line_wins_and_compaction_keeps_only_current_lines(tmp_path: Path) -> None:
    ds = ReviewedDataset(tmp_path, compact_min_lines=3)
    manifest = tmp_path / "manifest.jsonl"
    assert ds.commit([manifest_line(decision("d1", "p1"), None, 1)]) == (1, 0)
    assert ds.commit([manifest_line(decision("d2", "p2"), None, 1)]) == (1, 0)
    before = manifest.read_bytes()
    inode = manifest.stat().st_ino
    assert ds.commit([manifest_line(decision("d3", "p2"), None, 2)]) == (0, 1)
    assert manifest.stat().st_ino == inode and manifest.read_bytes().startswith(before), "a re-decision appends"
    examples = read_manifest(manifest, latest=True)
    assert [e.id for e in examples] == ["p1", "p2"] and examples[1].meta["decision_id"] == "d3"
    assert count_decisions(tmp_path) == 3
    with pytest.raises(ValueError, match="duplicate id"):
        read_manifest(manifest)  # a reader that ignores the append-only contract is told, not misled
    ds.close()
    reloaded = ReviewedDataset(tmp_path, compact_min_lines=3)  # the index reloads from disk
    assert reloaded.index["p2"].meta["decision_id"] == "d3" and reloaded.replaced_lines == 1
    assert "text" not in reloaded.index["p2"].meta, "the index holds no post text"
    for i in range(4, 7):  # more replaced lines than the minimum and than current ones: compacted
        reloaded.commit([manifest_line(decision(f"d{i}", "p1", decided_at=f"2026-11-29T0{i}:00:00Z"), None, i)])
    assert reloaded.compactions == 1 and manifest.stat().st_ino != inode
    assert {e.id: e.meta["decision_id"] for e in read_manifest(manifest)} == {"p1": "d6", "p2": "d3"}
    # offsets stay right after compacting: more appends, then a reload, then an erase
    reloaded.commit([manifest_line(decision("d7", "p1", decided_at="2026-11-29T07:00:00Z"), None, 7)])
    reloaded.commit([manifest_line(decision("d9", "p3"), None, 1)])
    reloaded.close()
    latest = {e.id: e.meta["decision_id"] for e in load_reviewed(tmp_path)}
    assert latest == {"p1": "d7", "p2": "d3", "p3": "d9"}
    again = ReviewedDataset(tmp_path)
    assert again.erase(["p1"]) == (1, []) and "text of p1" not in manifest.read_text()
    assert {e.id for e in load_reviewed(tmp_path)} == {"p2", "p3"}
    again.close()


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    first = ReviewedDataset(tmp_path)
    with pytest.raises(DatasetError, match="another dataset sink"):
        ReviewedDataset(tmp_path)
    first.close()
    ReviewedDataset(tmp_path).close()


def test_an_interrupted_append_is_dropped_on_start_and_ignored_by_readers(tmp_path: Path) -> None:
    ds = ReviewedDataset(tmp_path)
    ds.commit([manifest_line(decision("d1", "p1"), None, 1)])
    ds.close()
    with (tmp_path / "manifest.jsonl").open("ab") as fh:
        fh.write(b'{"id": "p2", "text": "half a li')  # kill -9 in the middle of an append
    assert [e.id for e in load_reviewed(tmp_path)] == ["p1"]
    ds = ReviewedDataset(tmp_path)
    assert list(ds.index) == ["p1"]
    assert (tmp_path / "manifest.jsonl").read_bytes().endswith(b"}\n")
    ds.close()


def test_load_reviewed_keeps_image_paths_in_the_folder_while_a_line_is_half_written(tmp_path: Path) -> None:
    ds = ReviewedDataset(tmp_path)
    ds.commit([manifest_line(decision("d1", "p1"), "media/abc.png", 1)])
    ds.close()
    with (tmp_path / "manifest.jsonl").open("ab") as fh:
        fh.write(b'{"id": "p2"')
    [example] = load_reviewed(tmp_path)
    assert example.image == tmp_path / "media" / "abc.png"
    assert load_reviewed(tmp_path / "nothing-yet") == [] and count_decisions(tmp_path / "nothing-yet") == 0


def test_a_corrupt_complete_line_is_an_error_not_silently_dropped(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text('{"id": "p1", "text": "t", "labels": {}}\nnot json\n')
    with pytest.raises(DatasetError, match="corrupt"):
        ReviewedDataset(tmp_path)


# -- the stage -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sink_takes_images_only_from_the_evidence_the_reviewer_saw(tmp_path: Path) -> None:
    red, blue, green = _png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0))
    red_hash, blue_hash, green_hash = (hashlib.sha256(x).hexdigest() for x in (red, blue, green))
    store, backend = await _store(tmp_path / "evidence", red, green)
    # green's blob overwritten with other bytes: the store must not hand them out as green
    (backend.path(green_hash)).write_bytes(blue)
    dead = FakeDeadLetters()
    ds = ReviewedDataset(tmp_path / "reviewed")
    sink = DatasetSink(ds, store, dead)
    first = decision("d1", "p1", image_url="http://m/red.png", media_hash=red_hash)
    batch = _records(
        first,
        decision("d2", "p2", image_url="http://m/red.png", media_hash=red_hash, seen=False),  # shown none
        decision("d3", "p3", image_url="http://m/blue.png", media_hash=blue_hash),  # never kept
        decision("d4", "p4", image_url="http://m/green.png", media_hash=green_hash),  # tampered blob
        decision("d5", "p5", image_url="http://m/x.png"),  # the worker read no image
        decision("d6", "p6", hate=SKIP, sarcasm=SKIP),
        b'{"v": 1, "decision_id": "bad"}',
    )
    await sink.apply(batch)
    lines = _manifest(tmp_path / "reviewed")
    assert set(lines) == {"p1", "p2", "p3", "p4", "p5"}
    assert lines["p1"]["image"] == f"media/{red_hash}.png"
    with Image.open(tmp_path / "reviewed" / lines["p1"]["image"]) as img:
        assert img.format == "PNG" and img.getpixel((0, 0)) == (255, 0, 0)
    errors = {p: (lines[p]["image"], lines[p]["meta"].get("media_error", {}).get("status")) for p in lines}
    assert errors == {
        "p1": (f"media/{red_hash}.png", None),
        "p2": (None, "not_seen"),
        "p3": (None, "missing"),
        "p4": (None, "mismatch"),
        "p5": (None, "not_scored"),
    }
    assert not (tmp_path / "reviewed" / "media" / f"{green_hash}.png").exists()
    assert [d.stage for d in dead.sent] == ["dataset_sink"]

    before = (tmp_path / "reviewed" / "manifest.jsonl").read_bytes()
    reads = backend.reads
    await sink.apply(batch)  # redelivered
    assert (tmp_path / "reviewed" / "manifest.jsonl").read_bytes() == before
    assert backend.reads == reads, "a replay read the evidence store again"

    redo = decision("d7", "p1", hate=("correct", "not_hateful"), decided_at="2026-11-28T13:00:00+00:00",
                    image_url="http://m/red.png", media_hash=red_hash)  # fmt: skip
    await sink.apply(_records(redo, decision("d8", "p1", hate=SKIP, sarcasm=SKIP, decided_at="2026-11-29T00:00:00Z")))
    lines = _manifest(tmp_path / "reviewed")
    assert lines["p1"]["labels"] == {"hate": "not_hateful", "sarcasm": "not_sarcastic"}
    assert lines["p1"]["meta"]["decision_id"] == "d7" and lines["p1"]["image"] == f"media/{red_hash}.png"
    assert backend.reads == reads, "the image already saved under its hash was read again"
    ds.close()


@pytest.mark.asyncio
async def test_an_unreachable_evidence_store_retries_the_batch(tmp_path: Path) -> None:
    red = _png((255, 0, 0))
    red_hash = hashlib.sha256(red).hexdigest()
    store, backend = await _store(tmp_path / "evidence", red)
    backend.down = True
    ds = ReviewedDataset(tmp_path / "reviewed")
    sink = DatasetSink(ds, store, FakeDeadLetters())
    with pytest.raises(TransientError) as info:
        await sink.apply(_records(decision("d1", "p1", image_url="http://m/red.png", media_hash=red_hash)))
    assert info.value.dependency == "evidence" and ds.index == {}, "a store outage made the example text-only"
    backend.down = False
    await sink.apply(_records(decision("d1", "p1", image_url="http://m/red.png", media_hash=red_hash)))
    assert ds.index["p1"].image == f"media/{red_hash}.png"
    ds.close()


@pytest.mark.asyncio
async def test_a_disk_failure_raises_so_the_batch_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = ReviewedDataset(tmp_path)
    sink = DatasetSink(ds, EvidenceStore(LocalBackend(tmp_path / "evidence")), FakeDeadLetters())

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ds, "_append", full)
    with pytest.raises(TransientError) as info:
        await sink.apply(_records(decision("d1", "p1")))
    assert info.value.dependency == "disk" and ds.index == {}
    ds.close()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"decided_at": "yesterday"}, "decided_at"),
        ({"media_hash": "../../etc/passwd"}, "media_hash"),
        ({"post_id": ""}, "post_id"),
        ({"decision_id": 5}, "decision_id"),
        ({"decisions": {}}, "decisions"),
        ({"decisions": {"hate": {"action": "confirm"}}}, "label"),
        ({"decisions": {"hate": {"action": "approve", "label": "x"}}}, "action"),
        ({"recorded_by": {"principal": "console"}}, "recorded_by"),
        ({"recorded_by": "console" * 2000}, "recorded_by"),
    ],
)
def test_malformed_decisions_name_the_field(patch: dict, field: str) -> None:
    obj = decision("d1", "p1").to_json()
    obj.update(patch)
    with pytest.raises(RecordError) as info:
        parse_decision(json.dumps(obj).encode())
    assert info.value.field == field


def test_unknown_decision_fields_are_ignored() -> None:
    obj = {**decision("d1", "p1").to_json(), "console_version": "2"}
    assert parse_decision(json.dumps(obj).encode()) == decision("d1", "p1")


def test_a_changed_resubmit_on_one_claim_wins_and_an_identical_retry_stays_one_example() -> None:
    """The console's decision ids (review.console.base.decision_id_for): one claim, a first
    submit whose Kafka outcome was unknown, then the reviewer changes a label and submits
    again. One id per claim made the sink call the second a replay and keep the first labels."""
    from review.console.base import decision_id_for

    scope = "1700000000000-0:alice:1"
    first = {"hate": ("confirm", None), "sarcasm": ("not_violating", None)}
    changed = {"hate": ("correct", "not_hateful"), "sarcasm": ("not_violating", None)}
    id1, id2 = decision_id_for(scope, first, None), decision_id_for(scope, changed, None)
    assert id1 == decision_id_for(scope, dict(reversed(list(first.items()))), None)  # same content, same id
    assert id1 != id2 and id1 != decision_id_for(scope, first, "a note") != decision_id_for(
        "other:alice:1", first, None
    )
    batch = [
        decision(id1, "p1", decided_at="2026-11-28T10:00:00+00:00"),
        decision(id1, "p1", decided_at="2026-11-28T10:00:01+00:00"),  # the identical retry
        decision(id2, "p1", hate=("correct", "not_hateful"), decided_at="2026-11-28T10:00:05+00:00"),
    ]
    plan = plan_batch(batch, {})
    assert plan.outcomes == ["added", "replayed", "replaced"]
    assert plan.winners["p1"].decision_id == id2
    assert plan.winners["p1"].training_labels()["hate"] == "not_hateful"


@pytest.mark.asyncio
async def test_a_tombstone_erases_the_post_where_it_stands_in_the_batch(tmp_path: Path) -> None:
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    red_hash, blue_hash = (hashlib.sha256(x).hexdigest() for x in (red, blue))
    store, _ = await _store(tmp_path / "evidence", red, blue)
    ds = ReviewedDataset(tmp_path / "reviewed")
    sink = DatasetSink(ds, store, FakeDeadLetters())
    shared = decision("d1", "p1", image_url="http://m/r.png", media_hash=red_hash)
    same_image = decision("d2", "p2", image_url="http://m/r2.png", media_hash=red_hash)
    alone = decision("d3", "p3", image_url="http://m/b.png", media_hash=blue_hash)
    tomb = [SinkRecord("reviewed", 0, 9, b"p1", None), SinkRecord("reviewed", 0, 10, b"p3", None)]
    again = decision("d4", "p3", image_url="http://m/b.png", media_hash=blue_hash, decided_at="2026-12-01T00:00:00Z")
    await sink.apply([*_records(shared, same_image, alone), *tomb])
    lines = _manifest(tmp_path / "reviewed")
    assert set(lines) == {"p2"}
    assert "text of p1" not in (tmp_path / "reviewed" / "manifest.jsonl").read_text()
    assert (tmp_path / "reviewed" / "media" / f"{red_hash}.png").is_file(), "an image another line uses was deleted"
    assert not (tmp_path / "reviewed" / "media" / f"{blue_hash}.png").exists()
    # A decision after the tombstone (a re-decision) counts again; a tombstone for nothing is a no-op.
    await sink.apply([*_records(again), SinkRecord("reviewed", 0, 11, b"nobody", None)])
    assert set(_manifest(tmp_path / "reviewed")) == {"p2", "p3"}
    ds.close()


def test_erasing_a_post_removes_the_images_of_its_earlier_lines_too(tmp_path: Path) -> None:
    ds = ReviewedDataset(tmp_path)
    media = tmp_path / "media"
    (media / "old.png").write_bytes(b"x")
    (media / "shared.png").write_bytes(b"y")
    ds.commit([manifest_line(decision("d1", "p1"), "media/old.png", 1)])  # later re-decided text-only
    ds.commit([manifest_line(decision("d2", "p1", decided_at="2026-11-29T00:00:00Z"), None, 2)])
    ds.commit([manifest_line(decision("d3", "p2"), "media/shared.png", 1)])
    ds.commit([manifest_line(decision("d4", "p1", decided_at="2026-11-30T00:00:00Z"), "media/shared.png", 3)])
    assert ds.erase(["p1"]) == (1, ["media/old.png"])
    assert not (media / "old.png").exists() and (media / "shared.png").exists(), "p2 still uses shared.png"
    assert "text of p1" not in (tmp_path / "manifest.jsonl").read_text()
    ds.close()
