"""The worker against the real broker and redis-server: nothing lost, bad input dead-lettered,
crashes and outages survived. Post ids carry a per-test prefix because topics are shared."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modstream.records import encode
from stream.producer import synthetic_posts
from tests.integration.sink_harness import SinkProcess, stream_post_ids, wait_caught_up
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import REPO_ROOT, Worker, collect, produce


@pytest.fixture(scope="module")
def worker(stack: LocalStack, registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # A fifth of the model-labelled posts go to review as blind audit items (the development key).
    w = Worker(stack, registry, tmp_path_factory.mktemp("logs"), app_id="it-worker", extra_args=["--audit-rate", "0.2"])
    w.start()
    try:
        yield w
    finally:
        w.stop()


def _posts(prefix: str, n: int, media: tuple[str, list]) -> list[bytes]:
    url, examples = media
    return [encode(p) for p in synthetic_posts(examples, url, n, prefix=prefix)]


def _labels(stack: LocalStack, prefix: str, want: int, timeout: float) -> list[dict]:
    def done(records: list[dict]) -> bool:
        return len({r["post_id"] for r in records}) >= want

    return asyncio.run(collect(stack.bootstrap, "labels", done, timeout, lambda r: r["post_id"].startswith(prefix)))


def test_every_post_gets_exactly_one_label(stack: LocalStack, worker: Worker, media: tuple[str, list]) -> None:
    n = 2000
    asyncio.run(produce(stack.bootstrap, "posts", _posts("bulk-", n, media)))
    labels = _labels(stack, "bulk-", n, timeout=300)
    ids = Counter(r["post_id"] for r in labels)
    assert len(ids) == n, f"{n - len(ids)} posts have no label:\n{worker.log_tail()}"
    assert max(ids.values()) == 1, "a post was labelled twice without any crash"
    assert all(r["model_version"] == "v0001" for r in labels)
    assert all(r["media"]["status"] == "ok" for r in labels)
    assert {r["route"] for r in labels} <= {"auto", "review"}
    assert worker.alive
    text = worker.metrics()
    assert "modstream_posts_total" in text and 'modstream_model_info{version="v0001"}' in text


def test_blind_audit_items_are_exactly_the_keyed_share_of_all_model_labelled_posts(
    stack: LocalStack, worker: Worker, media: tuple[str, list]
) -> None:
    """The audit is drawn from every post the model labels, before routing: a routed post the
    keyed hash picks is reviewed once, as `audit` (routed_by_policy true), and its label keeps
    route review; the other routed posts are `routed` items; no post has two items."""
    from stream.audit_sampling import AuditSampler

    n = 400
    asyncio.run(produce(stack.bootstrap, "posts", _posts("audit-", n, media)))
    labels = {r["post_id"]: r for r in _labels(stack, "audit-", n, timeout=240)}
    auto = {p for p, r in labels.items() if r["route"] == "auto"}
    routed = {p for p, r in labels.items() if r["route"] == "review"}
    assert auto | routed == set(labels), "no bank matches here: every post is model-labelled"
    expected = {p for p in labels if AuditSampler(0.2, None).picks(p)}

    def done(records: list[dict]) -> bool:
        return {r["post_id"] for r in records} >= expected | routed

    def mine(record: dict) -> bool:  # other tests write malformed records to `review` on purpose
        return isinstance(record, dict) and str(record.get("post_id", "")).startswith("audit-")

    items = asyncio.run(collect(stack.bootstrap, "review", done, 120, mine))
    per_post = Counter(r["post_id"] for r in items)
    assert max(per_post.values()) == 1, "one review item per post, never a routed and an audit one"
    audited = {r["post_id"] for r in items if r.get("kind") == "audit"}
    assert audited == expected, "audit items are the keyed choice among all model-labelled posts, no more, no less"
    assert 0.1 * n < len(audited) < 0.3 * n, (len(audited), n)
    assert audited & routed, (
        f"no routed post among {len(audited)} audited ({len(routed)} routed): the test proves nothing"
    )
    assert {r["post_id"] for r in items if r.get("kind", "routed") == "routed"} == routed - audited
    for r in items:
        if r.get("kind") == "audit":
            assert r["reasons"] == ["audit"] and r["routed_by_policy"] is (r["post_id"] in routed)
        else:
            assert r["routed_by_policy"] is True
    assert all(labels[p]["route"] == "review" for p in audited & routed), "the label stays honest: in review"


def test_malformed_and_invalid_posts_go_to_the_dead_letter_topic(stack: LocalStack, worker: Worker) -> None:
    run = uuid.uuid4().hex[:8]  # posts.dlq is shared with other tests: this run's records only
    bad = [
        b'{"id": "dlq-%s-1", "text": ' % run.encode(),  # truncated JSON
        b'{"id": "dlq-%s-2"}' % run.encode(),  # no text
        b'{"id": "dlq-%s-3", "text": "x", "image_urls": "not-a-list"}' % run.encode(),
        b"\xff\xfe\x00garbage-%s" % run.encode(),
    ]
    asyncio.run(produce(stack.bootstrap, "posts", bad))

    def done(records: list[dict]) -> bool:
        return len(records) >= 4

    def mine(record: dict) -> bool:
        return run in record["raw"]

    dead = asyncio.run(collect(stack.bootstrap, "posts.dlq", done, 60, mine))
    assert len(dead) == 4, worker.log_tail()
    assert {d["stage"] for d in dead} == {"parse"}
    by_id = {d["raw"].split(run)[1][:2]: d for d in dead}  # "-1", "-2", "-3" and the garbage
    assert by_id["-1"]["reason"].startswith("record: invalid JSON")  # truncated: no id to salvage
    assert by_id["-2"]["reason"].startswith("text:") and by_id["-3"]["reason"].startswith("image_urls:")
    assert {by_id["-2"]["post_id"], by_id["-3"]["post_id"]} == {f"dlq-{run}-2", f"dlq-{run}-3"}
    assert worker.alive


def test_hostile_posts_each_get_one_outcome_and_the_posts_after_them_flow(
    stack: LocalStack, worker: Worker, media: tuple[str, list]
) -> None:
    """The issue's reproduction: a 10,000-deep post made the agent crash past its ack (the 10
    posts around it vanished); a 250 KB invalid-UTF-8 post and a 5 MB gzip-compressed one made
    dead letters over the producer's limit, retried forever. One partition (one key), in order."""
    run = uuid.uuid4().hex[:8]
    good = _posts(f"hostile-{run}-good", 20, media)
    hostile = {
        "deep": b'{"id":"hostile-%s-deep","text":' % run.encode() + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "utf8": b'{"id":"hostile-%s-utf8","text":"' % run.encode() + b"\xff\xfe" * 125_000 + b'"}',
        "huge": json.dumps({"id": f"hostile-{run}-huge", "text": "a" * 5_000_000}).encode(),
    }
    values = [*good[:10], *hostile.values(), *good[10:]]
    started = time.monotonic()
    # gzip: the broker takes the 5 MB post (a few KB compressed); the producer's own limit is raised for it.
    asyncio.run(
        produce(
            stack.bootstrap,
            "posts",
            values,
            keys=[f"hostile-{run}".encode()] * len(values),
            compression_type="gzip",
            max_request_size=8 * 1024 * 1024,
        )
    )
    labels = _labels(stack, f"hostile-{run}-good", 20, timeout=90)
    elapsed = time.monotonic() - started

    def dead_done(records: list[dict]) -> bool:
        return len(records) >= 3

    dead = asyncio.run(collect(stack.bootstrap, "posts.dlq", dead_done, 60, lambda r: f"hostile-{run}-" in r["raw"]))
    ids = Counter(r["post_id"] for r in labels)
    assert len(ids) == 20 and max(ids.values()) == 1, worker.log_tail()
    assert len(dead) == 3, worker.log_tail()
    by_kind = {kind: d for d in dead for kind in hostile if f"hostile-{run}-{kind}" in d["raw"][:200]}
    assert set(by_kind) == set(hostile)
    assert all(d["stage"] == "parse" for d in dead)
    assert "depth limit" in by_kind["deep"]["reason"] and not by_kind["deep"]["raw_truncated"]
    assert by_kind["utf8"]["reason"].startswith("record: not UTF-8") and by_kind["utf8"]["raw_truncated"]
    assert by_kind["huge"]["raw_truncated"] and by_kind["huge"]["raw_bytes"] == len(hostile["huge"])
    assert all(len(json.dumps(d).encode()) < 1_000_000 for d in dead)
    assert elapsed < 60, f"the posts after the hostile ones took {elapsed:.0f} s"
    assert worker.alive


def test_hostile_media_yields_media_status_and_the_worker_stays_up(
    stack: LocalStack, worker: Worker, media: tuple[str, list]
) -> None:
    url, _ = media
    cases = {
        "media-404": f"{url}/does-not-exist.png",
        "media-blocked": "http://10.0.0.1/x.png",  # private address: refused before connecting
        "media-scheme": "file:///etc/passwd",
        "media-meta": "http://169.254.169.254/latest/meta-data",
    }
    posts = [json.dumps({"id": pid, "text": "look at this", "image_urls": [u]}).encode() for pid, u in cases.items()]
    asyncio.run(produce(stack.bootstrap, "posts", posts))
    labels = {r["post_id"]: r for r in _labels(stack, "media-", len(cases), timeout=60)}
    assert set(labels) == set(cases), worker.log_tail()
    assert labels["media-404"]["media"]["status"] == "http_error"
    assert labels["media-blocked"]["media"]["status"] == "blocked_address"
    assert labels["media-scheme"]["media"]["status"] == "blocked_scheme"
    assert labels["media-meta"]["media"]["status"] == "blocked_address"
    assert all(r["itm_match"] is None for r in labels.values())  # classified text-only
    assert worker.alive


def test_kill_9_mid_stream_loses_nothing(
    stack: LocalStack, registry: Path, media: tuple[str, list], tmp_path: Path
) -> None:
    crashy = Worker(stack, registry, tmp_path, app_id="it-crash", max_batch=32)
    n = 1500
    crashy.start()
    try:
        asyncio.run(produce(stack.bootstrap, "posts", _posts("crash-", n, media)))
        # Let it label part of the stream, then kill it without any chance to clean up.
        partial = _labels(stack, "crash-", 300, timeout=120)
        assert len({r["post_id"] for r in partial}) >= 300, crashy.log_tail()
        crashy.kill9()
        crashy.start()
        labels = _labels(stack, "crash-", n, timeout=300)
    finally:
        crashy.stop()
    ids = Counter(r["post_id"] for r in labels)
    assert len(ids) == n, f"{n - len(ids)} posts lost after kill -9:\n{crashy.log_tail()}"
    duplicates = [pid for pid, count in ids.items() if count > 1]
    # At-least-once: only what was in flight (uncommitted) is redone, at most a few batches.
    assert len(duplicates) <= 4 * crashy.max_batch, f"{len(duplicates)} duplicates"
    by_id: dict[str, list[dict]] = {}
    for r in labels:
        by_id.setdefault(r["post_id"], []).append(r)
    for pid in duplicates:
        first, *rest = by_id[pid]
        for other in rest:  # same model, same input: same content (timings aside)
            assert other["labels"] == first["labels"] and other["route"] == first["route"]


def test_model_update_switches_versions_without_losing_posts_and_follows_current(
    stack: LocalStack, worker: Worker, registry: Path, media: tuple[str, list]
) -> None:
    """A promotion (CURRENT moves, then its update), then a stale update naming the old
    version (two retrain runs' messages, reordered): the worker serves CURRENT and the late
    update brings nothing back. Then a rollback with `modstream models --set-current`, which
    publishes it: the worker returns to v0001. No post is lost or labelled twice."""
    from models.card import ModelCard
    from models.registry import ModelRegistry
    from modstream.records import ModelUpdate
    from tests.tiny import tiny_model

    model, tokenizer = tiny_model(seed=1)
    card = ModelCard(
        config=model.config, itm={"trained": True, "auroc": 0.9, "routing_lift": {"hate": 1.5}, "threshold": 0.5}
    )
    new_version = ModelRegistry(registry).save(model, tokenizer, card, make_current=True)
    values = _posts("swap-", 400, media)
    asyncio.run(produce(stack.bootstrap, "posts", values[:200]))
    updates = [encode(ModelUpdate(new_version, "v0001")), encode(ModelUpdate("v0001", None, "retrain"))]
    asyncio.run(produce(stack.bootstrap, "model-updates", updates, keys=[b"current", b"current"]))
    _labels(stack, "swap-", 200, timeout=120)
    deadline = time.monotonic() + 60
    while f'modstream_model_info{{version="{new_version}"}}' not in worker.metrics() and time.monotonic() < deadline:
        time.sleep(0.5)
    asyncio.run(produce(stack.bootstrap, "posts", values[200:]))
    labels = _labels(stack, "swap-", 400, timeout=120)
    ids = Counter(r["post_id"] for r in labels)
    assert len(ids) == 400 and max(ids.values()) == 1, worker.log_tail()
    late = [r for r in labels if int(r["post_id"].split("-")[-1]) >= 200]
    assert {r["model_version"] for r in late} == {new_version}, "a stale update brought an older model back"
    assert {r["model_version"] for r in labels} <= {"v0001", new_version}

    rollback = subprocess.run(
        [sys.executable, "-m", "modstream", "models", "--registry", str(registry), "--set-current", "v0001",
         "--bootstrap", stack.bootstrap],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert rollback.returncode == 0, rollback.stderr
    deadline = time.monotonic() + 60
    while 'modstream_model_info{version="v0001"}' not in worker.metrics() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert 'modstream_model_info{version="v0001"}' in worker.metrics(), worker.log_tail()


def _produce_in_background(stack: LocalStack, values: list[bytes], rate: float) -> Any:
    import threading

    def run() -> None:
        for start in range(0, len(values), 10):
            deadline = time.monotonic() + 10 / rate
            while True:  # the broker may be down: keep the posts until it takes them
                try:
                    asyncio.run(produce(stack.bootstrap, "posts", values[start : start + 10]))
                    break
                except Exception:
                    time.sleep(1)
            time.sleep(max(0.0, deadline - time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_worker_rides_out_broker_and_redis_outages(
    stack: LocalStack, worker: Worker, media: tuple[str, list], tmp_path: Path
) -> None:
    # Review items reach Redis through the review sink (the worker only writes the topic);
    # it rides out the same outages. Its own Redis database keeps its stream apart.
    sink = SinkProcess("review-sink", ["--bootstrap", stack.bootstrap, "--redis", f"redis://127.0.0.1:{stack.redis_port}/3",
                                       "--group", "it-outage-sink"], tmp_path, "outage-sink")  # fmt: skip
    sink.start()
    n = 900
    try:
        producer = _produce_in_background(stack, _posts("outage-", n, media), rate=10)
        _labels(stack, "outage-", 50, timeout=120)
        stack.stop_redis()
        time.sleep(30)
        stack.start_redis()
        stack.stop_kafka()
        time.sleep(20)
        stack.start_kafka()
        producer.join(timeout=240)
        labels = _labels(stack, "outage-", n, timeout=300)
        assert len({r["post_id"] for r in labels}) == n, worker.log_tail()
        assert worker.alive
        wait_caught_up(stack.bootstrap, "it-outage-sink", "review", timeout=180, sink=sink)
        assert sink.alive
    finally:
        sink.stop()
    review_ids = {r["post_id"] for r in labels if r["route"] == "review"}
    queued = stream_post_ids(stack.redis_port, 3)
    assert review_ids and review_ids <= set(queued), f"{len(review_ids - set(queued))} review items never reached Redis"
    assert max(queued.values()) == 1
