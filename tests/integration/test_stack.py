"""The local stack itself: real Kafka 4.x (KRaft) and redis-server, driven by deploy/local-stack.sh.

Outage tests (Kafka / Redis stop and start) run last in this module; every test bounds its own time.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.integration.stack import LocalStack, port_open

pytestmark = pytest.mark.integration


def _marker(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def _produce(stack: LocalStack, topic: str, marker: str, count: int) -> set[bytes]:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all", request_timeout_ms=15_000)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=f"{marker}-{i}".encode(), value=f"{marker}:{i}".encode())
            for i in range(count)
        ]
        await producer.flush()
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    assert len({m.partition for m in metadata}) > 1, "100 distinct keys should spread over several partitions"
    return {f"{marker}:{i}".encode() for i in range(count)}


async def _partition_counts(stack: LocalStack) -> dict[str, int]:
    """Topic -> partition count, from the broker's metadata."""
    # (AIOKafkaConsumer.topics() returns fresh metadata without updating the client's own copy, so
    # consumer.partitions_for_topic() stays empty for topics the consumer is not subscribed to.)
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics() if not t["error_code"]}
    finally:
        await admin.close()


async def _read_all_from_start(stack: LocalStack, topic: str) -> list[bytes]:
    """Every record of `topic` from offset 0 to the current end, without a consumer group."""
    count = (await _partition_counts(stack)).get(topic)
    assert count, f"no metadata for topic {topic!r}"
    tps = [TopicPartition(topic, p) for p in range(count)]
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        values: list[bytes] = []
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            values.extend(record.value for records in batch.values() for record in records)
        return values
    finally:
        await consumer.stop()


@pytest.mark.asyncio
async def test_topics_exist_with_configured_partitions(stack: LocalStack) -> None:
    async with asyncio.timeout(60):
        counts = await _partition_counts(stack)
        for topic in stack.topics:
            assert topic in counts, f"topic {topic!r} missing; broker has {sorted(counts)}"
            assert counts[topic] == stack.partitions, topic

        # The consumer's view once subscribed agrees (this is the metadata path faust's consumers use).
        consumer = AIOKafkaConsumer(*stack.topics, bootstrap_servers=stack.bootstrap, group_id=None)
        await consumer.start()
        try:
            for topic in stack.topics:
                assert consumer.partitions_for_topic(topic) == set(range(stack.partitions)), topic
        finally:
            await consumer.stop()


@pytest.mark.asyncio
async def test_produce_and_consume_100_posts_with_a_consumer_group(stack: LocalStack) -> None:
    async with asyncio.timeout(90):
        marker = _marker("group")
        sent = await _produce(stack, "posts", marker, 100)

        consumer = AIOKafkaConsumer(
            "posts",
            bootstrap_servers=stack.bootstrap,
            group_id=f"it-{marker}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            received: list[bytes] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while len(received) < len(sent) and loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    received.extend(r.value for r in records if r.value.startswith(marker.encode()))
            await consumer.commit()
            assignment = consumer.assignment()
            committed = {tp: await consumer.committed(tp) for tp in assignment}
        finally:
            await consumer.stop()

        assert len(received) == len(sent), f"got {len(received)} of {len(sent)} messages"
        assert set(received) == sent
        assert {tp.partition for tp in assignment} == set(range(stack.partitions))
        assert all(offset is not None and offset > 0 for offset in committed.values()), committed


def _redis(stack: LocalStack) -> aioredis.Redis:
    # No client-side retries: a stopped server must show up as an error at once.
    return aioredis.from_url(stack.redis_url, socket_timeout=5, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))


@pytest.mark.asyncio
async def test_redis_ping_set_get(stack: LocalStack) -> None:
    async with asyncio.timeout(30):
        client = _redis(stack)
        try:
            assert await client.ping() is True
            key = f"modstream:it:{_marker('kv')}"
            assert await client.set(key, "hello", ex=60) is True
            assert await client.get(key) == b"hello"
            assert await client.delete(key) == 1
        finally:
            await client.aclose()


@pytest.mark.asyncio
async def test_redis_stop_and_start(stack: LocalStack) -> None:
    async with asyncio.timeout(90):
        await asyncio.to_thread(stack.stop_redis)
        client = _redis(stack)
        try:
            with pytest.raises(RedisConnectionError):
                await client.ping()
        finally:
            await client.aclose()

        await asyncio.to_thread(stack.start_redis)
        client = _redis(stack)
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()


@pytest.mark.asyncio
async def test_kafka_restart_keeps_messages(stack: LocalStack) -> None:
    async with asyncio.timeout(240):
        marker = _marker("restart")
        sent = await _produce(stack, "posts", marker, 100)
        before = [v for v in await _read_all_from_start(stack, "posts") if v.startswith(marker.encode())]
        assert set(before) == sent

        await asyncio.to_thread(stack.stop_kafka)
        assert not port_open(stack.kafka_port), "the broker still accepts connections after stop-kafka"
        await asyncio.to_thread(stack.start_kafka)

        after = [v for v in await _read_all_from_start(stack, "posts") if v.startswith(marker.encode())]
        assert sorted(after) == sorted(before), f"{len(after)} of {len(before)} messages survived the restart"
