"""Gold items and the agreement routes against the real redis-server, with the console in
process and a Kafka stand-in (as test_review_escalations): an admin defines a gold item (audited
first), it reaches a reviewer blind like an audit item, the answer is scored, never trains
(review_stage gold), and shows in the report and the gauges. Hostile input is refused: a
reviewer on the admin routes, nested, oversized and malformed definitions, unknown ids."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from modstream.records import AuditEvent
from review.auth import UserStore
from review.console import ConsoleConfig, create_app
from tests.integration.stack import LocalStack
from tests.integration.test_review_queue import redis_only  # noqa: F401 (the module's redis-server fixture)
from tests.integration.test_review_submit_ownership import StandInProducer

pytestmark = pytest.mark.asyncio
DB = 13


class Recording(StandInProducer):
    def __init__(self) -> None:
        super().__init__()
        self.audits: list[AuditEvent] = []

    async def send_audit(self, event: AuditEvent, topic: str = "audit") -> None:
        self.audits.append(event)


class Env:
    def __init__(self, client: TestClient[Any, Any], producer: Recording, tokens: dict[str, str]) -> None:
        self.client, self.producer, self.tokens = client, producer, tokens

    async def call(
        self, who: str, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.client.request(method, path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


@pytest_asyncio.fixture
async def env(redis_only: LocalStack, tmp_path: Path) -> AsyncIterator[Env]:  # noqa: F811
    url = f"redis://127.0.0.1:{redis_only.redis_port}/{DB}"
    flush = aioredis.Redis.from_url(url)
    await flush.flushdb()
    await flush.aclose()
    users = UserStore(tmp_path / "users.json")
    users.add("root", "admin", "a long test password 0123")
    users.add("ann", "reviewer", "a long test password 0123")
    producer = Recording()
    config = ConsoleConfig(redis_url=url, users_path=tmp_path / "users.json", second_review_rate=1.0, bank_topic="")
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config, producer=producer)))
    await client.start_server()
    try:
        yield Env(client, producer, {"root": users.issue_token("root"), "ann": users.issue_token("ann")})
    finally:
        await client.close()


GOLD = {"post_id": "gold-1", "text": "a known post", "tasks": {"hate": ["not_hateful", "hateful"]},
        "expected": {"hate": "hateful"}}  # fmt: skip


async def test_a_gold_item_is_answered_blind_scored_and_never_trains(env: Env) -> None:
    status, body = await env.call("root", "POST", "/api/v1/admin/gold", GOLD)
    assert status == 201, body
    assert [(a.action, a.actor, a.subject) for a in env.producer.audits] == [("gold_item_added", "root", "gold-1")]
    status, claim = await env.call("ann", "POST", "/api/v1/claim")
    assert status == 200 and claim["item"]["post_id"] == "gold-1", claim
    assert "hateful" not in json.dumps(claim["item"]["label"]) and claim["item"]["reasons"] == ["audit"]
    assert "gold" not in json.dumps(claim["item"]).replace("gold-1", "")  # nothing says it is gold
    status, body = await env.call("ann", "POST", f"/api/v1/items/{claim['entry_id']}/decision",
                                  {"decisions": {"hate": {"action": "not_violating"}}})  # fmt: skip
    assert status == 201, body
    (sent,) = env.producer.sent
    assert sent.review_stage == "gold" and not sent.trains  # at rate 1, still not a double review
    status, report = await env.call("root", "GET", "/api/v1/admin/agreement")
    (row,) = [r for r in report["gold"] if r["reviewer"] == "ann"]
    assert row == {"task": "hate", "reviewer": "ann", "answers": 1, "correct": 0, "accuracy": 0.0}
    async with env.client.get("/metrics", headers={"Authorization": f"Bearer {env.tokens['root']}"}) as resp:
        text = await resp.text()
    assert re.search(r'^modstream_review_gold_accuracy\{reviewer="ann",task="hate"\} 0\.0$', text, re.M), text
    assert re.search(r'^modstream_review_stage_decisions_total\{stage="gold"\} 1\.0$', text, re.M)
    status, page = await env.call("root", "GET", "/admin/agreement")
    assert status == 200 and 'data-reviewer="ann"' in page and "gold-1" in page, page
    assert (await env.call("ann", "GET", "/admin/agreement"))[0] == 403
    # Removal: audited, then gone; a second removal is 404.
    assert (await env.call("root", "DELETE", "/api/v1/admin/gold/gold-1"))[0] == 200
    assert (await env.call("root", "DELETE", "/api/v1/admin/gold/gold-1"))[0] == 404
    assert (await env.call("root", "GET", "/api/v1/admin/gold"))[1] == {"gold": {}}


async def test_the_gold_and_agreement_routes_refuse_hostile_input(env: Env) -> None:
    for method, path in (("GET", "/api/v1/admin/agreement"), ("GET", "/api/v1/admin/gold"),
                         ("POST", "/api/v1/admin/gold"), ("DELETE", "/api/v1/admin/gold/gold-1")):  # fmt: skip
        status, body = await env.call("ann", method, path, GOLD if method == "POST" else None)
        assert status == 403, (method, path, body)
    assert env.producer.audits == []
    hostile: list[Any] = [
        {**GOLD, "post_id": {"$gt": ""}},
        {**GOLD, "post_id": "x" * 10_000},
        {**GOLD, "text": {"nested": [[["deep"]]]}},
        {**GOLD, "tasks": {"hate": ["not_hateful"]}},
        {**GOLD, "expected": {"hate": "other"}},
        {**GOLD, "expected": ["hateful"]},
        [GOLD],
    ]
    for body in hostile:
        status, answer = await env.call("root", "POST", "/api/v1/admin/gold", body)
        assert status == 400, (body, answer)
    status, _ = await env.call("root", "POST", "/api/v1/admin/gold", raw=b"[" * 100_000)
    assert status == 400
    status, _ = await env.call("root", "POST", "/api/v1/admin/gold", raw=b'{"text": "' + b"x" * 2_000_000 + b'"}')
    assert status == 413
    status, _ = await env.call("root", "DELETE", "/api/v1/admin/gold/" + "y" * 5000)
    assert status == 404
    assert env.producer.audits == [] and (await env.call("root", "GET", "/api/v1/admin/gold"))[1] == {"gold": {}}
