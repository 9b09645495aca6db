"""The whole human loop on the real broker and redis-server, every role a real process:

worker -> `review` topic -> review sink -> Redis stream -> console (a scripted reviewer on
the JSON API) -> `reviewed` topic -> dataset sink -> reviewed manifest -> retrain (gated,
promoted) -> `model-updates` -> the worker switches; posts keep flowing through the switch.

The tiny random model's scores mean nothing, so the gate's margin is opened wide here: the
gate's own decisions (a worse candidate refused, with the reason in its card) are tested in
tests/unit/test_retrain.py. This test is about the plumbing: nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.registry import ModelRegistry
from modstream.manifest import read_manifest
from modstream.records import encode
from review.dataset import load_reviewed
from stream.media_server import BackgroundMediaServer
from stream.producer import synthetic_posts
from tests.integration.console_harness import Console, cli
from tests.integration.sink_harness import SinkProcess
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import Worker, collect, produce, register_tiny_model, stop_all
from trainer.synthetic import write_synthetic

REDIS_DB = 9  # this test's review stream, apart from the other tests' databases


def _labels(stack: LocalStack, prefix: str, want: int, timeout: float = 180) -> list[dict]:
    """Every label record of this prefix on the topic (duplicates included)."""

    def done(records: list[dict]) -> bool:
        return len({r["post_id"] for r in records}) >= want

    keep = lambda r: str(r.get("post_id", "")).startswith(prefix)  # noqa: E731
    return asyncio.run(collect(stack.bootstrap, "labels", done, timeout, keep, **stack.client_options()))


def _review_everything(console: Console, prefix: str, expected: int, timeout: float = 120) -> dict[str, dict]:
    """Claims until the queue has given `expected` items of this run; decides each one:
    hate corrected, sarcasm confirmed (items of other tests in the topic are skipped)."""
    decided: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(decided) < expected and time.monotonic() < deadline:
        status, claim = console.api("POST", "/api/v1/claim")
        assert status == 200, claim
        if claim.get("item") is None:
            time.sleep(0.5)  # the sink may still be copying
            continue
        item = claim["item"]
        ours = item["post_id"].startswith(prefix)
        actions = {"hate": "correct", "sarcasm": "confirm"} if ours else {"hate": "skip", "sarcasm": "skip"}
        body = {"decisions": {task: {"action": action} for task, action in actions.items()}}
        status, created = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body)
        assert status == 201, created
        if ours:
            assert item["post_id"] not in decided, f"{item['post_id']} was handed out twice"
            decided[item["post_id"]] = created["decision"]
    return decided


@pytest.fixture
def loop_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("registry", "reviewed", "logs", "cache", "base", "media")}
    for path in dirs.values():
        path.mkdir()
    return dirs


def test_reviewed_decisions_retrain_promote_and_switch_the_worker_without_losing_a_post(
    stack: LocalStack, loop_dirs: dict[str, Path]
) -> None:
    run_review_loop(stack, loop_dirs)


def run_review_loop(
    stack: LocalStack, loop_dirs: dict[str, Path], while_running: Callable[[], None] | None = None
) -> None:
    """The loop; on a secured stack (tests/integration/test_secure_transport.py) every process
    runs as its role's Kafka principal, and the test's own clients as the stack's admin.
    `while_running` is called once every role is up and has handled posts."""
    import redis

    run = uuid.uuid4().hex[:6]
    # A secured stack's roles each use their own Redis user on db 0 (an ACL user may not SELECT).
    redis_url = stack.redis_url_for("admin") if stack.secure else f"redis://127.0.0.1:{stack.redis_port}/{REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    # The roles' ACLs name the real topic; the shared plain stack gives each run its own.
    decisions_topic = "reviewed" if stack.secure else f"reviewed-loop-{run}"
    admin = stack.client_options()
    registry = ModelRegistry(loop_dirs["registry"])
    first = register_tiny_model(registry.root)
    base = write_synthetic(loop_dirs["base"], n=160, seed=5, image_size=32)
    examples = read_manifest(write_synthetic(loop_dirs["media"], n=120, seed=3, image_size=48))
    server = BackgroundMediaServer(loop_dirs["media"] / "images")
    logs = loop_dirs["logs"]

    # Group names start with each role's ACL prefix (modstream/kafka_acls.py).
    worker = Worker(stack, registry.root, logs, app_id=f"modstream-worker-loop-{run}")
    review_sink = SinkProcess(
        "review-sink",
        ["--bootstrap", stack.bootstrap, *stack.redis_flags(redis_url), "--group", f"modstream-review-sink-loop-{run}"],
        logs, "review-sink", env=stack.role_env("review-sink"),
    )  # fmt: skip
    dataset_sink = SinkProcess(
        "dataset-sink",
        ["--bootstrap", stack.bootstrap, "--topic", decisions_topic, "--group", f"modstream-dataset-sink-loop-{run}",
         "--out", str(loop_dirs["reviewed"]), "--evidence", str(logs / "evidence")],
        logs, "dataset-sink", env=stack.role_env("dataset-sink"),
    )  # fmt: skip
    console: Console | None = None
    try:
        worker.start()
        review_sink.start()
        dataset_sink.start()
        console = Console(
            ["--bootstrap", stack.bootstrap, *stack.redis_flags(redis_url), "--topic", decisions_topic,
             "--evidence", str(logs / "evidence")],
            logs / "console.log", logs / "users.json", env=stack.role_env("console"),
        )  # fmt: skip

        # 1. Posts in; the weakly matching ones reach review.
        prefix = f"loop-{run}-a-"
        posts = list(synthetic_posts(examples, server.url, 80, prefix=prefix))
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in posts], **admin))
        labels = _labels(stack, prefix, 80)
        routed = {r["post_id"] for r in labels if r["route"] == "review"}
        assert len(routed) >= 10, f"only {len(routed)} of 80 posts were routed to review"
        assert {r["model_version"] for r in labels} == {first}

        # 2. A scripted reviewer decides every routed post once; each becomes one training example.
        decided = _review_everything(console, prefix, len(routed))
        assert set(decided) == routed
        deadline = time.monotonic() + 60
        reviewed: dict[str, Any] = {}
        while time.monotonic() < deadline and len(reviewed) < len(routed):
            reviewed = {ex.id: ex for ex in load_reviewed(loop_dirs["reviewed"])}
            time.sleep(0.5)
        assert set(reviewed) == routed
        for post_id, ex in reviewed.items():
            model_hate = decided[post_id]["model_labels"]["hate"]["label"]
            assert ex.labels["hate"] != model_hate  # "correct" flipped the model's label
            assert ex.labels["sarcasm"] == decided[post_id]["model_labels"]["sarcasm"]["label"]
            assert ex.image is not None and ex.image.is_file()  # media saved by content hash
            # Who wrote the decision: the console's principal on a secured cluster, none on a plain one.
            assert ex.meta.get("recorded_by") == ("console" if stack.secure else None)

        if while_running is not None:
            while_running()

        # 3. Retraining is triggered by the new decisions, promoted, published; meanwhile posts
        #    keep flowing, and none is lost or labelled twice around the switch.
        during = f"loop-{run}-b-"
        pool = list(synthetic_posts(examples, server.url, 2000, prefix=during))
        trickle = Trickle(stack.bootstrap, pool, options=admin)
        trickle.start()
        out = cli("retrain", "--registry", str(registry.root), "--cache", str(loop_dirs["cache"]),
                   "--reviewed", str(loop_dirs["reviewed"]), "--base-manifest", str(base),
                   "--min-new", str(len(routed)), "--margin", "1.0", "--min-holdout", "10", "--epochs", "2",
                   "--device", "cpu", "--bootstrap", stack.bootstrap, "--quiet",
                   env=stack.role_env("retrain"))  # fmt: skip
        second = registry.current()
        assert second is not None and second != first, out
        card = registry.card(second)
        assert card.metrics["promotion"]["promoted"] is True
        assert card.training["parent_version"] == first
        assert card.training["reviewed"]["n_used"] + card.training["reviewed"]["holdout_n"] == len(routed)

        worker.wait_model(second)
        time.sleep(2)  # a few more posts after the switch
        sent = trickle.stop()
        assert sent, "the trickle produced nothing"

        flowing_labels = _labels(stack, during, len(sent))
        per_post = Counter(r["post_id"] for r in flowing_labels)
        assert set(per_post) == set(sent), "posts lost around the switch"
        assert max(per_post.values()) == 1, f"labelled twice: {[k for k, v in per_post.items() if v > 1][:5]}"
        versions = Counter(r["model_version"] for r in flowing_labels)
        assert set(versions) == {first, second}, f"the switch did not land while posts flowed: {versions}"

        # 4. Later posts carry the new version.
        after = f"loop-{run}-c-"
        later = list(synthetic_posts(examples, server.url, 30, prefix=after))
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in later], **admin))
        assert {r["model_version"] for r in _labels(stack, after, 30)} == {second}
    finally:
        stop_all(console, review_sink, dataset_sink, worker, server)


class Trickle:
    """Posts produced in small steady batches from a thread until stopped, so that the model
    switch lands while posts are in flight. `stop()` returns the ids of the posts sent."""

    def __init__(
        self,
        bootstrap: str,
        posts: list[Any],
        batch: int = 4,
        interval_s: float = 0.3,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap, self.posts, self.batch, self.interval_s = bootstrap, posts, batch, interval_s
        self.options = options or {}
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", **self.options)
        await producer.start()
        try:
            for start in range(0, len(self.posts), self.batch):
                if self._stop.is_set():
                    return
                chunk = self.posts[start : start + self.batch]
                await asyncio.gather(*[await producer.send("posts", encode(p)) for p in chunk])
                self.sent.extend(p.id for p in chunk)
                await asyncio.sleep(self.interval_s)
        finally:
            await producer.stop()

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        return self.sent
