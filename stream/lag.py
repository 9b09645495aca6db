"""Consumer lag as the broker sees it: per partition, end offset minus the group's committed offset.

Measured from outside the consumer (an admin client for the committed offsets, a group-less
consumer for the end offsets), so it keeps rising while the group's members are stalled,
paused or dead: exactly when their own view of lag stops being updated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from modstream.kafka_auth import client_options

log = logging.getLogger(__name__)


def partition_lag(end: int, committed: int | None, beginning: int) -> int:
    """A partition the group never committed on counts from its first retained offset."""
    start = committed if committed is not None and committed >= 0 else beginning
    return max(0, end - max(start, beginning))


@dataclass
class LagMonitor:
    """Measures the lag of `group` on `topics` every `interval_s` seconds and sets the gauges
    `lag{group, topic, partition}` and `lag_sum{group, topic}`; failures are counted on
    `errors{dependency="kafka", op="consumer_lag"}` and the gauges keep their last value."""

    bootstrap: str
    group: str
    topics: Sequence[str]
    lag: Any
    lag_sum: Any
    errors: Any
    interval_s: float = 5.0
    timeout_s: float = 30.0
    # Optional (the lag exporter): committed offsets summed per topic, which stop changing
    # when the group makes no progress, and the time of the last complete measurement.
    committed: Any = None
    measured_at: Any = None
    last_committed: dict[tuple[str, int], int] = field(default_factory=dict, init=False, repr=False)

    async def measure(self, admin: Any, consumer: Any) -> dict[tuple[str, int], int]:
        from aiokafka import TopicPartition

        partitions = []
        for topic in await admin.describe_topics(list(self.topics)):
            if topic.get("error_code") or not topic.get("partitions"):
                # Never report 0 for a topic we could not see: the gauge keeps its last value.
                raise LookupError(f"topic {topic.get('topic')!r} not found (error {topic.get('error_code')})")
            partitions += [TopicPartition(topic["topic"], p["partition"]) for p in topic["partitions"]]
        committed = await admin.list_consumer_group_offsets(self.group, partitions=partitions)
        ends = await consumer.end_offsets(partitions)
        beginnings = await consumer.beginning_offsets(partitions)
        self.last_committed = {
            (tp.topic, tp.partition): max(0, committed[tp].offset) if tp in committed else 0 for tp in partitions
        }
        return {
            (tp.topic, tp.partition): partition_lag(
                ends[tp], committed[tp].offset if tp in committed else None, beginnings[tp]
            )
            for tp in partitions
        }

    def publish(self, lags: dict[tuple[str, int], int]) -> None:
        sums: dict[str, int] = {}
        for (topic, partition), value in lags.items():
            self.lag.labels(self.group, topic, str(partition)).set(value)
            sums[topic] = sums.get(topic, 0) + value
        for topic, total in sums.items():
            self.lag_sum.labels(self.group, topic).set(total)
        if self.committed is not None:
            positions: dict[str, int] = {}
            for (topic, _), offset in self.last_committed.items():
                positions[topic] = positions.get(topic, 0) + offset
            for topic, total in positions.items():
                self.committed.labels(self.group, topic).set(total)
        if self.measured_at is not None:
            self.measured_at.labels(self.group).set_to_current_time()

    async def run(self) -> None:
        """Until cancelled; reconnects after any failure (an outage must not end the task)."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **client_options())
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, **client_options()
            )
            try:
                await admin.start()
                await consumer.start()
                while True:
                    try:  # a hung request must not freeze the gauge silently: time it out and count it
                        self.publish(await asyncio.wait_for(self.measure(admin, consumer), self.timeout_s))
                    except Exception as exc:
                        self.errors.labels("kafka", "consumer_lag").inc()
                        log.warning("consumer lag of %s not measured: %r", self.group, exc)
                    await asyncio.sleep(self.interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors.labels("kafka", "consumer_lag").inc()
                log.warning("consumer lag monitor of %s cannot connect (%r); retrying", self.group, exc)
                await asyncio.sleep(self.interval_s)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                with contextlib.suppress(Exception):
                    await admin.close()
