"""Consumer lag read from the broker (stream/lag.py) against a real worker: it rises while the
worker is paused (SIGSTOP) and falls back to zero once it resumes (SIGCONT)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from stream.lag import LagMonitor, partition_lag
from stream.records import Post, encode
from tests.integration.sink_harness import commit_to_end
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import Worker, produce, register_tiny_model

APP_ID = "it-lag-worker"
N_POSTS = 320  # ten micro-batches of 32, each held a second by the slow media server
STATE_METRICS = ("modstream_posts_total", "modstream_dependency_errors_total", "modstream_consumer_lag")


def test_partition_lag_counts_from_the_first_retained_offset() -> None:
    assert partition_lag(end=10, committed=4, beginning=0) == 6
    assert partition_lag(end=10, committed=None, beginning=3) == 7  # the group never committed here
    assert partition_lag(end=10, committed=-1, beginning=0) == 10  # Kafka's "no offset"
    assert partition_lag(end=10, committed=1, beginning=5) == 5  # committed offset deleted by retention
    assert partition_lag(end=10, committed=10, beginning=0) == 0


def worker_lag(worker: Worker) -> float | None:
    """The worker's own modstream_consumer_lag_sum for its group on posts (None: not measured yet)."""
    for family in text_string_to_metric_families(worker.metrics()):
        for sample in family.samples:
            if sample.name == "modstream_consumer_lag_sum" and sample.labels == {"group": APP_ID, "topic": "posts"}:
                return sample.value
    return None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class SlowMedia(BaseHTTPRequestHandler):
    """Answers every image request after a second (with a 404): each micro-batch then takes a
    second, so the backlog outlives the worker's first lag readings after it resumes."""

    def do_GET(self) -> None:
        time.sleep(1.0)
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_media() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowMedia)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Probe:
    """The worker's LagMonitor code, run from the test against the worker's group, into its own
    registry: it reads the broker while the worker itself cannot answer a scrape."""

    def __init__(self, bootstrap: str) -> None:
        self.registry = CollectorRegistry()
        lag = Gauge("lag", "", ["group", "topic", "partition"], registry=self.registry)
        lag_sum = Gauge("lag_sum", "", ["group", "topic"], registry=self.registry)
        errors = Counter("errors", "", ["dependency", "op"], registry=self.registry)
        self.monitor = LagMonitor(bootstrap, APP_ID, ["posts"], lag, lag_sum, errors)

    def read(self) -> float:
        async def once() -> float:
            from aiokafka import AIOKafkaConsumer
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=self.monitor.bootstrap)
            consumer = AIOKafkaConsumer(bootstrap_servers=self.monitor.bootstrap, group_id=None)
            await admin.start()
            await consumer.start()
            try:
                self.monitor.publish(await self.monitor.measure(admin, consumer))
            finally:
                await consumer.stop()
                await admin.close()
            value = self.registry.get_sample_value("lag_sum", {"group": APP_ID, "topic": "posts"})
            assert value is not None, "no lag measured for the group"
            return value

        return asyncio.run(once())


@pytest.fixture
def worker(stack: LocalStack, tmp_path: Path) -> Iterator[Worker]:
    register_tiny_model(tmp_path / "registry")
    # Earlier tests' posts (with media on servers long gone) are none of this group's business.
    asyncio.run(commit_to_end(stack.bootstrap, APP_ID, "posts"))
    w = Worker(stack, tmp_path / "registry", tmp_path, app_id=APP_ID)
    w.start()
    try:
        yield w
    finally:
        assert w.process is not None
        if w.alive:
            w.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        w.stop()


def test_lag_rises_while_the_worker_is_paused_and_falls_after_it_resumes(
    stack: LocalStack, worker: Worker, slow_media: str
) -> None:
    assert worker.process is not None
    posts = [
        encode(Post(id=f"lag-{i}", text=f"post {i}", image_urls=(f"{slow_media}/{i}.png",))) for i in range(N_POSTS)
    ]
    # Caught up first: the worker's own gauge says 0 once it has measured.
    wait_for(lambda: worker_lag(worker) == 0, 60, "the worker to report zero lag")

    worker.process.send_signal(signal.SIGSTOP)
    try:
        asyncio.run(produce(stack.bootstrap, "posts", posts))
        probe = Probe(stack.bootstrap)
        paused = probe.read()
        time.sleep(2)
        assert probe.read() == paused == N_POSTS, "lag while paused should be every post produced meanwhile"
    finally:
        worker.process.send_signal(signal.SIGCONT)

    # The worker's own gauge: measured from the broker after the resume, it shows the backlog
    # (or part of it) and then drains to zero as the worker commits.
    seen: list[float] = []

    def drained() -> bool:
        value = worker_lag(worker)
        if value is not None:
            seen.append(value)
        return bool(seen) and max(seen) > 0 and seen[-1] == 0

    try:
        wait_for(drained, 120, "the worker's lag to rise and drain back to zero", interval=0.1)
    except AssertionError as exc:
        distinct = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
        state = [line for line in worker.metrics().splitlines() if line.startswith(STATE_METRICS)]
        raise AssertionError(f"{exc}; the worker's readings: {distinct}; {state}\n{worker.log_tail()}") from None
    assert max(seen) > 0, seen
    assert probe.read() == 0
