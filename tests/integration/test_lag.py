"""Consumer lag read from the broker (stream/lag.py) against a real worker: the lag exporter,
a process of its own, sees it rise while the worker is paused (SIGSTOP) and its own metrics
are gone, and fall back to zero once it resumes (SIGCONT); so does the worker's own gauge."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modstream.records import Post, encode
from stream.lag import partition_lag
from tests.integration.sink_harness import commit_to_end
from tests.integration.stack import LocalStack, free_loopback_ports
from tests.integration.test_metric_catalogue import start, stop, wait_scrape
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
    """The worker's own modstream_consumer_topic_lag for its group on posts (None: not measured yet)."""
    for family in text_string_to_metric_families(worker.metrics()):
        for sample in family.samples:
            if sample.name == "modstream_consumer_topic_lag" and sample.labels == {"group": APP_ID, "topic": "posts"}:
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


class Exporter:
    """`modstream lag-exporter` as a real process, measuring the worker's group every second:
    it reads the broker while the worker itself cannot answer a scrape."""

    def __init__(self, stack: LocalStack, log_dir: Path) -> None:
        (self.port,) = free_loopback_ports(1)
        args = ["lag-exporter", "--bootstrap", stack.bootstrap, "--group", f"{APP_ID}=posts"]
        args += ["--interval", "1", "--metrics-port", str(self.port)]
        self.process = start(args, log_dir / "lag-exporter.log")
        self.log = log_dir / "lag-exporter.log"

    def sample(self, name: str, **labels: str) -> float | None:
        text = wait_scrape(self.port, self.process)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None

    def lag(self) -> float | None:
        return self.sample("modstream_consumer_topic_lag", group=APP_ID, topic="posts")

    def committed(self) -> float | None:
        return self.sample("modstream_consumer_committed_offset", group=APP_ID, topic="posts")

    def stop(self) -> None:
        stop(self.process)


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

    exporter = Exporter(stack, worker.log_dir)
    try:
        wait_for(lambda: exporter.lag() == 0, 60, "the exporter to measure the group caught up")
        worker.process.send_signal(signal.SIGSTOP)
        try:
            asyncio.run(produce(stack.bootstrap, "posts", posts))
            wait_for(lambda: exporter.lag() == N_POSTS, 30, f"the exporter to see a lag of {N_POSTS}")
            frozen = exporter.committed()
            with pytest.raises(OSError):  # the worker's own metrics are gone while it is frozen
                urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=2)
            time.sleep(2)  # two more measurements: the backlog stays and the group does not move
            assert exporter.lag() == N_POSTS and exporter.committed() == frozen
        finally:
            worker.process.send_signal(signal.SIGCONT)
        worker_gauge_rises_and_drains(worker)
        wait_for(lambda: exporter.lag() == 0, 60, "the exporter to see the backlog drained")
        assert (exporter.committed() or 0) >= (frozen or 0) + N_POSTS
    finally:
        exporter.stop()


def worker_gauge_rises_and_drains(worker: Worker) -> None:
    """The worker's own gauge: measured from the broker after the resume, it shows the backlog
    (or part of it) and then drains to zero as the worker commits."""
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


class HangingMedia(BaseHTTPRequestHandler):
    """Never answers within the fetch deadline: each micro-batch waits the full 10 s on it."""

    def do_GET(self) -> None:
        time.sleep(30)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_sigterm_stops_a_worker_within_its_grace_whatever_it_waits_on(stack: LocalStack, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HangingMedia)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    register_tiny_model(tmp_path / "registry")
    app_id = "it-sigterm-worker"
    asyncio.run(commit_to_end(stack.bootstrap, app_id, "posts"))
    w = Worker(stack, tmp_path / "registry", tmp_path, app_id=app_id, extra_args=["--stop-grace", "2"])
    w.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
        posts = [encode(Post(id=f"term-{i}", text="t", image_urls=(url,))) for i in range(50)]
        asyncio.run(produce(stack.bootstrap, "posts", posts))
        time.sleep(3)  # the agent is now inside a batch waiting on the media host
        assert w.process is not None and w.alive
        started = time.monotonic()
        w.process.terminate()
        w.process.wait(timeout=30)
        assert time.monotonic() - started < 6, f"exit took {time.monotonic() - started:.1f} s\n{w.log_tail()}"
    finally:
        w.stop()
        server.shutdown()
        server.server_close()
