"""Retention and erasure against the real broker and redis-server.

Retention trims only finished review items (never a pending or undelivered one), drops old
review dead letters, keeps every open escalation, and expires evidence blobs no remaining
item needs. `modstream purge --post ID` removes a post's text and bytes from Redis, the
evidence store and (through a tombstone the real dataset sink applies) the reviewed dataset,
and records the act on the audit topic."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from PIL import Image

from modstream.records import ReviewDecision, ReviewItem, TaskDecision, encode
from review.queue import ReviewQueue
from review.retention import apply_retention
from stream.evidence import EvidenceStore, LocalBackend
from stream.redis_store import RedisStore
from tests.integration.sink_harness import SinkProcess, wait_caught_up
from tests.integration.stack import REPO_ROOT, LocalStack
from tests.integration.worker_harness import collect, produce

REDIS_DB = 11  # this module's review streams, apart from the other tests' databases
TASKS = {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 40 % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _item(post_id: str, text: str, digest: str | None) -> ReviewItem:
    media = {"status": "ok" if digest else "none", "url": "https://example.invalid/x.png" if digest else None,
             "content_hash": digest, "reason": None}  # fmt: skip
    label = {"v": 1, "post_id": post_id, "labels": {"hate": {"label": "hateful", "score": 0.7, "decision": True,
             "threshold": 0.5}}, "itm_match": 0.1, "route": "review", "reasons": ["weak_image_text_match"],
             "media": media, "model_version": "v0001"}  # fmt: skip
    return ReviewItem(post_id, text, media["url"], ["weak_image_text_match"], label, tasks=TASKS)


@pytest.fixture
def redis_url(stack: LocalStack) -> str:
    url = f"redis://127.0.0.1:{stack.redis_port}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


async def _enqueue(url: str, items: list[ReviewItem]) -> None:
    store = RedisStore(url)
    try:
        assert all(await store.enqueue_review_many(items))
    finally:
        await store.close()


def test_retention_trims_finished_items_only_and_keeps_the_evidence_still_needed(
    redis_url: str, tmp_path: Path
) -> None:
    blobs = {f"p{i}": _png(i) for i in range(7)}
    digests = {p: hashlib.sha256(b).hexdigest() for p, b in blobs.items()}
    store = EvidenceStore(LocalBackend(tmp_path / "evidence"))

    async def scenario() -> tuple[Any, dict[str, list[str]], list[str]]:
        for p, b in blobs.items():
            await store.put(digests[p], b)
        # p0, p1 decided; p2 escalated; p3 dead-lettered; p4 claimed (pending); p5, p6 never delivered.
        await _enqueue(redis_url, [_item(p, f"text of {p}", digests[p]) for p in blobs])
        queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
        try:
            await queue.ensure_group()
            for post_id in ("p0", "p1"):
                claim = await queue.claim("alice")
                assert claim is not None and claim.item.post_id == post_id
                await queue.complete(claim.entry_id, post_id, "alice", f"d-{post_id}")
            escalated = await queue.claim("bob")
            assert escalated is not None and escalated.item.post_id == "p2"
            await queue.escalate(escalated.entry_id, "bob", "d-p2", "legal")
            await queue.complete(escalated.entry_id, "p2", "bob", "d-p2")
            doomed = await queue.claim("carol")
            assert doomed is not None and doomed.item.post_id == "p3"
            # What the claim path does to an item past its deliveries (XADD dead + XACK).
            fields = {"post_id": "p3", "item": encode(doomed.item).decode()}
            await queue._dead_letter(doomed.entry_id, fields, 9, "test")
            assert [d["post_id"] for d in await queue.dead_letters()] == ["p3"]
            pending = await queue.claim("dave")
            assert pending is not None and pending.item.post_id == "p4"
            later = time.time() + 10 * 86400  # everything is "old" by then
            report = await apply_retention(queue, store, max_age_s=86400, now=later)
            left = {
                key: [f.get("post_id", "") for _, f in await queue._range(key, "-", "+")]
                for key in (queue.stream, queue.escalated_stream, queue.dead)
            }
            kept = [p for p in blobs if (await store.get(digests[p])).ok]
            return report, left, kept
        finally:
            await queue.client.aclose()

    report, left, kept = asyncio.run(scenario())
    assert left["modstream:review"] == ["p4", "p5", "p6"], left  # pending and undelivered stay
    assert report.review_trimmed == 4
    assert left["modstream:review:escalated"] == ["p2"] and report.escalated_older == 1
    assert left["modstream:review:dead"] == [] and report.dead_trimmed == 1
    assert sorted(kept) == ["p2", "p4", "p5", "p6"], "evidence of a finished item survived, or a needed one went"
    assert report.blobs_expired == 3 and report.blobs_kept == 4


def test_retention_on_a_young_queue_trims_nothing(redis_url: str, tmp_path: Path) -> None:
    async def scenario() -> Any:
        await _enqueue(redis_url, [_item("young", "fresh text", None)])
        queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
        try:
            await queue.ensure_group()
            claim = await queue.claim("alice")
            assert claim is not None
            await queue.complete(claim.entry_id, "young", "alice", "d-young")
            return await apply_retention(queue, None, max_age_s=3600)
        finally:
            await queue.client.aclose()

    report = asyncio.run(scenario())
    assert report.review_trimmed == 0 and report.dead_trimmed == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modstream.cli", *args], cwd=REPO_ROOT, text=True, capture_output=True, timeout=180
    )


def test_purge_erases_a_post_from_redis_the_evidence_store_and_the_reviewed_dataset(
    stack: LocalStack, redis_url: str, tmp_path: Path
) -> None:
    run = tmp_path.name[-8:].replace("_", "")
    post_id, other = f"purge-{run}", f"keep-{run}"
    secret = f"PERSONAL TEXT {run} of a poster who asked to be forgotten"
    image, other_image = _png(1), _png(2)
    digest, other_digest = hashlib.sha256(image).hexdigest(), hashlib.sha256(other_image).hexdigest()
    evidence, reviewed = tmp_path / "evidence", tmp_path / "reviewed"
    LocalBackend(evidence).put(digest, image)
    LocalBackend(evidence).put(other_digest, other_image)

    def decision(pid: str, text: str, h: str) -> ReviewDecision:
        return ReviewDecision(
            decision_id=f"d-{pid}", post_id=pid, reviewer="alice",
            decisions={"hate": TaskDecision("confirm", "hateful"), "sarcasm": TaskDecision("confirm", "sarcastic")},
            model_version="v0001", model_labels={}, text=text, image_url="https://example.invalid/x.png",
            media_hash=h, seen_media_hash=h,
        )  # fmt: skip

    group = f"it-purge-{run}"
    sink = SinkProcess("dataset-sink", ["--bootstrap", stack.bootstrap, "--group", group, "--out", str(reviewed),
                                        "--evidence", str(evidence)], tmp_path, "purge-dsink")  # fmt: skip
    sink.start()
    try:
        values = [encode(decision(post_id, secret, digest)), encode(decision(other, "keep me", other_digest))]
        asyncio.run(produce(stack.bootstrap, "reviewed", values, [post_id.encode(), other.encode()]))
        wait_caught_up(stack.bootstrap, group, "reviewed", timeout=120, sink=sink)
        manifest = reviewed / "manifest.jsonl"
        assert secret in manifest.read_text() and (reviewed / "media" / f"{digest}.png").is_file()

        # The post is also still in the review queue (escalated by a second reviewer).
        asyncio.run(_enqueue(redis_url, [_item(post_id, secret, digest)]))

        async def escalate() -> None:
            queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
            try:
                await queue.ensure_group()
                claim = await queue.claim("bob")
                assert claim is not None and claim.item.post_id == post_id
                await queue.escalate(claim.entry_id, "bob", "d2", "check")
            finally:
                await queue.client.aclose()

        asyncio.run(escalate())
        done = _cli("purge", "--post", post_id, "--redis", redis_url, "--bootstrap", stack.bootstrap,
                    "--evidence", str(evidence), "--dataset", str(reviewed))  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["tombstone_sent"] and digest in report["blobs_deleted"]
        assert report["review_entries"] and report["escalated_entries"]
        wait_caught_up(stack.bootstrap, group, "reviewed", timeout=120, sink=sink)
        erased = sink.metric("modstream_sink_records_total", sink="dataset", outcome="erased")
    finally:
        assert sink.stop() == 0, sink.log_tail()

    # Redis: the text is in no key of the database.
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter():
            kind = client.type(key).decode()
            if kind == "stream":
                dumped = json.dumps([(i.decode(), {k.decode(): v.decode() for k, v in f.items()})
                                     for i, f in client.xrange(key)])  # fmt: skip
            elif kind == "string":
                dumped = (client.get(key) or b"").decode(errors="replace")
            else:
                continue
            assert secret not in dumped, f"{key!r} still holds the post's text"
    finally:
        client.close()
    # The evidence store: its bytes are gone; the other post's stay.
    assert not LocalBackend(evidence).path(digest).exists()
    assert LocalBackend(evidence).path(other_digest).exists()
    # The dataset: no line, no text anywhere in the manifest, no image file; the other post intact.
    assert erased == 1
    text = (reviewed / "manifest.jsonl").read_text()
    assert secret not in text and post_id not in text and other in text
    assert not (reviewed / "media" / f"{digest}.png").exists()
    assert (reviewed / "media" / f"{other_digest}.png").is_file()
    # Recorded first, with ids only.
    records = asyncio.run(collect(stack.bootstrap, "audit", lambda r: len(r) >= 1, 30,
                                  lambda r: r.get("subject") == post_id))  # fmt: skip
    assert [r["action"] for r in records] == ["post_purged"] and secret not in json.dumps(records)


def test_purge_refuses_a_hostile_post_id_or_hash_before_touching_anything(tmp_path: Path) -> None:
    for args in (
        ["--post", "a\nforged"],
        ["--post", " "],
        ["--post", "x" * 300],
        ["--post", "p", "--media-hash", "../x"],
    ):
        done = _cli("purge", *args, "--bootstrap", "127.0.0.1:9", "--evidence", str(tmp_path / "ev"))
        assert done.returncode == 2 and "error:" in done.stderr, (args, done.stderr)
    assert not (tmp_path / "ev").exists()


def test_the_retention_command_reports_and_is_audited_first(stack: LocalStack, redis_url: str, tmp_path: Path) -> None:
    done = _cli("retention", "--max-age", "7d", "--evidence-max-age", "2d", "--redis", redis_url,
                "--bootstrap", stack.bootstrap, "--evidence", str(tmp_path / "ev"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["review_trimmed"] == 0
    records = asyncio.run(collect(stack.bootstrap, "audit", lambda r: any(
        x["detail"].get("evidence_max_age_s") == 172800 for x in r), 30,
        lambda r: r.get("action") == "retention_applied"))  # fmt: skip
    assert any(r["detail"] == {"max_age_s": 604800, "evidence_max_age_s": 172800} for r in records), records
    refused = _cli("retention", "--max-age", "0", "--bootstrap", stack.bootstrap)
    assert refused.returncode == 2 and "positive duration" in refused.stderr


def test_purge_keeps_bytes_another_post_still_needs_until_that_one_goes_too(
    stack: LocalStack, redis_url: str, tmp_path: Path
) -> None:
    run = tmp_path.name[-8:].replace("_", "")
    image = _png(7)
    digest = hashlib.sha256(image).hexdigest()
    evidence = tmp_path / "evidence"
    LocalBackend(evidence).put(digest, image)
    first, twin = f"meme-{run}-a", f"meme-{run}-b"  # one meme, posted twice
    asyncio.run(_enqueue(redis_url, [_item(first, "first copy", digest), _item(twin, "second copy", digest)]))
    common = ["--redis", redis_url, "--bootstrap", stack.bootstrap, "--evidence", str(evidence),
              "--dataset", str(tmp_path / "none")]  # fmt: skip
    done = _cli("purge", "--post", first, *common)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["blobs_shared"] == [digest] and report["blobs_deleted"] == []
    assert LocalBackend(evidence).path(digest).exists(), "the twin's reviewer would see 'media unavailable'"
    done = _cli("purge", "--post", twin, *common)
    assert done.returncode == 0 and json.loads(done.stdout)["blobs_deleted"] == [digest], done.stdout
    assert not LocalBackend(evidence).path(digest).exists()
