"""The catch-up step a starting worker runs once its model-updates positions are fixed
(stream/worker.py `_fix_positions`, then `follow_current`): it re-reads CURRENT, which
the retrain job moves before it publishes, so an update sent before the subscription is not
missed. The ordering itself is exercised end to end by tests/integration/test_review_loop.py
and test_worker.py's model-update test; these tests pin the decision it makes."""

import asyncio
from types import SimpleNamespace

from modstream.records import ModelUpdate
from stream.worker import WorkerSettings, follow_current


class FakeResources:
    def __init__(self, serving: str, current: str | None) -> None:
        self.card = SimpleNamespace(version=serving)
        self.registry = SimpleNamespace(current=lambda: current)
        self.swapped: list[str] = []

    async def swap(self, version: str) -> None:
        self.swapped.append(version)


def test_a_worker_catches_up_with_a_current_moved_before_it_subscribed():
    resources = FakeResources(serving="v0001", current="v0002")
    asyncio.run(follow_current(WorkerSettings(model_version="current"), resources))
    assert resources.swapped == ["v0002"]


def test_no_swap_when_current_is_served_or_the_worker_is_pinned():
    same = FakeResources(serving="v0002", current="v0002")
    asyncio.run(follow_current(WorkerSettings(model_version="current"), same))
    pinned = FakeResources(serving="v0001", current="v0002")
    asyncio.run(follow_current(WorkerSettings(model_version="v0001"), pinned))
    assert same.swapped == [] and pinned.swapped == []


def test_an_update_is_a_signal_and_current_decides_so_an_older_update_never_wins():
    # v0003 was promoted after v0002; v0002's update arrives late (or a rollback names it).
    late = FakeResources(serving="v0003", current="v0003")
    asyncio.run(follow_current(WorkerSettings(model_version="current"), late, ModelUpdate("v0002")))
    assert late.swapped == []
    # A rollback: CURRENT moved back to v0001 and the update says so.
    rollback = FakeResources(serving="v0003", current="v0001")
    asyncio.run(
        follow_current(WorkerSettings(model_version="current"), rollback, ModelUpdate("v0001", "v0003", "rollback"))
    )
    assert rollback.swapped == ["v0001"]
    # An update naming a newer version than CURRENT (published before CURRENT moved back): CURRENT.
    ahead = FakeResources(serving="v0001", current="v0001")
    asyncio.run(follow_current(WorkerSettings(model_version="current"), ahead, ModelUpdate("v0004")))
    assert ahead.swapped == []
