"""Review claims against the real redis-server: exclusive claims, reclaim after the timeout,
dead-lettering after too many deliveries, ack only after a decision. Each test uses its own
key prefix, so tests never see each other's streams."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from review.queue import NotClaimed, ReviewQueue
from stream.records import ReviewItem
from stream.redis_store import RedisStore
from tests.integration.stack import LocalStack

pytestmark = pytest.mark.asyncio


def _item(post_id: str) -> ReviewItem:
    return ReviewItem(
        post_id=post_id,
        text=f"text of {post_id}",
        image_url=None,
        reasons=["weak_image_text_match"],
        label={
            "post_id": post_id,
            "labels": {"hate": {"label": "hateful", "score": 0.7, "decision": True, "threshold": 0.5}},
            "itm_match": 0.1,
            "media": {"status": "none"},
            "model_version": "v0001",
        },
        tasks={"hate": ["not_hateful", "hateful"]},
    )


class Env:
    def __init__(self, url: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.url = url
        self.store = RedisStore(url, prefix=self.prefix)
        self.clients: list[aioredis.Redis] = []

    def queue(self, **kwargs: object) -> ReviewQueue:
        client = aioredis.Redis.from_url(self.url)
        self.clients.append(client)
        return ReviewQueue(
            client,
            stream=f"{self.prefix}:review",
            dead=f"{self.prefix}:review:dead",
            escalated=f"{self.prefix}:review:escalated",
            prefix=self.prefix,
            **kwargs,  # type: ignore[arg-type]
        )

    async def enqueue(self, n: int) -> list[str]:
        ids = [f"{self.prefix}-p{i:03d}" for i in range(n)]
        for post_id in ids:
            assert await self.store.enqueue_review(_item(post_id))
        return ids

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        await self.store.close()


@pytest_asyncio.fixture
async def env(stack: LocalStack) -> AsyncIterator[Env]:
    e = Env(stack.redis_url)
    try:
        yield e
    finally:
        await e.close()


async def test_two_reviewers_never_get_the_same_item(env: Env) -> None:
    posts = await env.enqueue(30)
    alice, bob = env.queue(), env.queue()
    await alice.ensure_group()
    seen: dict[str, list[str]] = {"alice": [], "bob": []}

    async def work(queue: ReviewQueue, name: str) -> None:
        while (claim := await queue.claim(name)) is not None:
            seen[name].append(claim.item.post_id)
            await asyncio.sleep(0)  # let the other reviewer claim while this one holds an item
            await queue.complete(claim.entry_id, claim.item.post_id, name, uuid.uuid4().hex)

    await asyncio.gather(work(alice, "alice"), work(bob, "bob"))
    counts = Counter(seen["alice"] + seen["bob"])
    assert sorted(counts) == posts
    assert set(counts.values()) == {1}, f"an item went to both reviewers: {counts.most_common(3)}"
    assert seen["alice"] and seen["bob"], "both reviewers should have worked"
    stats = await alice.stats()
    assert stats.depth == 0
    assert stats.decisions_last_hour == 30
    assert stats.per_reviewer_last_hour == {"alice": len(seen["alice"]), "bob": len(seen["bob"])}


async def test_reload_gives_back_own_pending_item_without_counting_a_delivery(env: Env) -> None:
    await env.enqueue(3)
    queue = env.queue()
    await queue.ensure_group()
    first = await queue.claim("alice")
    again = await queue.claim("alice")
    assert first is not None and again is not None
    assert again.entry_id == first.entry_id
    assert again.deliveries == first.deliveries == 1
    other = await queue.claim("bob")
    assert other is not None and other.entry_id != first.entry_id


async def test_abandoned_claim_goes_to_another_reviewer_after_the_timeout(env: Env) -> None:
    (post,) = await env.enqueue(1)
    queue = env.queue(claim_timeout_s=1.0)
    await queue.ensure_group()
    held = await queue.claim("alice")
    assert held is not None and held.item.post_id == post
    assert await queue.claim("bob") is None, "a fresh claim must not be taken over"
    await asyncio.sleep(1.2)
    taken = await queue.claim("bob")
    assert taken is not None and taken.entry_id == held.entry_id
    assert taken.reclaimed and taken.deliveries == 2
    assert queue.events.reclaims == 1
    with pytest.raises(NotClaimed):
        await queue.get_claimed(held.entry_id, "alice")
    assert await queue.claim("alice") is None  # her old claim is gone; nothing else queued
    assert (await queue.get_claimed(held.entry_id, "bob")).item.post_id == post


async def test_item_delivered_too_often_goes_to_the_dead_letter_stream(env: Env) -> None:
    (post, other) = await env.enqueue(2)
    queue = env.queue(claim_timeout_s=0.5, max_deliveries=2)
    await queue.ensure_group()
    first = await queue.claim("r1")
    assert first is not None and first.item.post_id == post
    second_item = await queue.claim("r2")  # the other, undelivered item
    assert second_item is not None and second_item.item.post_id == other
    await queue.complete(second_item.entry_id, other, "r2", "d-other")
    await asyncio.sleep(0.7)
    again = await queue.claim("r2")
    assert again is not None and again.entry_id == first.entry_id and again.deliveries == 2
    await asyncio.sleep(0.7)
    assert await queue.claim("r3") is None  # third delivery > max 2: dead-lettered instead
    dead = await queue.dead_letters()
    assert len(dead) == 1
    assert dead[0]["post_id"] == post and dead[0]["deliveries"] == "3" and dead[0]["reason"] == "max_deliveries"
    assert ReviewItem.from_json(dead[0]["item"]).post_id == post
    assert queue.events.dead_lettered == 1
    stats = await queue.stats()
    assert stats.pending == 0 and stats.depth == 0 and stats.dead_letters == 1
    # An admin can put it back; it is then a fresh entry with a fresh delivery count.
    new_id = await queue.requeue_dead(dead[0]["id"])
    back = await queue.claim("r3")
    assert back is not None and back.entry_id == new_id and back.deliveries == 1
    assert await queue.dead_letters() == []


async def test_ack_only_after_the_decision(env: Env) -> None:
    posts = await env.enqueue(3)
    queue = env.queue()
    await queue.ensure_group()
    stats = await queue.stats()
    assert (stats.depth, stats.undelivered, stats.pending) == (3, 3, 0)
    assert stats.oldest_age_s is not None and stats.oldest_age_s >= 0
    claim = await queue.claim("alice")
    assert claim is not None
    stats = await queue.stats()
    assert (stats.depth, stats.undelivered, stats.pending) == (3, 2, 1)
    assert stats.pending_per_reviewer == {"alice": 1}
    # Claimed but not decided: still pending, still hers.
    assert (await queue.get_claimed(claim.entry_id, "alice")).item.post_id == claim.item.post_id
    await queue.complete(claim.entry_id, claim.item.post_id, "alice", "d-1")
    assert await queue.owner(claim.entry_id) is None
    stats = await queue.stats()
    assert (stats.depth, stats.pending, stats.decisions_last_hour) == (2, 0, 1)
    assert claim.item.post_id == posts[0]


async def test_decided_post_is_passed_over_when_met_again(env: Env) -> None:
    """A crash between the Kafka produce and the XACK leaves the entry pending with the post
    marked decided: whoever meets it next acks it instead of reviewing it twice. Label Studio
    imports mark undelivered posts the same way."""
    posts = await env.enqueue(3)
    queue = env.queue(claim_timeout_s=0.3)
    await queue.ensure_group()
    crashed = await queue.claim("alice")
    assert crashed is not None
    await queue.client.set(queue.decided_key(crashed.item.post_id), "d-crash")  # produced, not acked
    assert await queue.mark_decided(posts[2], "d-ls", "label-studio") is None  # undelivered: marker only
    await asyncio.sleep(0.4)
    claim = await queue.claim("bob")
    assert claim is not None and claim.item.post_id == posts[1]
    assert await queue.claim("carol") is None
    assert queue.events.skipped_decided == 2
    stats = await queue.stats()
    assert stats.depth == 1 and stats.pending_per_reviewer == {"bob": 1}


async def test_a_skipped_item_goes_back_to_the_queue_for_another_reviewer(env: Env) -> None:
    (post_id,) = await env.enqueue(1)
    queue = env.queue()
    await queue.ensure_group()
    alice = await queue.claim("alice")
    assert alice is not None and alice.item.post_id == post_id
    await queue.release(alice.entry_id)
    bob = await queue.claim("bob")
    assert bob is not None and bob.item.post_id == post_id and bob.entry_id != alice.entry_id
    with pytest.raises(NotClaimed):
        await queue.get_claimed(alice.entry_id, "alice")  # alice's old entry is acked
    assert (await queue.stats()).depth == 1  # bob's claim, nothing else


async def test_an_escalated_item_leaves_the_queue_for_the_escalated_stream(env: Env) -> None:
    (post_id,) = await env.enqueue(1)
    queue = env.queue()
    await queue.ensure_group()
    claim = await queue.claim("alice")
    assert claim is not None
    await queue.escalate(claim.entry_id, "alice", "d-1", "needs legal")
    await queue.complete(claim.entry_id, post_id, "alice", "d-1")
    assert await queue.claim("bob") is None
    (escalated,) = await queue.escalated()
    assert escalated["post_id"] == post_id and escalated["reviewer"] == "alice" and escalated["note"] == "needs legal"
    assert ReviewItem.from_json(escalated["item"]).post_id == post_id
