"""Review claims against the real redis-server: exclusive claims, reclaim after the timeout,
renewal by the holder only, dead-lettering after too many deliveries, ack only after a
decision and only by the claim's holder. Each test uses its own key prefix, so tests never
see each other's streams. Only Redis is started (no Kafka): the queue never talks to it."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from modstream.records import ReviewItem
from review.queue import NotClaimed, QueueError, ReviewQueue
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
            assert (await self.store.enqueue_review_many([_item(post_id)]))[0]
        return ids

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        await self.store.close()


@pytest.fixture(scope="module")
def redis_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A redis-server of this module's own (deploy/local-stack.sh start-redis), no Kafka."""
    with LocalStack.with_free_ports(tmp_path_factory.mktemp("redis-only")).started("start-redis") as local:
        yield local


@pytest_asyncio.fixture
async def env(redis_only: LocalStack) -> AsyncIterator[Env]:
    e = Env(redis_only.redis_url)
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


async def test_an_item_every_reviewer_skips_reaches_the_dead_letter_stream(env: Env) -> None:
    """A skip re-adds the item as a fresh entry; its deliveries so far travel with it, so it
    is dead-lettered after max_deliveries instead of cycling forever (a fresh entry used to
    start again at one delivery)."""
    (post,) = await env.enqueue(1)
    queue = env.queue(max_deliveries=3)
    await queue.ensure_group()
    seen = []
    for reviewer in ("r1", "r2", "r3"):
        claim = await queue.claim(reviewer)
        assert claim is not None and claim.item.post_id == post, reviewer
        seen.append(claim.deliveries)
        await queue.release(claim.entry_id, reviewer)  # skip
    assert seen == [1, 2, 3]
    assert await queue.claim("r4") is None  # a fourth delivery > 3: dead-lettered
    dead = await queue.dead_letters()
    assert [d["post_id"] for d in dead] == [post] and dead[0]["reason"] == "max_deliveries"
    assert dead[0]["deliveries"] == "4"
    stats = await queue.stats()
    assert stats.depth == 0 and stats.dead_letters == 1


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
    await queue.release(alice.entry_id, "alice")
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


# -- renewal (the console's heartbeat) and ownership on completion -----------------------------


async def _idle_ms(queue: ReviewQueue, entry_id: str) -> int:
    rows: Any = await queue.client.xpending_range(queue.stream, queue.group, entry_id, entry_id, 1)
    return int(rows[0]["time_since_delivered"])


async def test_a_renewed_claim_is_not_taken_over_past_the_timeout(env: Env) -> None:
    held_post, other_post = await env.enqueue(2)
    queue = env.queue(claim_timeout_s=1.0)
    await queue.ensure_group()
    alice = await queue.claim("alice")
    assert alice is not None and alice.item.post_id == held_post
    for _ in range(5):  # 2 s in all, twice the timeout, renewed every 0.4 s
        await asyncio.sleep(0.4)
        assert await queue.renew(alice.entry_id, "alice")
    bob = await queue.claim("bob")
    assert bob is not None and bob.item.post_id == other_post, "bob must get the other item, not alice's"
    assert not bob.reclaimed and queue.events.reclaims == 0
    assert await queue.owner(alice.entry_id) == "alice"
    assert (await queue.get_claimed(alice.entry_id, "alice")).deliveries == 1  # renewals count no delivery
    # The control: once alice stops renewing, the same claim is taken over after the timeout.
    await asyncio.sleep(1.2)
    carol = await queue.claim("carol")
    assert carol is not None and carol.entry_id == alice.entry_id and carol.reclaimed
    assert not await queue.renew(alice.entry_id, "alice"), "a lost claim must not renew"
    assert await queue.owner(alice.entry_id) == "carol"


async def test_renew_by_someone_else_returns_false_and_changes_nothing(env: Env) -> None:
    (post,) = await env.enqueue(1)
    queue = env.queue(claim_timeout_s=1.0)
    await queue.ensure_group()
    alice = await queue.claim("alice")
    assert alice is not None
    await asyncio.sleep(0.6)
    before = await _idle_ms(queue, alice.entry_id)
    assert not await queue.renew(alice.entry_id, "bob")
    assert await queue.owner(alice.entry_id) == "alice"
    assert await _idle_ms(queue, alice.entry_id) >= before, "bob's renewal reset alice's idle clock"
    assert await queue.claim("bob") is None  # and gave him nothing
    for bad in ("not-an-id", "1-2-3", "", "99999999999999-0"):
        assert not await queue.renew(bad, "alice")
    # Alice's clock was never reset by bob: the claim lapses on the original schedule.
    await asyncio.sleep(0.5)
    taken = await queue.claim("bob")
    assert taken is not None and taken.entry_id == alice.entry_id and taken.item.post_id == post
    # Once decided, nobody can renew it (it is no longer pending).
    await queue.complete(taken.entry_id, post, "bob", "d-1")
    assert not await queue.renew(taken.entry_id, "bob")


async def test_complete_by_a_reviewer_who_lost_the_claim_is_refused(env: Env) -> None:
    (post,) = await env.enqueue(1)
    queue = env.queue(claim_timeout_s=1.0)
    await queue.ensure_group()
    alice = await queue.claim("alice")
    assert alice is not None
    await asyncio.sleep(1.2)
    bob = await queue.claim("bob")  # takes alice's abandoned claim over
    assert bob is not None and bob.entry_id == alice.entry_id
    depth = (await queue.stats()).depth
    with pytest.raises(NotClaimed, match="reassigned to bob"):
        await queue.complete(alice.entry_id, post, "alice", "d-alice")
    with pytest.raises(NotClaimed, match="reassigned to bob"):
        await queue.escalate(alice.entry_id, "alice", "d-alice", "too late")
    with pytest.raises(NotClaimed, match="reassigned to bob"):
        await queue.release(alice.entry_id, "alice")
    with pytest.raises(NotClaimed):
        await queue.hold(alice.entry_id, "alice")
    # Nothing was marked, acked, copied or re-queued: the entry is still bob's to decide.
    assert await queue.owner(alice.entry_id) == "bob"
    assert not await queue.client.exists(queue.decided_key(post))
    assert await queue.escalated() == []
    stats = await queue.stats()
    assert (stats.depth, stats.pending, stats.decisions_last_hour) == (depth, 1, 0)
    assert (await queue.get_claimed(bob.entry_id, "bob")).item.post_id == post
    await queue.hold(bob.entry_id, "bob")
    await queue.complete(bob.entry_id, post, "bob", "d-bob")
    assert await queue.owner(bob.entry_id) is None
    assert await queue.client.get(queue.decided_key(post)) == b"d-bob"
    assert (await queue.stats()).per_reviewer_last_hour == {"bob": 1}
    # A completion of an entry nobody holds any more (a retried request) is refused too.
    with pytest.raises(NotClaimed, match="no longer pending"):
        await queue.complete(bob.entry_id, post, "bob", "d-bob")


async def test_release_of_an_entry_deleted_from_the_stream_is_an_error_not_a_loss(env: Env) -> None:
    await env.enqueue(1)
    queue = env.queue()
    await queue.ensure_group()
    claim = await queue.claim("alice")
    assert claim is not None
    await queue.client.xdel(queue.stream, claim.entry_id)
    with pytest.raises(QueueError, match="no longer in the review stream"):
        await queue.release(claim.entry_id, "alice")


async def test_a_renewal_racing_a_takeover_leaves_exactly_one_holder(env: Env) -> None:
    """A renewal that comes after another reviewer's takeover reports the loss instead of taking
    the entry back (an XCLAIM to self without the owner check would steal it back, and both
    would think they hold it); one that comes first keeps it. The renewal is delayed by a
    varying few milliseconds so both orders happen. (The owner check and the XCLAIM run in
    one script, so a takeover cannot fall between them either; that window is too narrow to
    hit reliably from a test.)"""
    await env.enqueue(40)
    # A timeout far above the renewal's delays: with 50 ms, a loaded machine let it elapse again
    # between alice's renewal and bob's claim, so bob took the item fairly and the test failed.
    alice_q, bob_q = env.queue(claim_timeout_s=0.3), env.queue(claim_timeout_s=0.3)
    await alice_q.ensure_group()
    outcomes: Counter[str] = Counter()
    for _ in range(40):
        held = await alice_q.claim("alice")
        if held is None:
            break
        await asyncio.sleep(0.31)  # idle past the timeout: open to a takeover

        async def renew_after(delay: float, entry_id: str = held.entry_id) -> bool:
            await asyncio.sleep(delay)
            return await alice_q.renew(entry_id, "alice")

        delay = random.choice((0.0, 0.0, 0.001, 0.003, 0.006, 0.012))
        renewed, taken = await asyncio.gather(renew_after(delay), bob_q.claim("bob"))
        owner = await alice_q.owner(held.entry_id)
        took_hers = taken is not None and taken.entry_id == held.entry_id
        if renewed:
            assert owner == "alice" and not took_hers, (renewed, taken, owner)
            outcomes["renewed"] += 1
        else:
            assert took_hers and owner == "bob", (renewed, taken, owner)
            outcomes["taken"] += 1
        for name, queue, claim in (("alice", alice_q, held), ("bob", bob_q, taken)):
            if claim is not None and await queue.owner(claim.entry_id) == name:
                await queue.complete(claim.entry_id, claim.item.post_id, name, uuid.uuid4().hex)
    assert outcomes["renewed"] >= 3 and outcomes["taken"] >= 3, f"both orders must have happened: {outcomes}"
