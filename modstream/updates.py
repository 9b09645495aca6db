"""Publishing on `model-updates`: the one way the retrain job and `modstream models
--set-current` tell running workers to look at the registry again.

Every update carries the same key, so however many partitions the topic has, all updates
land on one partition, in order (and a compacted topic keeps the last). Workers treat an
update as a signal and serve the registry's CURRENT (stream/worker.py `follow_current`), so a
late or reordered update never brings back an older model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from modstream.kafka_auth import client_options
from modstream.records import ModelUpdate, encode

UPDATES_TOPIC = "model-updates"
UPDATES_KEY = b"current"

Publisher = Callable[[dict[str, Any]], None]


async def publish_update(
    bootstrap: str, message: dict[str, Any], topic: str = UPDATES_TOPIC, timeout_s: float = 30
) -> None:
    """Send one update (validated as a ModelUpdate) with acks=all and wait for the broker."""
    from aiokafka import AIOKafkaProducer

    update = ModelUpdate.from_json(message)
    async with asyncio.timeout(timeout_s):
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", request_timeout_ms=int(timeout_s * 1000), **client_options()
        )
        try:
            await producer.start()
            await producer.send_and_wait(topic, encode(update), key=UPDATES_KEY)
        finally:
            await producer.stop()


def kafka_publisher(bootstrap: str, topic: str = UPDATES_TOPIC, timeout_s: float = 30) -> Publisher:
    def publish(message: dict[str, Any]) -> None:
        asyncio.run(publish_update(bootstrap, message, topic, timeout_s))

    return publish
