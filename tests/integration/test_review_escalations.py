"""Settling escalations against the real redis-server: an admin's decision removes the entry
from the escalated stream and marks the post decided with the admin's decision id (in one
step, so a second settle changes nothing); a dismissal drops it; bad or stale ids are refused.
Only Redis is started; the Kafka produce that precedes a settle is the console's job."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from review.queue import QueueError, ReviewQueue
from stream.records import ReviewItem
from tests.integration.stack import LocalStack
from tests.integration.test_review_queue import Env, redis_only  # noqa: F401 (the module's redis-server fixture)

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def q(redis_only: LocalStack) -> AsyncIterator[Env]:  # noqa: F811 (the fixture imported above)
    e = Env(redis_only.redis_url)
    try:
        yield e
    finally:
        await e.close()


async def _escalate(env: Env, queue: ReviewQueue, note: str) -> tuple[str, str]:
    """One post claimed by alice, escalated and completed as the console does; (escalation id, post id)."""
    (post_id,) = await env.enqueue(1)
    await queue.ensure_group()
    claim = await queue.claim("alice")
    assert claim is not None and claim.item.post_id == post_id
    await queue.escalate(claim.entry_id, "alice", "d-escalation", note)
    await queue.complete(claim.entry_id, post_id, "alice", "d-escalation")
    (entry,) = await queue.escalated()
    return entry["id"], post_id


async def test_settling_an_escalation_removes_it_and_marks_the_post_decided_by_the_admin(q: Env) -> None:
    queue = q.queue()
    escalation_id, post_id = await _escalate(q, queue, "needs legal")
    entry = await queue.escalation(escalation_id)
    assert entry["note"] == "needs legal" and entry["reviewer"] == "alice"
    assert ReviewItem.from_json(entry["item"]).post_id == post_id

    await queue.settle_escalation(escalation_id, post_id, "d-admin", "root")
    assert await queue.escalated() == []
    marker = await queue.client.get(queue.decided_key(post_id))
    assert marker == b"d-admin", "the post's decided marker must name the admin's decision"
    assert (await queue.stats()).per_reviewer_last_hour.get("root") == 1
    assert (await queue.stats()).escalated == 0
    with pytest.raises(QueueError, match="no open escalation"):
        await queue.escalation(escalation_id)
    # A second admin settling the same entry changes nothing (the marker keeps the first decision).
    with pytest.raises(QueueError, match="no open escalation"):
        await queue.settle_escalation(escalation_id, post_id, "d-late", "other")
    assert await queue.client.get(queue.decided_key(post_id)) == b"d-admin"
    assert "other" not in (await queue.stats()).per_reviewer_last_hour


async def test_dismissing_an_escalation_drops_it_without_a_new_decision(q: Env) -> None:
    queue = q.queue()
    escalation_id, post_id = await _escalate(q, queue, "spam?")
    assert (await queue.stats()).escalated == 1
    assert await queue.dismiss_escalation(escalation_id) is True
    assert await queue.escalated() == []
    assert await queue.dismiss_escalation(escalation_id) is False
    assert await queue.client.get(queue.decided_key(post_id)) == b"d-escalation"  # not back in review
    assert await queue.claim("bob") is None


async def test_malformed_escalation_ids_are_refused(q: Env) -> None:
    queue = q.queue()
    for bad in ("", "abc", "1-2-3", "+", "-"):
        with pytest.raises(QueueError, match="not an escalation id"):
            await queue.escalation(bad)
        with pytest.raises(QueueError, match="not an escalation id"):
            await queue.settle_escalation(bad, "p", "d", "root")
        with pytest.raises(QueueError, match="not an escalation id"):
            await queue.dismiss_escalation(bad)
