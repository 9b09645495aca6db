"""The shared sink loop against a fake consumer: commit only after apply, retry without
advancing, stop without committing an unapplied batch."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from review.kafka_sink import Backoff, SinkRecord, TransientError, consume_apply_commit, next_offsets

FAST = Backoff(initial_s=0.001, max_s=0.005)


def _msg(partition: int, offset: int) -> Any:
    return SimpleNamespace(
        topic="t", partition=partition, offset=offset, key=b"k", value=f"{partition}:{offset}".encode()
    )


class FakeConsumer:
    """Hands out the given batches, then sets `stop` once they are all fetched."""

    def __init__(self, batches: list[dict[TopicPartition, list[Any]]], stop: asyncio.Event, commit_errors: int = 0):
        self.batches = deque(batches)
        self.stop = stop
        self.commits: list[dict[TopicPartition, int]] = []
        self.events: list[str] = []
        self.commit_errors = commit_errors

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        self.events.append("fetch")
        if self.batches:
            return self.batches.popleft()
        self.stop.set()
        return {}

    async def commit(self, offsets: Any = None) -> None:
        if self.commit_errors:
            self.commit_errors -= 1
            raise CommitFailedError("rebalanced")
        self.events.append("commit")
        self.commits.append(dict(offsets))

    def highwater(self, partition: Any) -> int | None:
        return 100


class FlakyStage:
    name = "test"

    def __init__(self, failures: int = 0, events: list[str] | None = None) -> None:
        self.failures = failures
        self.applied: list[list[str]] = []
        self.events = events if events is not None else []

    async def apply(self, records: Sequence[SinkRecord]) -> None:
        self.events.append("apply")
        if self.failures:
            self.failures -= 1
            raise TransientError("redis", "review_xadd", ConnectionError("down"))
        self.applied.append([r.value.decode() for r in records if r.value])


def test_next_offsets_is_highest_plus_one_per_partition() -> None:
    records = [SinkRecord("t", p, o, None, None) for p, o in [(0, 5), (1, 2), (0, 7), (0, 6)]]
    assert next_offsets(records) == {("t", 0): 8, ("t", 1): 3}


@pytest.mark.asyncio
async def test_commits_each_batch_only_after_it_was_applied() -> None:
    stop = asyncio.Event()
    batches = [{TopicPartition("t", 0): [_msg(0, 0), _msg(0, 1)], TopicPartition("t", 1): [_msg(1, 0)]}]
    batches.append({TopicPartition("t", 0): [_msg(0, 2)]})
    consumer = FakeConsumer(batches, stop)
    stage = FlakyStage(events=consumer.events)
    done = await consumer_loop(consumer, stage, stop)
    assert done == 4
    assert stage.applied == [["0:0", "0:1", "1:0"], ["0:2"]]
    assert consumer.commits == [{TopicPartition("t", 0): 2, TopicPartition("t", 1): 1}, {TopicPartition("t", 0): 3}]
    assert consumer.events[:3] == ["fetch", "apply", "commit"]


@pytest.mark.asyncio
async def test_a_failing_dependency_retries_the_same_batch_without_fetching_or_committing() -> None:
    stop = asyncio.Event()
    consumer = FakeConsumer([{TopicPartition("t", 0): [_msg(0, 0)]}], stop)
    stage = FlakyStage(failures=3, events=consumer.events)
    await consumer_loop(consumer, stage, stop)
    # Three failed applies, then the successful one, and only then a commit and the next fetch.
    assert consumer.events[:6] == ["fetch", "apply", "apply", "apply", "apply", "commit"]
    assert stage.applied == [["0:0"]]
    assert consumer.commits == [{TopicPartition("t", 0): 1}]


@pytest.mark.asyncio
async def test_stopping_during_an_outage_commits_nothing() -> None:
    stop = asyncio.Event()
    consumer = FakeConsumer([{TopicPartition("t", 0): [_msg(0, 0)]}], stop)
    stage = FlakyStage(failures=10**9)
    task = asyncio.create_task(consumer_loop(consumer, stage, stop))
    await asyncio.sleep(0.05)
    assert not task.done(), "the loop gave up on a batch instead of retrying it"
    stop.set()  # what SIGTERM does
    assert await asyncio.wait_for(task, 5) == 0
    assert consumer.commits == [] and stage.applied == []


@pytest.mark.asyncio
async def test_a_refused_commit_is_given_up_and_the_loop_goes_on() -> None:
    stop = asyncio.Event()
    batches = [{TopicPartition("t", 0): [_msg(0, 0)]}, {TopicPartition("t", 0): [_msg(0, 1)]}]
    consumer = FakeConsumer(batches, stop, commit_errors=1)
    stage = FlakyStage()
    done = await consumer_loop(consumer, stage, stop)
    assert stage.applied == [["0:0"], ["0:1"]]
    assert consumer.commits == [{TopicPartition("t", 0): 2}] and done == 1


async def consumer_loop(consumer: FakeConsumer, stage: FlakyStage, stop: asyncio.Event) -> int:
    return await consume_apply_commit(consumer, stage, stop, poll_timeout_ms=1, backoff=FAST)
