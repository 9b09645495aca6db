"""Double review end to end (issue 21 part 5): `modstream review serve` with every item sent
to a second reviewer, the real broker, redis-server and `modstream dataset-sink` as processes.

ann decides an item first; she can neither claim it again nor decide it as its second
reviewer; bob's claim hands it to him with nothing of ann's decision in it; bob disagrees, so
the item goes to the escalations, and no training example exists while it waits there (the
sink has read both decisions). root's settlement is the one line the dataset gets. A pair that
agrees trains from the second decision at once; gold answers never train."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from modstream.records import ReviewItem
from review.dataset import load_reviewed
from stream.redis_store import RedisStore
from tests.integration.console_harness import PASSWORD, Console, cli
from tests.integration.sink_harness import SinkProcess, wait_caught_up
from tests.integration.stack import LocalStack

DB = 12  # this module's database on the session's redis-server, flushed first


def _item(post_id: str) -> ReviewItem:
    return ReviewItem(
        post_id=post_id,
        text=f"text of {post_id}",
        image_url=None,
        reasons=["weak_image_text_match"],
        label={
            "post_id": post_id,
            "labels": {"hate": {"label": "hateful", "score": 0.7, "decision": True, "threshold": 0.5}},
            "media": {"status": "none"},
            "model_version": "v0001",
        },
        tasks={"hate": ["not_hateful", "hateful"]},
    )


class People:
    def __init__(self, console: Console, users: Path, bootstrap: str) -> None:
        self.console = console
        self.tokens: dict[str, str] = {}
        for name, role in (("ann", "reviewer"), ("bob", "reviewer"), ("root", "admin")):
            cli("review", "add-user", name, "--role", role, "--password-stdin", "--users", str(users),
                "--bootstrap", bootstrap, stdin=PASSWORD + "\n")  # fmt: skip
            self.tokens[name] = cli("review", "token", name, "--users", str(users), "--bootstrap", bootstrap).strip()

    def api(self, who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        from tests.integration.console_harness import json_api

        return json_api(self.console.port, self.tokens[who], method, path, body)


def _lines(out: Path, prefix: str) -> dict[str, Any]:
    return {ex.id: ex for ex in load_reviewed(out) if ex.id.startswith(prefix)} if out.exists() else {}


def test_a_disagreement_never_trains_before_an_admin_settles_it(stack: LocalStack, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    topic, group, prefix = f"reviewed-agree-{run}", f"modstream-dataset-sink-agree-{run}", f"agree-{run}-"
    url = f"redis://127.0.0.1:{stack.redis_port}/{DB}"
    plain = redis.Redis(port=stack.redis_port, db=DB)
    plain.flushdb()
    items = [_item(prefix + name) for name in ("disagree", "agree")]

    async def enqueue() -> list[bool]:
        store = RedisStore(url)
        try:
            return list(await store.enqueue_review_many(items))
        finally:
            await store.close()

    assert all(asyncio.run(enqueue()))
    out, evidence = tmp_path / "reviewed", tmp_path / "evidence"
    args = ["--bootstrap", stack.bootstrap, "--topic", topic, "--group", group, "--out", str(out)]
    sink = SinkProcess("dataset-sink", [*args, "--evidence", str(evidence)], tmp_path, "dataset-sink")
    console: Console | None = None
    try:
        sink.start()
        console = Console(
            ["--bootstrap", stack.bootstrap, "--redis", url, "--topic", topic, "--evidence", str(evidence),
             "--second-review-rate", "1"],
            tmp_path / "console.log", tmp_path / "users.json",
        )  # fmt: skip
        people = People(console, tmp_path / "users.json", stack.bootstrap)

        # 1. ann decides both items first (every item is double-reviewed at rate 1).
        first: dict[str, Any] = {}
        for _ in items:
            status, claim = people.api("ann", "POST", "/api/v1/claim")
            assert status == 200 and claim["item"] is not None, claim
            post_id = claim["item"]["post_id"]
            status, body = people.api("ann", "POST", f"/api/v1/items/{claim['entry_id']}/decision",
                                      {"decisions": {"hate": {"action": "confirm"}}})  # fmt: skip
            assert status == 201, body
            assert body["decision"]["review_stage"] == "first"
            first[post_id] = (claim["entry_id"], body["decision"]["decision_id"])
        # She cannot be her own second reviewer: nothing to claim, a forged submit is refused
        # (409, nothing recorded beyond her first decision), a replay says it was recorded.
        status, claim = people.api("ann", "POST", "/api/v1/claim")
        assert status == 200 and claim["item"] is None, claim
        entry_id, decision_id = first[prefix + "disagree"]
        status, body = people.api("ann", "POST", f"/api/v1/items/{entry_id}/decision",
                                  {"decisions": {"hate": {"action": "not_violating"}}})  # fmt: skip
        assert status == 409, body
        status, body = people.api("ann", "POST", f"/api/v1/items/{entry_id}/decision",
                                  {"decisions": {"hate": {"action": "confirm"}}})  # fmt: skip
        assert status == 409 and body["recorded"] is True and body["decision_id"] == decision_id, body
        status, body = people.api("ann", "GET", f"/api/v1/items/{entry_id}")
        assert status == 404, body

        # 2. bob gets both, blind: the claim and the item carry nothing of ann's decision. He
        #    disagrees on one and agrees on the other, and is not told which.
        bob: dict[str, str] = {}
        choice = {prefix + "disagree": "not_violating", prefix + "agree": "confirm"}
        for _ in items:
            status, claim = people.api("bob", "POST", "/api/v1/claim")
            assert status == 200 and claim["item"] is not None, claim
            text = json.dumps(claim)
            assert "ann" not in text and decision_id not in text and "review_stage" not in text, claim
            status, item = people.api("bob", "GET", f"/api/v1/items/{claim['entry_id']}")
            assert status == 200 and "ann" not in json.dumps(item) and decision_id not in json.dumps(item)
            post_id = claim["item"]["post_id"]
            status, body = people.api("bob", "POST", f"/api/v1/items/{claim['entry_id']}/decision",
                                      {"decisions": {"hate": {"action": choice[post_id]}}})  # fmt: skip
            assert status == 201 and body["decision"]["review_stage"] == "second", body
            bob[post_id] = body["decision"]["decision_id"]
        assert set(bob) == set(first)
        agreed_id = bob[prefix + "agree"]

        # 3. The sink has read all four decisions: only the agreeing pair trains, from bob's decision.
        wait_caught_up(stack.bootstrap, group, topic, timeout=120, sink=sink)
        lines = _lines(out, prefix)
        assert set(lines) == {prefix + "agree"}, (lines, sink.log_tail())
        assert lines[prefix + "agree"].meta["decision_id"] == agreed_id
        assert lines[prefix + "agree"].labels == {"hate": "hateful"}
        assert sink.metric("modstream_sink_records_total", sink="dataset", outcome="held") >= 3

        # 4. The disagreement waits for an admin; a reviewer cannot settle it.
        status, body = people.api("root", "GET", "/api/v1/admin/escalated")
        assert status == 200, body
        (esc,) = [e for e in body["escalated"] if e["post_id"] == prefix + "disagree"]
        assert esc["double_review"] == "1" and esc["first_reviewer"] == "ann" and esc["reviewer"] == "bob"
        status, body = people.api("bob", "POST", f"/api/v1/admin/escalated/{esc['id']}/decide",
                                  {"labels": {"hate": "not_hateful"}})  # fmt: skip
        assert status == 403, body
        time.sleep(1)  # anything late would have reached the sink by now
        wait_caught_up(stack.bootstrap, group, topic, timeout=60, sink=sink)
        assert prefix + "disagree" not in _lines(out, prefix)

        # 5. root settles it: that decision, and only it, becomes the training example.
        status, body = people.api("root", "POST", f"/api/v1/admin/escalated/{esc['id']}/decide",
                                  {"labels": {"hate": "not_hateful"}})  # fmt: skip
        assert status == 201 and body["decision"]["review_stage"] == "settled", body
        settled_id = body["decision"]["decision_id"]
        wait_caught_up(stack.bootstrap, group, topic, timeout=120, sink=sink)
        line = _lines(out, prefix)[prefix + "disagree"]
        assert line.meta["decision_id"] == settled_id and line.meta["reviewer"] == "root"
        assert line.labels == {"hate": "not_hateful"}

        # 6. Agreement on the admin API and in /metrics (2 pairs: too few for a kappa gauge).
        status, report = people.api("root", "GET", "/api/v1/admin/agreement")
        assert status == 200 and report["outcomes"] == {"agreed": 1, "disagreed": 1}, report
        (overall,) = [r for r in report["kappa"] if r["reviewer"] == "all"]
        assert overall["pairs"] == 2 and overall["agreement"] == 0.5
        assert people.api("bob", "GET", "/api/v1/admin/agreement")[0] == 403
    finally:
        if console is not None:
            console.stop()
        sink.stop()
        plain.close()
