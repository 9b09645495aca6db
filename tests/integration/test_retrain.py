"""The retraining job against a real Kafka broker: a promoted candidate announces itself on
`model-updates` (acks=all, after CURRENT moved); a refused one sends nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from models.registry import ModelRegistry
from modstream.updates import UPDATES_KEY, UPDATES_TOPIC, kafka_publisher
from tests.integration.stack import LocalStack
from tests.unit.test_retrain import home, options, seeded, write_reviewed
from trainer.retrain import describe, run_retrain

pytestmark = pytest.mark.integration


# The unit tests' fixtures: a seeded registry (v0001, base data, feature cache), copied per test.
__all__ = ["home", "seeded"]


async def _end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    """Where each partition of the updates topic ends now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        (topic,) = await admin.describe_topics([UPDATES_TOPIC])
    finally:
        await admin.close()
    tps = [TopicPartition(UPDATES_TOPIC, p["partition"]) for p in topic["partitions"]]
    assert tps, f"no partitions for {UPDATES_TOPIC}"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _records_since(bootstrap: str, start: dict[TopicPartition, int]) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record written to the topic after `start`, up to its current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = list(start)
        consumer.assign(tps)
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        end = await consumer.end_offsets(tps)
        out: list[tuple[bytes | None, bytes | None]] = []
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            out.extend((r.key, r.value) for records in batch.values() for r in records)
        return out
    finally:
        await consumer.stop()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_promoted_candidate_publishes_its_version_on_model_updates(stack: LocalStack, home: Path) -> None:
    write_reviewed(home / "reviewed", 600, seed=11)
    start = _run(_end_offsets(stack.bootstrap))
    outcome = run_retrain(options(home, kafka_publisher(stack.bootstrap)))
    assert outcome.status == "promoted" and outcome.published, describe(outcome)
    assert ModelRegistry(home / "registry").current() == "v0002"
    records = _run(_records_since(stack.bootstrap, start))
    assert [(key, json.loads(value or b"")) for key, value in records] == [
        (UPDATES_KEY, {"v": 1, "version": "v0002", "parent": "v0001", "reason": "retrain"})
    ]


def test_refused_candidate_publishes_nothing(stack: LocalStack, home: Path) -> None:
    write_reviewed(home / "reviewed", 600, seed=11, flip=True)
    start = _run(_end_offsets(stack.bootstrap))
    outcome = run_retrain(options(home, kafka_publisher(stack.bootstrap)))
    assert outcome.status == "refused" and not outcome.published, describe(outcome)
    assert ModelRegistry(home / "registry").current() == "v0001"
    assert _run(_records_since(stack.bootstrap, start)) == []
