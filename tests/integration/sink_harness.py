"""Runs `modstream review-sink` / `modstream dataset-sink` as real subprocesses against the
test stack, and reads what tests assert on: whole topics, a group's committed offsets,
the Redis review stream, a sink's /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import free_loopback_ports

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SinkProcess:
    command: str  # review-sink | dataset-sink
    args: list[str]
    log_dir: Path
    name: str
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. a secured stack's role_env
    metrics_port: int = 0
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self, timeout: float = 60.0) -> None:
        self.metrics_port = free_loopback_ports(1)[0]
        self.starts += 1
        cmd = [sys.executable, "-m", "modstream.cli", "-v", self.command, "--metrics-port", str(self.metrics_port),
               *self.args]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # up once /metrics answers
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not serve /metrics within {timeout} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return None
        self.exit_codes.append(code)
        return code

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def _partitions(consumer: Any, topic: str) -> list[Any]:
    from aiokafka import TopicPartition

    # consumer.topics() does not refresh what partitions_for_topic reads: ask the cluster.
    cluster = await consumer._client.fetch_all_metadata()
    found = cluster.partitions_for_topic(topic)
    assert found, f"topic {topic} has no partitions"
    return [TopicPartition(topic, p) for p in sorted(found)]


async def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) on `topic` now, from the beginning to the end offsets."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        out: list[tuple[bytes | None, bytes | None]] = []
        remaining = {tp for tp in partitions if end[tp] > 0}
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, messages in batches.items():
                out.extend((m.key, m.value) for m in messages if m.offset < end[tp])
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        assert not remaining, f"could not read {topic} to its end"
        return out
    finally:
        await consumer.stop()


async def group_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records on `topic` past `group`'s committed offsets (0: the group has caught up)."""
    from aiokafka import AIOKafkaConsumer

    # Not subscribed, so this consumer never joins (or disturbs) the group.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topic)
        end = await consumer.end_offsets(partitions)
        lag = 0
        for tp in partitions:
            committed = await consumer.committed(tp) or 0
            lag += end[tp] - committed
        return lag
    finally:
        await consumer.stop()


async def commit_to_end(bootstrap: str, group: str, topic: str, **options: Any) -> None:
    """Start a new consumer group at the end of `topic` (what earlier tests left there is
    none of its business), by committing the end offsets before its first member joins.
    `options`: a secured stack's client options."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **options)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topic)
        end = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.commit(end)
    finally:
        await consumer.stop()


def wait_caught_up(bootstrap: str, group: str, topic: str, timeout: float, sink: SinkProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    lag = -1
    while time.monotonic() < deadline:
        lag = asyncio.run(group_lag(bootstrap, group, topic))
        if lag == 0:
            return
        time.sleep(1)
    tail = sink.log_tail() if sink else ""
    raise AssertionError(f"group {group} still {lag} records behind on {topic} after {timeout} s\n{tail}")


def stream_post_ids(redis_port: int, db: int, key: str = "modstream:review") -> Counter[str]:
    """post id -> number of entries in the Redis review stream."""
    import redis

    client = redis.Redis(port=redis_port, db=db)
    try:
        return Counter(fields[b"post_id"].decode() for _, fields in client.xrange(key))
    finally:
        client.close()
