"""Runs `modstream worker` as a real subprocess against the test stack, and reads topics.

The worker serves a tiny random model from a temporary registry (weights don't matter to
the stream's guarantees), fetches media from a loopback media server, and can be killed
with SIGKILL and restarted under the same consumer group.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.stack import LocalStack, free_loopback_ports

REPO_ROOT = Path(__file__).resolve().parents[2]


def register_tiny_model(registry: Path) -> str:
    from models.card import ModelCard
    from models.registry import ModelRegistry
    from tests.tiny import tiny_model
    from trainer.train import TrainConfig

    model, tokenizer = tiny_model()
    card = ModelCard(
        config=model.config,
        thresholds={"hate": 0.5, "sarcasm": 0.5},
        # A validated-looking ITM block so routing is exercised; threshold 0.5 sends roughly
        # half the image posts of a random model to review.
        itm={"trained": True, "auroc": 0.9, "routing_lift": {"hate": 1.5}, "threshold": 0.5},
        # The recipe `modstream retrain` trains candidates with (short: weights don't matter here).
        training={"config": TrainConfig(epochs=2, patience=2).to_dict()},
    )
    return ModelRegistry(registry).save(model, tokenizer, card)


@dataclass
class Worker:
    stack: LocalStack
    registry: Path
    log_dir: Path
    app_id: str
    max_batch: int = 32
    extra_args: list[str] = field(default_factory=list)
    evidence: Path | None = None  # where it keeps routed posts' media (default: <log_dir>/evidence)
    # The verdict banks of bank-updates: off unless a test opts in, so images another test's
    # console banked never decide this test's posts (tests/integration/test_verdict_banks.py).
    banks: bool = False
    process: subprocess.Popen[bytes] | None = None
    web_port: int = 0
    starts: int = 0

    def start(self, wait_ready: bool = True) -> None:
        self.web_port = free_loopback_ports(1)[0]
        self.starts += 1
        log = (self.log_dir / f"worker-{self.app_id}-{self.starts}.log").open("wb")
        cmd = [
            # As in a worker image without trainer/: importing it fails (tests/integration/no_trainer.py).
            sys.executable, str(REPO_ROOT / "tests" / "integration" / "no_trainer.py"), "worker",
            "--bootstrap", self.stack.bootstrap, *self.stack.redis_flags(self.stack.redis_url),
            "--registry", str(self.registry), "--app-id", self.app_id, "--web-port", str(self.web_port),
            "--max-batch", str(self.max_batch), "--max-wait", "0.05", "--device", "cpu",
            "--allow-loopback-media", "--evidence", str(self.evidence or self.log_dir / "evidence"),
            "--audit-rate", "0",  # tests count routed items exactly; audit tests pass their own rate
            *([] if self.banks else ["--no-banks"]),
            *self.extra_args,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.update(self.stack.role_env("worker"))
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def ready_model(self) -> str | None:
        """The model version /ready reports, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/ready", timeout=2) as resp:
                return json.loads(resp.read()).get("model")
        except (OSError, ValueError):
            return None

    def wait_model(self, version: str, timeout: float = 120.0) -> None:
        """Until the worker serves `version` (after a promotion); fails with its log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.ready_model() != version:
            time.sleep(0.5)
        assert self.ready_model() == version, self.log_tail()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        path = self.log_dir / f"worker-{self.app_id}-{self.starts}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def stop_all(*parts: Any) -> None:
    """Stops every started part of a test's loop (a console, sinks, a worker, a media server)
    in the order given; parts not yet made (None) are passed over."""
    for part in parts:
        if part is not None:
            part.stop()


async def produce(
    bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None, **options: Any
) -> None:
    """`options` go to AIOKafkaProducer (e.g. compression_type="gzip", max_request_size)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **options)
    try:  # stop() also when start() fails (broker down), or aiokafka warns about a leak
        await producer.start()
        futures = [await producer.send(topic, value=v, key=(keys[i] if keys else None)) for i, v in enumerate(values)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def collect(
    bootstrap: str,
    topic: str,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
    keep: Callable[[dict[str, Any]], bool] = lambda record: True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Every record of `topic` from the beginning that `keep` accepts, read until `until`
    holds or `timeout` passes (then returns what it has; the caller asserts). `options` go to
    AIOKafkaConsumer (a secured stack's credentials)."""
    from aiokafka import AIOKafkaConsumer

    # No group: every partition, from the earliest offset.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **options
    )
    await consumer.start()
    records: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(records):
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for messages in batches.values():
                for message in messages:
                    try:
                        record = json.loads(message.value)
                    except (TypeError, ValueError):  # tests write malformed records on purpose
                        continue
                    if keep(record):
                        records.append(record)
    finally:
        await consumer.stop()
    return records
