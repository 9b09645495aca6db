"""The review sink against the real broker and redis-server, as a real subprocess next to a
real worker: the Redis review stream ends up holding every post of the `review` topic
exactly once, through a Redis outage and kill -9 of both processes.

Each test writes its own Redis database (the stream key is the shared `modstream:review`),
so the stream holds only what this test's sink wrote, while the `review` topic is shared
by the whole session: a sink group copies all of it, which is what is compared."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from modstream.records import RecordError, encode
from review.review_sink import parse_review_item
from stream.producer import synthetic_posts
from tests.integration.sink_harness import (
    SinkProcess,
    commit_to_end,
    read_topic,
    stream_post_ids,
    wait_caught_up,
)
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import Worker, collect, produce


def review_sink(stack: LocalStack, log_dir: Path, group: str, db: int) -> SinkProcess:
    args = ["--bootstrap", stack.bootstrap, "--redis", f"redis://127.0.0.1:{stack.redis_port}/{db}", "--group", group]
    return SinkProcess("review-sink", args, log_dir, group)


def topic_post_ids(stack: LocalStack) -> set[str]:
    """Post ids of the valid review items on the `review` topic (malformed ones are dead-lettered)."""
    ids = set()
    for _, value in asyncio.run(read_topic(stack.bootstrap, "review")):
        with contextlib.suppress(RecordError):
            ids.add(parse_review_item(value).post_id)
    return ids


def _label_count(stack: LocalStack, prefix: str, want: int, timeout: float) -> int:
    def done(records: list[dict]) -> bool:
        return len({r["post_id"] for r in records}) >= want

    labels = asyncio.run(collect(stack.bootstrap, "labels", done, timeout, lambda r: r["post_id"].startswith(prefix)))
    return len({r["post_id"] for r in labels})


def test_review_stream_holds_every_review_item_once_through_redis_outage_and_kill_9(
    stack: LocalStack, registry: Path, media: tuple[str, list], tmp_path: Path
) -> None:
    url, examples = media
    posts = [encode(p) for p in synthetic_posts(examples, url, 400, prefix="rsink")]
    worker = Worker(stack, registry, tmp_path, app_id="it-rsink-worker")
    sink = review_sink(stack, tmp_path, "it-rsink", db=1)
    # The worker labels only this test's posts; the sink copies the whole review topic.
    asyncio.run(commit_to_end(stack.bootstrap, "it-rsink-worker", "posts"))
    worker.start()
    sink.start()
    try:
        asyncio.run(produce(stack.bootstrap, "posts", posts[:100]))
        assert _label_count(stack, "rsink-", 100, timeout=300) == 100, worker.log_tail()
        deadline = time.monotonic() + 60
        while not any(p.startswith("rsink-") for p in stream_post_ids(stack.redis_port, 1)):
            assert time.monotonic() < deadline, f"the sink wrote nothing to Redis:\n{sink.log_tail()}"
            time.sleep(0.5)

        stack.stop_redis()
        # The worker goes on labelling without Redis and sends review items to the topic,
        # while the sink is stuck on Redis, retrying the same batch. Wait until the worker
        # has committed these posts, so no restart of it can send their review items again:
        # only the sink can get them into Redis.
        asyncio.run(produce(stack.bootstrap, "posts", posts[100:300]))
        assert _label_count(stack, "rsink-", 300, timeout=120) == 300, worker.log_tail()
        wait_caught_up(stack.bootstrap, "it-rsink-worker", "posts", timeout=60)
        deadline = time.monotonic() + 60
        while sink.metric("modstream_dependency_errors_total", dependency="redis") == 0:
            assert time.monotonic() < deadline, f"the sink never noticed Redis was down:\n{sink.log_tail()}"
            time.sleep(0.5)
        assert sink.metric("modstream_sink_blocked", sink="review") == 1
        # More posts, and both processes killed while the worker is in the middle of them
        # (its uncommitted posts are labelled again: their review items reach the topic twice).
        asyncio.run(produce(stack.bootstrap, "posts", posts[300:]))
        _label_count(stack, "rsink-", 330, timeout=120)
        sink.kill9()
        worker.kill9()
        stack.start_redis()
        worker.start()
        sink.start()

        assert _label_count(stack, "rsink-", 400, timeout=300) == 400, worker.log_tail()
        wait_caught_up(stack.bootstrap, "it-rsink", "review", timeout=120, sink=sink)
        on_topic = topic_post_ids(stack)
        in_stream = stream_post_ids(stack.redis_port, 1)
    finally:
        worker.stop()
        exit_code = sink.stop()
    assert any(p.startswith("rsink-") for p in on_topic), "the tiny model routed nothing to review"
    duplicates = {p: n for p, n in in_stream.items() if n > 1}
    assert not duplicates, f"posts queued more than once: {duplicates}"
    assert on_topic - set(in_stream) == set(), f"{len(on_topic - set(in_stream))} review items never reached Redis"
    assert set(in_stream) - on_topic == set(), "the stream holds posts that are not on the review topic"
    assert exit_code == 0, f"SIGTERM did not stop the sink cleanly:\n{sink.log_tail()}"


def test_malformed_review_records_are_dead_lettered_and_the_rest_queued(stack: LocalStack, tmp_path: Path) -> None:
    item = {"v": 1, "post_id": "rsink-bad-ok", "text": "fine", "image_url": None, "reasons": ["itm_low"], "label": {}}
    values = [b'{"post_id": "rsink-bad-1", "text": ', json.dumps(item).encode(), b'{"v": 1, "post_id": 7}']
    asyncio.run(produce(stack.bootstrap, "review", values, keys=[b"rsink-bad-1", b"rsink-bad-ok", b"rsink-bad-3"]))
    sink = review_sink(stack, tmp_path, "it-rsink-dlq", db=2)
    sink.start()
    try:
        wait_caught_up(stack.bootstrap, "it-rsink-dlq", "review", timeout=120, sink=sink)
        dead_letters = sink.metric("modstream_dead_letters_total", stage="review_sink")
    finally:
        sink.stop()
    assert "rsink-bad-ok" in stream_post_ids(stack.redis_port, 2)

    def mine(record: dict) -> bool:
        return record.get("stage") == "review_sink" and (record.get("post_id") or "").startswith("rsink-bad-")

    dead = asyncio.run(collect(stack.bootstrap, "posts.dlq", lambda r: len(r) >= 2, 60, mine))
    assert {d["post_id"] for d in dead} == {"rsink-bad-1", "rsink-bad-3"}
    assert dead_letters >= 2
    assert all(d["raw"] and d["reason"] for d in dead)
