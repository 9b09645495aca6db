"""Reading a whole topic without a consumer group (the CLI's readers: dlq, labels)."""

from __future__ import annotations

from typing import Any


async def assign_all(consumer: Any, topic: str, bootstrap: str) -> list[Any]:
    """Assign every partition of `topic` to a started group-less aiokafka consumer; returns the
    TopicPartitions. LookupError when the topic does not exist."""
    from aiokafka import TopicPartition

    # consumer.topics() does not refresh what partitions_for_topic reads: ask the cluster.
    cluster = await consumer._client.fetch_all_metadata()
    partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        raise LookupError(f"topic {topic!r} does not exist on {bootstrap}")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps
