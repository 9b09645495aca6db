"""The `bank-updates` topic: how verdict-bank changes reach every running worker (and console).

The topic is the banks' source of truth and their persistence: each record is one update
(stream.banks.bank.BankUpdate), keyed by the entry id, and the topic is compacted, so the last
update of each entry survives: an add, or a remove (a remove is a record, not a null tombstone,
so who removed what stays readable; a null value is read as a remove of its key too).

Every process that matches or shows banks reads the whole topic with no consumer group (a
shared group would hand each update to one worker only), from the beginning at start, so a
worker started later holds the same banks; `loaded` is set once it has read up to the end
offsets it saw at start. After that it follows new updates within a poll (about a second).
Only the console's principal may write the topic (modstream/kafka_acls.py); a record that does
not parse is refused and counted, never applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from modstream.kafka_auth import client_options
from modstream.records import RecordError
from stream import metrics
from stream.banks.bank import BANKS, BankUpdate, VerdictBanks

log = logging.getLogger(__name__)

BANK_TOPIC = "bank-updates"


def decode_update(key: bytes | None, value: bytes | None) -> BankUpdate:
    """One record as an update; a null value (a tombstone) removes its key's entry."""
    if value is None:
        if not key:
            raise RecordError("key", "a tombstone without a key names no entry")
        return BankUpdate.remove(key.decode("utf-8", errors="strict"))
    update = BankUpdate.from_json(value)
    if key is not None and key.decode("utf-8", errors="replace") != update.entry_id:
        # The key decides which record compaction keeps: one that disagrees with its entry
        # would let an old add outlive its remove.
        raise RecordError("key", "must be the entry id")
    return update


def publish_metrics(banks: VerdictBanks) -> None:
    sizes = banks.sizes()
    for bank in BANKS:
        metrics.BANK_ENTRIES.labels(bank).set(sizes.get(bank, 0))
    metrics.BANK_VERSION.set(banks.version)


class BankFollower:
    """Keeps `banks` equal to the topic. `on_update` is called after each applied update (the
    console uses it to log curation); `run` never returns until cancelled and reconnects on
    errors, resuming from the positions it reached."""

    def __init__(
        self,
        bootstrap: str,
        banks: VerdictBanks,
        topic: str = BANK_TOPIC,
        *,
        on_update: Callable[[BankUpdate], None] | None = None,
        poll_ms: int = 500,
    ) -> None:
        self.bootstrap = bootstrap
        self.banks = banks
        self.topic = topic
        self.on_update = on_update
        self.poll_ms = poll_ms
        self.loaded = asyncio.Event()
        self._positions: dict[Any, int] = {}  # TopicPartition -> next offset to read

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        while True:  # an app task that raises would stop the whole worker: retry instead
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                **client_options(),
            )
            try:
                await consumer.start()
                partitions = await self._assign(consumer)
                ends = await consumer.end_offsets(partitions)
                await self._follow(consumer, ends)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bank-updates consumer failed (%r); reconnecting", exc)
                metrics.DEPENDENCY_ERRORS.labels("kafka", "bank_updates").inc()
                await asyncio.sleep(2)
            finally:
                await consumer.stop()

    async def _assign(self, consumer: Any) -> list[Any]:
        from aiokafka import TopicPartition

        for _ in range(100):
            found = consumer.partitions_for_topic(self.topic)
            if found:
                break
            await consumer._client.force_metadata_update()  # aiokafka has no public call
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"topic {self.topic!r} has no partitions (not created?)")
        partitions = [TopicPartition(self.topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        for tp in partitions:
            if tp in self._positions:
                consumer.seek(tp, self._positions[tp])
            else:
                await consumer.seek_to_beginning(tp)
        return partitions

    async def _follow(self, consumer: Any, ends: dict[Any, int]) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=self.poll_ms, max_records=5000)
            for tp, records in batches.items():
                self.apply_records((r.key, r.value) for r in records)
                if records:
                    self._positions[tp] = records[-1].offset + 1
            if not self.loaded.is_set() and await self._caught_up(consumer, ends):
                self.loaded.set()
                metrics.BANK_LOADED.set(1)
                log.warning("verdict banks loaded: %s (version %d)", self.banks.sizes(), self.banks.version)

    async def _caught_up(self, consumer: Any, ends: dict[Any, int]) -> bool:
        for tp, end in ends.items():
            position = self._positions.get(tp)
            if position is None:
                position = await consumer.position(tp)
            if position < end:
                return False
        return True

    def apply_records(self, records: Any) -> int:
        """Applies (key, value) records in order; returns how many were refused."""
        refused = 0
        for key, value in records:
            try:
                update = decode_update(key, value)
            except (RecordError, ValueError) as exc:
                refused += 1
                metrics.BANK_UPDATES.labels("refused").inc()
                log.error("refusing a bank update (key %r): %s", (key or b"")[:80], exc)
                continue
            self.banks.apply(update)
            metrics.BANK_UPDATES.labels("applied").inc()
            if self.on_update is not None:
                self.on_update(update)
        publish_metrics(self.banks)
        return refused


async def publish(
    bootstrap: str, updates: Sequence[BankUpdate], topic: str = BANK_TOPIC, timeout_s: float = 30
) -> None:
    """Writes updates keyed by entry id with acks=all and waits for the broker (as whoever
    the settings' credentials name: on a secured cluster only the console may)."""
    from aiokafka import AIOKafkaProducer

    async with asyncio.timeout(timeout_s):
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=20,
            request_timeout_ms=int(timeout_s * 1000),
            **client_options(),
        )
        try:
            await producer.start()
            await send_updates(producer, updates, topic)
        finally:
            await producer.stop()


async def send_updates(producer: Any, updates: Sequence[BankUpdate], topic: str = BANK_TOPIC) -> None:
    """On a started producer (the console's own): every update, then waits for all acks."""
    import orjson

    futures = [await producer.send(topic, orjson.dumps(u.to_json()), key=str(u.entry_id).encode()) for u in updates]
    for future in futures:
        await future
