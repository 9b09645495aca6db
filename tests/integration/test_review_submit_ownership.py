"""The console's submit path against the real redis-server, in process (aiohttp's test server),
with a stand-in for Kafka whose send can be slowed down and can let another reviewer act in
the middle of it: a submit renews the claim before producing, so the produce cannot lose it;
a reviewer who lost the claim is answered 409 and nothing is acked; a claim lost during the
produce leaves the item with its new holder. Only Redis is started (no Kafka)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from modstream.records import ReviewDecision
from review.auth import UserStore
from review.console import CONSOLE_KEY, ConsoleConfig, create_app
from review.decisions import DecisionProducer
from review.queue import ReviewQueue
from stream.redis_store import RedisStore
from tests.integration.stack import LocalStack
from tests.integration.test_review_queue import _item, redis_only  # noqa: F401 (the fixture)

pytestmark = pytest.mark.asyncio

CLAIM_TIMEOUT = 1.0
DB = 5  # this module's database on its redis-server, flushed per test
DECISION = {"decisions": {"hate": {"action": "confirm"}}}


class StandInProducer(DecisionProducer):
    """Records decisions instead of producing them; `during` runs inside each send (another
    reviewer acting while the decision is on its way), then the send takes `delay` seconds."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1")
        self.sent: list[ReviewDecision] = []
        self.delay = 0.0
        self.during: Callable[[], Awaitable[None]] | None = None

    async def send(self, decision: ReviewDecision) -> None:
        if self.during is not None:
            await self.during()
        await asyncio.sleep(self.delay)
        self.sent.append(decision)

    async def close(self) -> None:
        return None


@dataclass
class Harness:
    client: TestClient[Any, Any]
    producer: StandInProducer
    queue: ReviewQueue  # a second connection, for "another reviewer" and for looking
    tokens: dict[str, str]

    async def call(self, method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        async with self.client.request(method, path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def claim(self, user: str) -> dict[str, Any]:
        status, body = await self.call("POST", "/api/v1/claim", user)
        assert status == 200, body
        return dict(body)

    async def metric(self, series: str) -> float:
        async with self.client.get("/metrics", headers={"Authorization": f"Bearer {self.tokens['alice']}"}) as resp:
            status, text = resp.status, await resp.text()
        assert status == 200
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest_asyncio.fixture
async def harness(redis_only: LocalStack, tmp_path: Path) -> AsyncIterator[Harness]:  # noqa: F811
    url = f"redis://127.0.0.1:{redis_only.redis_port}/{DB}"
    flush = aioredis.Redis.from_url(url)
    await flush.flushdb()
    await flush.aclose()
    users = UserStore(tmp_path / "users.json")
    tokens = {}
    for name in ("alice", "bob"):
        users.add(name, "reviewer", "a long test password 0123")
        tokens[name] = users.issue_token(name)
    producer = StandInProducer()
    config = ConsoleConfig(redis_url=url, users_path=tmp_path / "users.json", claim_timeout_s=CLAIM_TIMEOUT)
    app = create_app(config, producer=producer)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    console = app[CONSOLE_KEY]
    queue = ReviewQueue(aioredis.Redis.from_url(url), claim_timeout_s=CLAIM_TIMEOUT)
    store = RedisStore(url)
    try:
        for post_id in ("p-1", "p-2"):
            assert (await store.enqueue_review_many([_item(post_id)]))[0]
        assert console.config.claim_timeout_s == CLAIM_TIMEOUT
        yield Harness(client, producer, queue, tokens)
    finally:
        await store.close()
        await queue.client.aclose()
        await client.close()


async def test_a_submit_renews_the_claim_so_the_produce_cannot_lose_it(harness: Harness) -> None:
    alice = await harness.claim("alice")
    entry_id = alice["entry_id"]
    await asyncio.sleep(CLAIM_TIMEOUT * 0.8)  # no heartbeat (an API client): nearly lapsed
    taken: list[Any] = []

    async def bob_claims_mid_produce() -> None:
        # Without the renewal at submit, alice's claim would be 1.3 timeouts idle by now.
        await asyncio.sleep(CLAIM_TIMEOUT * 0.5)
        taken.append(await harness.queue.claim("bob"))

    harness.producer.during = bob_claims_mid_produce
    status, body = await harness.call("POST", f"/api/v1/items/{entry_id}/decision", "alice", DECISION)
    assert status == 201, body
    assert taken and (taken[0] is None or taken[0].entry_id != entry_id), "bob took alice's item mid-produce"
    assert [d.reviewer for d in harness.producer.sent] == ["alice"]
    assert await harness.queue.owner(entry_id) is None  # acked by alice's completion
    assert await harness.queue.client.get(harness.queue.decided_key("p-1")) is not None


async def test_a_reviewer_who_lost_the_claim_gets_409_and_nothing_is_produced_or_acked(harness: Harness) -> None:
    alice = await harness.claim("alice")
    entry_id = alice["entry_id"]
    renew = f"/api/v1/items/{entry_id}/renew"
    status, body = await harness.call("POST", renew, "alice")
    assert status == 200 and body["held"] is True
    assert (await harness.call("POST", renew, "bob"))[0] == 409  # not his
    assert (await harness.call("POST", "/api/v1/items/not-an-id/renew", "alice"))[0] == 409
    await asyncio.sleep(CLAIM_TIMEOUT * 1.2)
    bob = await harness.claim("bob")
    assert bob["entry_id"] == entry_id  # taken over
    status, body = await harness.call("POST", renew, "alice")
    assert status == 409 and body["held"] is False and body["next"] == "/review"
    status, body = await harness.call("POST", f"/api/v1/items/{entry_id}/decision", "alice", DECISION)
    assert status == 409 and body["recorded"] is False and "alice" in body["error"]
    assert harness.producer.sent == []
    assert await harness.queue.owner(entry_id) == "bob"
    assert await harness.queue.client.get(harness.queue.decided_key("p-1")) is None
    status, body = await harness.call("POST", f"/api/v1/items/{entry_id}/decision", "bob", DECISION)
    assert status == 201, body
    assert [d.reviewer for d in harness.producer.sent] == ["bob"]
    # Refused renewals: bob's, the bad id's, and alice's after the takeover.
    assert await harness.metric('modstream_review_claims_lost_total{stage="renew"}') == 3.0
    assert await harness.metric('modstream_review_claims_lost_total{stage="submit"}') == 1.0
    assert await harness.metric("modstream_review_renewals_total") == 1.0


async def test_a_claim_lost_during_the_produce_stays_with_its_new_holder(harness: Harness) -> None:
    """The produce outlasts the claim timeout (a Kafka far slower than the timeout allows):
    the decision is on record, but closing the item is refused, so bob's claim survives."""
    alice = await harness.claim("alice")
    entry_id = alice["entry_id"]
    taken: list[Any] = []

    async def bob_takes_over() -> None:
        await asyncio.sleep(CLAIM_TIMEOUT * 1.2)
        taken.append(await harness.queue.claim("bob"))

    harness.producer.during = bob_takes_over
    status, body = await harness.call("POST", f"/api/v1/items/{entry_id}/decision", "alice", DECISION)
    assert taken and taken[0] is not None and taken[0].entry_id == entry_id
    assert status == 409 and body["recorded"] is True and "reassigned to bob" in body["error"], body
    assert [d.reviewer for d in harness.producer.sent] == ["alice"]
    assert await harness.queue.owner(entry_id) == "bob"  # nothing acked: bob still holds it
    assert await harness.queue.client.get(harness.queue.decided_key("p-1")) is None
    assert await harness.metric('modstream_review_claims_lost_total{stage="close"}') == 1.0


async def test_hostile_json_bodies_get_400_and_the_claim_stays(harness: Harness) -> None:
    """A body of 100,000 nested brackets made the stdlib parser raise RecursionError (a 500);
    a body deeper than the records' limit, not an object, not UTF-8 or not JSON: 400 each."""
    alice = await harness.claim("alice")
    path = f"/api/v1/items/{alice['entry_id']}/decision"
    headers = {"Authorization": f"Bearer {harness.tokens['alice']}", "Content-Type": "application/json"}
    bodies = {
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "deep object": b'{"decisions":' + b'{"a":' * 200 + b"1" + b"}" * 201,
        "array": b"[1, 2]",
        "not utf-8": b'{"decisions": "\xff"}',
        "not json": b"{decisions",
    }
    for name, raw in bodies.items():
        async with harness.client.post(path, data=raw, headers=headers) as resp:
            status, answer = resp.status, await resp.json()
        assert status == 400, (name, status, answer)
        assert "JSON object" in answer["error"], (name, answer)
    assert harness.producer.sent == []
    assert await harness.queue.owner(alice["entry_id"]) == "alice"  # still hers: decide properly now
    status, body = await harness.call("POST", path, "alice", DECISION)
    assert status == 201, body


async def test_simultaneous_submits_make_one_record_and_both_answers_are_honest(harness: Harness) -> None:
    """Two API submits of the same decision at once made two records with one decision id;
    a retry after the first had gone through was told "nothing was recorded"."""
    alice = await harness.claim("alice")
    path = f"/api/v1/items/{alice['entry_id']}/decision"
    harness.producer.delay = 0.5  # the first produce is still under way when the second arrives
    first, second = await asyncio.gather(
        harness.call("POST", path, "alice", DECISION), harness.call("POST", path, "alice", DECISION)
    )
    answers = sorted([first, second], key=lambda a: a[0])
    assert answers[0][0] == 201, answers
    assert answers[1][0] == 409 and answers[1][1]["recorded"] == "in progress", answers
    assert len(harness.producer.sent) == 1  # one record, not two with one id
    # A retry after it went through: told it is recorded, with the id, and nothing more is sent.
    status, body = await harness.call("POST", path, "alice", DECISION)
    assert status == 409 and body["recorded"] is True
    assert body["decision_id"] == harness.producer.sent[0].decision_id
    assert len(harness.producer.sent) == 1
