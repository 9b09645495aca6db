"""The catch-up step a starting worker runs once its model-updates positions are fixed
(stream/worker.py `_fix_positions`, then `catch_up_with_registry`): it re-reads CURRENT, which
the retrain job moves before it publishes, so an update sent before the subscription is not
missed. The ordering itself is exercised end to end by tests/integration/test_review_loop.py
and test_worker.py's model-update test; these tests pin the decision it makes."""

import asyncio
from types import SimpleNamespace

from stream.worker import WorkerSettings, catch_up_with_registry


class FakeResources:
    def __init__(self, serving: str, current: str | None) -> None:
        self.card = SimpleNamespace(version=serving)
        self.registry = SimpleNamespace(current=lambda: current)
        self.swapped: list[str] = []

    async def swap(self, version: str) -> None:
        self.swapped.append(version)


def test_a_worker_catches_up_with_a_current_moved_before_it_subscribed():
    resources = FakeResources(serving="v0001", current="v0002")
    asyncio.run(catch_up_with_registry(WorkerSettings(model_version="current"), resources))
    assert resources.swapped == ["v0002"]


def test_no_swap_when_current_is_served_or_the_worker_is_pinned():
    same = FakeResources(serving="v0002", current="v0002")
    asyncio.run(catch_up_with_registry(WorkerSettings(model_version="current"), same))
    pinned = FakeResources(serving="v0001", current="v0002")
    asyncio.run(catch_up_with_registry(WorkerSettings(model_version="v0001"), pinned))
    assert same.swapped == [] and pinned.swapped == []
