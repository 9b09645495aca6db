"""Consume -> apply idempotently -> commit: the loop both review-loop sinks share.

A sink reads its topic in its own consumer group with auto-commit off. For each fetched
batch it calls the stage's `apply` and commits the batch's offsets only after `apply`
returned, so a crash at any moment (kill -9 included) leaves the batch uncommitted and it
is delivered again: every stage must be idempotent (the review sink's SET NX key, the
dataset sink's decision ids). While `apply` fails (a dependency is down) the same batch is
retried with backoff and nothing is fetched or committed meanwhile: backpressure, not
loss. Malformed records are not skipped: stages send them to the dead-letter topic, and
that send is part of `apply`, so it too happens before the commit.

The loop takes any object with aiokafka's consumer methods it uses, so it is tested with a
fake consumer (tests/unit/test_kafka_sink.py); stages see `SinkRecord`s, not aiokafka types.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from modstream.kafka_auth import client_options
from modstream.records import DeadLetter, RecordError, encode
from review import sink_metrics as metrics
from stream.lag import LagMonitor

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")


@dataclass
class Parsed(Generic[Item]):
    """A batch split into the records that parsed (in topic order) and dead letters."""

    good: list[Item]
    dead: list[DeadLetter]
    reasons: list[str]  # metric reason per dead letter (the offending field)


def split_batch(
    records: Sequence[SinkRecord], parse: Callable[[bytes | None], Item], stage: str, sink: str
) -> Parsed[Item]:
    """Parses every record; one that does not fit its schema becomes a DeadLetter naming the
    stage, the field and where it was read, so the sink loses nothing and goes on."""
    out: Parsed[Item] = Parsed([], [], [])
    for r in records:
        try:
            out.good.append(parse(r.value))
        except RecordError as exc:
            where = f"{r.topic}[{r.partition}]@{r.offset}"
            log.warning("%s: malformed record %s (%s) sent to the dead-letter topic", sink, where, exc)
            out.dead.append(DeadLetter.from_raw(r.value or b"", stage, f"{exc} ({where})", r.key_text))
            out.reasons.append(exc.field)
    return out


class TransientError(Exception):
    """A dependency failed while applying a batch; the batch is retried whole."""

    def __init__(self, dependency: str, op: str, cause: BaseException) -> None:
        super().__init__(f"{dependency} {op} failed: {cause!r}")
        self.dependency = dependency
        self.op = op
        self.cause = cause


@dataclass(frozen=True)
class SinkRecord:
    """What a stage sees of one Kafka message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def key_text(self) -> str | None:
        """The record key as text (the post id on the review-loop topics), if it is UTF-8."""
        if not self.key:
            return None
        try:
            return self.key.decode()
        except UnicodeDecodeError:
            return None


class Stage(Protocol):
    """`apply` must be idempotent and must raise (TransientError, or anything else) unless
    every record of the batch is durably handled, dead letters included."""

    name: str  # the `sink` label of the metrics

    async def apply(self, records: Sequence[SinkRecord]) -> None: ...


class Consumer(Protocol):
    """The part of aiokafka's AIOKafkaConsumer the loop uses."""

    async def getmany(self, *partitions: Any, timeout_ms: int = ..., max_records: int | None = ...) -> Any: ...

    async def commit(self, offsets: Any = ...) -> None: ...

    def highwater(self, partition: Any) -> int | None: ...


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.2
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2  # +- share of each delay, so restarted sinks don't retry in lockstep

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay * random.uniform(1 - self.jitter, 1 + self.jitter)
            delay = min(self.max_s, delay * self.factor)


@dataclass
class SinkSettings:
    bootstrap: str
    topic: str
    group: str
    dlq_topic: str = "posts.dlq"
    max_records: int = 500
    poll_timeout_ms: int = 500
    # Longer than any outage we ride out would be wrong too: aiokafka leaves the group after
    # this long without a poll, which is harmless (the uncommitted batch is redelivered).
    max_poll_interval_ms: int = 300_000
    backoff: Backoff = field(default_factory=Backoff)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    lag_interval_s: float = 5.0  # how often the group's consumer lag is read from the broker


def known_fields(obj: dict[str, Any], record: type) -> dict[str, Any]:
    """`obj` without the keys `record` (a dataclass) does not know, plus the version: the
    records' contract is that unknown fields are ignored, so a producer that adds one
    must not turn every record into a dead letter."""
    names = {f.name for f in dataclasses.fields(record)} | {"v"}
    return {k: v for k, v in obj.items() if k in names}


def next_offsets(records: Sequence[SinkRecord]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset to commit after `records`: the highest seen + 1."""
    offsets: dict[tuple[str, int], int] = {}
    for r in records:
        tp = (r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    return offsets


def flatten(batch: Mapping[Any, Sequence[Any]]) -> list[SinkRecord]:
    """aiokafka's {TopicPartition: [ConsumerRecord]} to SinkRecords, partitions in order."""
    out: list[SinkRecord] = []
    for tp in sorted(batch, key=lambda tp: (tp.topic, tp.partition)):
        out.extend(SinkRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in batch[tp])
    return out


async def until_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """Await `awaitable` unless `stop` is set first (then cancel it): (finished, result)."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False, None


async def retry(
    step: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    backoff: Backoff,
    *,
    sink: str,
    what: str,
) -> tuple[bool, T | None]:
    """Run `step` until it succeeds or `stop` is set: (succeeded, result). Failures are
    counted by dependency and logged once per outage, not once per attempt."""
    delays = backoff.delays()
    failures = 0
    try:
        while not stop.is_set():
            try:
                finished, result = await until_stopped(step(), stop)
                if finished:
                    if failures:
                        log.warning("%s sink: %s succeeded after %d failed attempts", sink, what, failures)
                    return True, result
                return False, None
            except Exception as exc:
                failures += 1
                dependency, op = (exc.dependency, exc.op) if isinstance(exc, TransientError) else ("internal", what)
                metrics.DEPENDENCY_ERRORS.labels(dependency, op).inc()
                metrics.BLOCKED.labels(sink).set(1)
                if failures == 1:
                    # An unexpected error is logged with its traceback: retrying it may stall the sink.
                    log.warning("%s sink: %s failed (%r); retrying, nothing committed meanwhile", sink, what, exc,
                                exc_info=not isinstance(exc, TransientError))  # fmt: skip
                elif failures % 20 == 0:
                    log.warning("%s sink: %s still failing after %d attempts (%r)", sink, what, failures, exc)
            finished, _ = await until_stopped(asyncio.sleep(next(delays)), stop)
        return False, None
    finally:
        metrics.BLOCKED.labels(sink).set(0)


async def commit(consumer: Consumer, offsets: Mapping[tuple[str, int], int], stop: asyncio.Event, sink: str) -> bool:
    """Commit `offsets`. A commit the group no longer allows (rebalanced, partition revoked)
    is given up: the batch is redelivered to the partition's new owner, which the stage's
    idempotence absorbs. aiokafka itself retries retriable errors (broker down) until the
    broker answers; `stop` interrupts that wait."""
    from aiokafka import TopicPartition
    from aiokafka.errors import KafkaError

    try:
        finished, _ = await until_stopped(
            consumer.commit({TopicPartition(t, p): offset for (t, p), offset in offsets.items()}), stop
        )
    except KafkaError as exc:
        metrics.DEPENDENCY_ERRORS.labels("kafka", "commit").inc()
        log.warning("%s sink: commit refused (%r); the batch will be delivered again", sink, exc)
        return False
    if finished:
        metrics.COMMITS.labels(sink).inc()
    return finished


def _observe_lag(consumer: Consumer, offsets: Mapping[tuple[str, int], int], sink: str) -> None:
    from aiokafka import TopicPartition

    for (topic, partition), offset in offsets.items():
        highwater = consumer.highwater(TopicPartition(topic, partition))
        if highwater is not None:
            metrics.LAG.labels(sink, str(partition)).set(max(0, highwater - offset))


async def consume_apply_commit(
    consumer: Consumer,
    stage: Stage,
    stop: asyncio.Event,
    *,
    max_records: int = 500,
    poll_timeout_ms: int = 500,
    backoff: Backoff | None = None,
) -> int:
    """The sink loop; returns the number of records applied and committed when `stop` is set.
    A batch interrupted by `stop` before it was applied is left uncommitted."""
    backoff = backoff or Backoff()
    done = 0
    while not stop.is_set():
        records = flatten(await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records))
        if not records:
            continue
        started = time.perf_counter()
        applied, _ = await retry(functools.partial(stage.apply, records), stop, backoff, sink=stage.name, what="apply")
        if not applied:
            log.warning(
                "%s sink: stopping with a batch of %d unapplied; it stays uncommitted", stage.name, len(records)
            )
            break
        metrics.BATCH_SECONDS.labels(stage.name).observe(time.perf_counter() - started)
        offsets = next_offsets(records)
        if await commit(consumer, offsets, stop, stage.name):
            done += len(records)
        _observe_lag(consumer, offsets, stage.name)
    return done


class DeadLetters:
    """Sends dead letters to the dead-letter topic and waits for the broker's ack (acks=all),
    so the sink commits a malformed record's offset only once its dead letter is stored."""

    def __init__(self, producer: Any, topic: str, stage: str) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage

    async def send(self, letters: Sequence[DeadLetter], reasons: Sequence[str]) -> None:
        if not letters:
            return
        try:
            futures = [
                await self.producer.send(self.topic, value=encode(d), key=d.post_id.encode() if d.post_id else None)
                for d in letters
            ]
            await asyncio.gather(*futures)
        except Exception as exc:
            raise TransientError("kafka", "dlq_send", exc) from exc
        for reason in reasons:
            metrics.DLQ.labels(self.stage, reason).inc()


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT stop the loop at once: a batch not yet applied and committed is
    abandoned uncommitted and delivered again later (applying it twice changes nothing)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def start_with_retry(client: Any, what: str, stop: asyncio.Event, backoff: Backoff, sink: str) -> bool:
    """Start an aiokafka client, retrying while the broker is unreachable."""

    async def attempt() -> None:
        try:
            await client.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                await client.stop()  # aiokafka warns about an unclosed client otherwise
            raise TransientError("kafka", what, exc) from exc

    started, _ = await retry(attempt, stop, backoff, sink=sink, what=what)
    return started


def lag_monitor(settings: SinkSettings) -> LagMonitor:
    """The group's lag read from the broker: unlike `modstream_sink_lag` (the highwater seen by
    the last fetch), it keeps rising while the sink is blocked or not running."""
    return LagMonitor(
        settings.bootstrap,
        settings.group,
        [settings.topic],
        metrics.CONSUMER_LAG,
        metrics.CONSUMER_TOPIC_LAG,
        metrics.DEPENDENCY_ERRORS,
        interval_s=settings.lag_interval_s,
    )


async def run_sink(
    settings: SinkSettings, stage_factory: Callable[[DeadLetters], Awaitable[Stage]], *, name: str, dlq_stage: str
) -> int:
    """Run a sink until SIGTERM/SIGINT: the consumer in `settings.group`, a producer for the
    dead-letter topic, the stage built by `stage_factory`, /metrics on `metrics_port`.
    `name` labels the metrics, `dlq_stage` the dead letters. Returns the exit code."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    stop = asyncio.Event()
    install_stop_signals(stop)
    server = metrics.serve(settings.metrics_port, settings.metrics_host)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True, **client_options()
    )
    consumer = AIOKafkaConsumer(
        settings.topic,
        bootstrap_servers=settings.bootstrap,
        group_id=settings.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a new group copies the whole topic: it is the source of truth
        max_poll_interval_ms=settings.max_poll_interval_ms,
        client_id=settings.group,
        **client_options(),
    )
    lag_task = asyncio.create_task(lag_monitor(settings).run(), name=f"{name}-consumer-lag")
    try:
        if not await start_with_retry(producer, "producer_start", stop, settings.backoff, name):
            return 0
        sink = await stage_factory(DeadLetters(producer, settings.dlq_topic, dlq_stage))
        if not await start_with_retry(consumer, "consumer_start", stop, settings.backoff, name):
            return 0
        log.warning("%s sink: consuming %s as group %s", name, settings.topic, settings.group)
        count = await consume_apply_commit(
            consumer,
            sink,
            stop,
            max_records=settings.max_records,
            poll_timeout_ms=settings.poll_timeout_ms,
            backoff=settings.backoff,
        )
        log.warning("%s sink: stopped after %d records", name, count)
        return 0
    finally:
        lag_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await lag_task
        with contextlib.suppress(Exception):
            await consumer.stop()  # leaves the group, so a replacement gets the partitions at once
        with contextlib.suppress(Exception):
            await producer.stop()
        if server is not None:
            server[0].shutdown()
            server[0].server_close()
