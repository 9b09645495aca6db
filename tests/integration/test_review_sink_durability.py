"""Durable before committed: the review sink commits its offsets only after Redis answered for
the batch, and the review Redis fsyncs its append-only file before it answers (`appendfsync
always`, as deploy/local-stack.sh and compose run it; Debian's Redis 7.0 has no WAITAOF).
So a redis-server killed with -9 right after the sink committed, then restarted on the same
folder, has every review item of the topic exactly once.

What this test can and cannot show: a kill -9 of the process keeps what Redis had written to
the kernel, fsynced or not; only a host crash loses unsynced pages, and that cannot be staged
here. The fsync policy is what covers the host crash; its cost is in BENCHMARKS.md."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modstream.records import encode
from tests.integration.sink_harness import SinkProcess, commit_to_end, group_lag, stream_post_ids
from tests.integration.stack import LocalStack, free_loopback_ports, port_open
from tests.integration.test_review_queue import _item
from tests.integration.worker_harness import produce


class RedisServer:
    """A redis-server of this test's own (the shared one must not be killed), on a free port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (self.port,) = free_loopback_ports(1)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_redis_killed_right_after_the_sink_committed_keeps_every_item_once(
    stack: LocalStack, redis_server: RedisServer, tmp_path: Path
) -> None:
    group = f"it-durable-{uuid.uuid4().hex[:8]}"
    asyncio.run(commit_to_end(stack.bootstrap, group, "review"))
    sink = SinkProcess(
        "review-sink",
        ["--bootstrap", stack.bootstrap, "--redis", f"redis://127.0.0.1:{redis_server.port}/0", "--group", group],
        tmp_path,
        "durable",
    )
    sink.start()
    try:
        prefix = f"durable-{uuid.uuid4().hex[:8]}"
        items = [encode(_item(f"{prefix}-{i:04d}")) for i in range(600)]
        keys = [f"{prefix}-{i:04d}".encode() for i in range(600)]
        asyncio.run(produce(stack.bootstrap, "review", items, keys=keys))

        async def committed_all() -> None:  # polled tightly: the kill follows the commit at once
            deadline = time.monotonic() + 90
            while await group_lag(stack.bootstrap, group, "review") > 0:
                assert time.monotonic() < deadline, sink.log_tail()
                await asyncio.sleep(0.02)

        asyncio.run(committed_all())
        redis_server.kill9()
        redis_server.start()  # the same folder: the append-only file is replayed
        ours = {p: n for p, n in stream_post_ids(redis_server.port, 0).items() if p.startswith(prefix)}
        assert len(ours) == 600, f"{600 - len(ours)} committed review items are gone after kill -9"
        assert set(ours.values()) == {1}
    finally:
        sink.stop()
