"""Settling escalations against the real redis-server: an admin's decision removes the entry
from the escalated stream and marks the post decided with the admin's decision id (in one
step, so a second settle changes nothing); a dismissal drops it; bad or stale ids are refused.
Then the console's decide path in process (aiohttp's test server) with the Kafka stand-in of
test_review_submit_ownership: produced first, then settled and counted; an escalation another
admin dismisses during the produce is answered 409 with `recorded: true`. Only Redis is started."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from modstream.records import ReviewItem
from review.auth import UserStore
from review.console import ConsoleConfig, create_app
from review.queue import QueueError, ReviewQueue
from stream.redis_store import RedisStore
from tests.integration.stack import LocalStack
from tests.integration.test_review_queue import Env, _item, redis_only  # noqa: F401 (the module's redis-server fixture)
from tests.integration.test_review_submit_ownership import StandInProducer

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


DB = 6  # the in-process console's database on this module's redis-server, flushed per test


class Admin:
    def __init__(self, client: TestClient[Any, Any], producer: StandInProducer, queue: ReviewQueue, token: str) -> None:
        self.client, self.producer, self.queue, self.token = client, producer, queue, token

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.client.request(method, path, json=body, headers={"Authorization": f"Bearer {self.token}"}) as r:
            return r.status, await r.json()

    async def settled(self, outcome: str) -> float:
        async with self.client.get("/metrics", headers={"Authorization": f"Bearer {self.token}"}) as resp:
            text = await resp.text()
        series = f'modstream_review_escalations_settled_total{{outcome="{outcome}"}}'
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest_asyncio.fixture
async def admin(redis_only: LocalStack, tmp_path: Path) -> AsyncIterator[Admin]:  # noqa: F811
    """An in-process console with one open escalation (post p-1, by alice), and root's token."""
    url = f"redis://127.0.0.1:{redis_only.redis_port}/{DB}"
    flush = aioredis.Redis.from_url(url)
    await flush.flushdb()
    await flush.aclose()
    users = UserStore(tmp_path / "users.json")
    users.add("root", "admin", "a long test password 0123")
    producer = StandInProducer()
    app = create_app(ConsoleConfig(redis_url=url, users_path=tmp_path / "users.json"), producer=producer)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    queue = ReviewQueue(aioredis.Redis.from_url(url))
    store = RedisStore(url)
    try:
        assert (await store.enqueue_review_many([_item("p-1")]))[0]
        await queue.ensure_group()
        claim = await queue.claim("alice")
        assert claim is not None
        await queue.escalate(claim.entry_id, "alice", "d-esc", "unsure")
        await queue.complete(claim.entry_id, "p-1", "alice", "d-esc")
        yield Admin(client, producer, queue, users.issue_token("root"))
    finally:
        await store.close()
        await queue.client.aclose()
        await client.close()


async def test_the_console_produces_the_admin_decision_then_settles_and_counts_it(admin: Admin) -> None:
    (entry,) = await admin.queue.escalated()
    status, body = await admin.call(
        "POST", f"/api/v1/admin/escalated/{entry['id']}/decide", {"labels": {"hate": "not_hateful"}}
    )
    assert status == 201, body
    (sent,) = admin.producer.sent
    assert sent.reviewer == "root" and sent.training_labels() == {"hate": "not_hateful"}
    assert sent.decision_id == body["decision"]["decision_id"]
    assert await admin.queue.escalated() == []
    assert await admin.queue.client.get(admin.queue.decided_key("p-1")) == sent.decision_id.encode()
    assert await admin.settled("decided") == 1 and await admin.settled("dismissed") == 0


async def test_an_escalation_dismissed_during_the_produce_is_answered_409_recorded(admin: Admin) -> None:
    (entry,) = await admin.queue.escalated()

    async def another_admin_dismisses() -> None:
        assert await admin.queue.dismiss_escalation(entry["id"])

    admin.producer.during = another_admin_dismisses
    status, body = await admin.call(
        "POST", f"/api/v1/admin/escalated/{entry['id']}/decide", {"labels": {"hate": "hateful"}}
    )
    assert status == 409 and body["recorded"] is True and "decision log all the same" in body["error"], body
    assert [d.reviewer for d in admin.producer.sent] == ["root"]
    assert await admin.queue.client.get(admin.queue.decided_key("p-1")) == b"d-esc"  # nothing more changed
    assert await admin.settled("decided") == 0
    status, body = await admin.call("POST", f"/api/v1/admin/escalated/{entry['id']}/dismiss")
    assert status == 404 and "no open escalation" in body["error"]
