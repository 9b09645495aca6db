"""The review tools end to end, without a browser: login rate limiting on a running console,
and the Label Studio round trip through the real CLI against real Kafka + Redis."""

from __future__ import annotations

import functools
import http.client
import http.cookiejar
import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from review.queue import ReviewQueue
from stream.redis_store import RedisStore
from tests.e2e.conftest import PASSWORD, read_decision, review_item, run_async
from tests.e2e.test_review_escalations import decisions_for
from tests.integration.stack import REPO_ROOT, LocalStack, free_loopback_ports

LS_DB = 8  # this test's own Redis database


def _post_login(opener: urllib.request.OpenerDirector, port: int, user: str, password: str) -> int:
    with opener.open(f"http://127.0.0.1:{port}/login", timeout=10) as resp:
        token = re.search(r'name="csrf_token" value="([^"]+)"', resp.read().decode())
    assert token is not None
    data = urllib.parse.urlencode({"csrf_token": token.group(1), "username": user, "password": password}).encode()
    try:
        with opener.open(f"http://127.0.0.1:{port}/login", data=data, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class _FromAddress(urllib.request.HTTPHandler):
    """Connects from another loopback address (127.0.0.0/8), as a second client would."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def http_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(http.client.HTTPConnection, source_address=(self.source, 0)), req)


def _opener(source: str | None = None) -> urllib.request.OpenerDirector:
    jar = http.cookiejar.CookieJar()
    # The console sets Secure cookies; a plain-http client must be told to send them back.
    jar.set_policy(http.cookiejar.DefaultCookiePolicy(secure_protocols=("http", "https")))
    handlers: list[Any] = [urllib.request.HTTPCookieProcessor(jar)]
    if source is not None:
        handlers.append(_FromAddress(source))
    return urllib.request.build_opener(*handlers)


def test_failed_logins_stop_the_guesser_not_the_reviewer(start_console: Any) -> None:
    console = start_console()
    stranger = _opener()  # 127.0.0.1
    codes = [_post_login(stranger, console.port, "carol", "wrong password!") for _ in range(50)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    # Refused from the guesser's address even with the right password until the window ends...
    assert _post_login(stranger, console.port, "carol", PASSWORD) == 429
    # ...but carol, from her own address, logs in (a limit per name alone locked her out).
    assert _post_login(_opener("127.0.0.2"), console.port, "carol", PASSWORD) == 200
    # Other users are not locked out by carol's failures, except from the guesser's address,
    # which has used up its attempts for every name.
    assert _post_login(_opener("127.0.0.3"), console.port, "bob", PASSWORD) == 200


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "modstream.cli", "review", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_label_studio_round_trip_through_the_cli(stack: LocalStack, tmp_path: Path) -> None:
    redis_url = f"redis://127.0.0.1:{stack.redis_port}/{LS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    # 0 and 2 annotated, 1 left alone, 3 escalated, 4 annotated with no choice at all.
    posts = [f"ls-{i}-{tmp_path.name[-8:]}" for i in range(5)]

    async def setup() -> str:
        store = RedisStore(redis_url)
        try:
            for post_id in posts:
                assert (await store.enqueue_review_many([review_item(post_id, f"text {post_id}", None)]))[0]
        finally:
            await store.close()
        queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
        await queue.ensure_group()
        claim = await queue.claim("alice")  # one pending, two undelivered: all three are open
        await queue.client.aclose()
        assert claim is not None and claim.item.post_id == posts[0]
        return claim.entry_id

    pending_entry = run_async(setup())
    out = tmp_path / "tasks.json"
    result = _cli("export-label-studio", "--out", str(out), "--redis", redis_url)
    assert result.returncode == 0, result.stderr
    tasks = json.loads(out.read_text())
    assert [t["data"]["post_id"] for t in tasks] == posts
    # A forged task: a post never routed, with a review item of its own making in meta.
    forged_item = review_item(f"forged-{tmp_path.name[-8:]}", "<script>alert(1)</script>", "http://169.254.169.254/")
    tasks.append({**tasks[0], "data": {**tasks[0]["data"], "post_id": forged_item.post_id},
                  "meta": {"review_item": forged_item.to_json()}})  # fmt: skip
    config = ET.fromstring((tmp_path / "tasks.labeling-config.xml").read_text())
    assert {c.get("name") for c in config.iter("Choices")} == {"hate", "sarcasm", "review_flag"}

    # What Label Studio exports after annotation (its ids, our data and meta): every post but 1.
    export = []
    for ls_id, task in enumerate(tasks, start=40):
        exported = {**task, "id": ls_id, "project": 2, "predictions": [], "drafts": []}
        exported["annotations"] = []
        answers = [
            {"id": "a1", "type": "choices", "from_name": "hate", "to_name": "text", "origin": "manual",
             "value": {"choices": ["not_hateful"]}},
            {"id": "a2", "type": "choices", "from_name": "sarcasm", "to_name": "text", "origin": "manual",
             "value": {"choices": ["sarcastic"]}},
        ]  # fmt: skip
        if task["data"]["post_id"] == posts[3]:
            answers = [{"id": "f", "type": "choices", "from_name": "review_flag", "to_name": "text",
                       "origin": "manual", "value": {"choices": ["escalate"]}}]  # fmt: skip
        if task["data"]["post_id"] == posts[4]:
            answers = []
        if task["data"]["post_id"] != posts[1]:
            exported["annotations"] = [
                {
                    "id": ls_id * 10,
                    "completed_by": 1,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "created_at": "2026-11-28T07:00:00.000000Z",
                    "updated_at": "2026-11-28T07:00:00.000000Z",
                    "lead_time": 4.2,
                    "task": ls_id,
                    "project": 2,
                    "result": answers,
                }
            ]
        export.append(exported)
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))

    args = ("import-label-studio", str(export_path), "--reviewer", "ls-team", "--second-review-rate", "0")
    result = _cli(*args, "--bootstrap", stack.bootstrap, "--redis", redis_url)
    assert result.returncode == 1, result.stdout + result.stderr  # errors were reported: exit 1
    # posts[0] is held by alice in the console right now: not taken from her, and said so.
    assert "imported 2, skipped 2, errors 2" in result.stdout, result.stdout
    assert f"post {posts[0]}: held by alice in the console" in result.stdout
    assert f"post {forged_item.post_id}: not in the review queue" in result.stdout
    assert f"post {posts[4]}: the annotation chooses nothing" in result.stdout
    escalated = read_decision(stack.bootstrap, posts[3])
    assert {d.action for d in escalated.decisions.values()} == {"escalate"}
    for post_id in (posts[2],):
        decision = read_decision(stack.bootstrap, post_id)
        assert decision.reviewer == "ls-team"
        assert {t: (d.action, d.label) for t, d in decision.decisions.items()} == {
            "hate": ("not_violating", "not_hateful"),
            "sarcasm": ("correct", "sarcastic"),
        }

    async def after() -> tuple[str | None, list[str | None]]:
        queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
        try:
            owner = await queue.owner(pending_entry)
            seen = []
            while (claim := await queue.claim("bob")) is not None:
                seen.append(claim.item.post_id)
                await queue.complete(claim.entry_id, claim.item.post_id, "bob", "d")
            return owner, seen
        finally:
            await queue.client.aclose()

    async def escalations() -> list[str]:
        queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
        try:
            return [e["post_id"] for e in await queue.escalated()]
        finally:
            await queue.client.aclose()

    assert run_async(escalations()) == [posts[3]], "the escalation must reach the admins' stream"
    owner, seen = run_async(after())
    assert owner == "alice", "an item a console reviewer holds stays hers"
    assert seen == [posts[1], posts[4]], "the unannotated post and the one with no choice are still to review"
    assert forged_item.post_id not in seen
    again = _cli(*args, "--bootstrap", stack.bootstrap, "--redis", redis_url)
    # 2 and 3 imported before, 0 still alice's, 1 unannotated, 4 still chooses nothing.
    assert again.returncode == 1 and "imported 0, skipped 4, errors 2" in again.stdout, again.stdout
    assert again.stdout.count("already imported") == 2 and f"post {posts[0]}: held by alice" in again.stdout

    # An annotation edited in Label Studio after the import: a new decision whose labels win.
    # posts[4], decided by bob in the console meanwhile, now answered in Label Studio: bob's stands.
    for task in export:
        if task["data"]["post_id"] == posts[2]:
            task["annotations"][0]["updated_at"] = "2026-11-29T09:00:00.000000Z"
            task["annotations"][0]["result"][1]["value"] = {"choices": ["not_sarcastic"]}
        if task["data"]["post_id"] == posts[4]:
            task["annotations"][0]["result"] = [
                {
                    "id": "b",
                    "type": "choices",
                    "from_name": "hate",
                    "to_name": "text",
                    "value": {"choices": ["hateful"]},
                }
            ]
    export_path.write_text(json.dumps(export))
    edited = _cli(*args, "--bootstrap", stack.bootstrap, "--redis", redis_url)
    assert f"{posts[2]} (an edit of an earlier import" in edited.stdout, edited.stdout
    assert f"post {posts[4]}: already decided in the console" in edited.stdout, edited.stdout
    decisions = decisions_for(stack.bootstrap, posts[2])
    assert len(decisions) == 2 and decisions[0].decision_id != decisions[1].decision_id
    assert decisions[1].training_labels()["sarcasm"] == "not_sarcastic"  # was sarcastic
    assert decisions[1].decided_at > decisions[0].decided_at, "the edit is the later decision, so its labels win"


def test_kafka_failure_keeps_the_claim_and_loses_nothing(start_console: Any) -> None:
    (nothing_there,) = free_loopback_ports(1)
    console = start_console(bootstrap=f"127.0.0.1:{nothing_there}")
    post_id = console.enqueue("decided while Kafka is down", image=None)
    status, claim = console.api("POST", "/api/v1/claim")
    assert status == 200 and claim["item"]["post_id"] == post_id
    body = {"decisions": {"hate": "confirm", "sarcasm": "skip"}}
    status, answer = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body)
    assert status == 503 and answer["retry"] is True and "Kafka" in answer["error"]
    # Not acked, still this reviewer's: the reviewer can submit again once Kafka is back.
    assert console.api("GET", f"/api/v1/items/{claim['entry_id']}")[0] == 200
    status, again = console.api("POST", "/api/v1/claim")
    assert again["entry_id"] == claim["entry_id"]
    stats = console.api("GET", "/api/v1/stats")[1]
    assert stats["depth"] == 1 and stats["pending"] == 1 and stats["decisions_last_hour"] == 0


def test_skip_returns_the_item_to_the_queue_and_escalate_hands_it_to_admins(start_console: Any) -> None:
    """Decisions that label nothing must not lose the item: a skip puts it back for another
    reviewer, an escalation lists it for admins; both are still recorded on `reviewed`."""
    console = start_console()
    skipped = console.enqueue("skip me", image=None)
    status, claim = console.api("POST", "/api/v1/claim", token=console.reviewer_token)
    assert status == 200 and claim["item"]["post_id"] == skipped
    body = {"decisions": {"hate": {"action": "skip"}, "sarcasm": {"action": "skip"}}}
    status, created = console.api(
        "POST", f"/api/v1/items/{claim['entry_id']}/decision", body, token=console.reviewer_token
    )
    assert status == 201
    assert read_decision(console.bootstrap, skipped).decision_id == created["decision"]["decision_id"]
    status, again = console.api("POST", "/api/v1/claim")  # another reviewer (root) gets it
    assert status == 200 and again["item"]["post_id"] == skipped and again["entry_id"] != claim["entry_id"]

    body = {"decisions": {"hate": {"action": "escalate"}, "sarcasm": {"action": "skip"}}, "note": "legal"}
    status, _ = console.api("POST", f"/api/v1/items/{again['entry_id']}/decision", body)
    assert status == 201
    assert console.api("POST", "/api/v1/claim")[1] == {"item": None}
    status, listed = console.api("GET", "/api/v1/admin/escalated")
    assert status == 200 and [e["post_id"] for e in listed["escalated"]] == [skipped]
    assert listed["escalated"][0]["note"] == "legal"
    assert console.api("GET", "/api/v1/admin/escalated", token=console.reviewer_token)[0] == 403


def test_a_password_change_ends_the_sessions_made_before_it(start_console: Any, users_file: Any) -> None:
    console = start_console()
    users = str(users_file[0])
    name, first, second = f"dave{free_loopback_ports(1)[0]}", "first password 123", "second password 456"
    done = subprocess.run(
        [sys.executable, "-m", "modstream.cli", "review", "add-user", name, "--password-stdin", "--users", users,
         "--bootstrap", console.bootstrap],
        cwd=REPO_ROOT, input=first + "\n", text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    jar = http.cookiejar.CookieJar()
    jar.set_policy(http.cookiejar.DefaultCookiePolicy(secure_protocols=("http", "https")))
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    assert _post_login(opener, console.port, name, first) == 200

    def queue_page() -> str:
        with opener.open(f"http://127.0.0.1:{console.port}/review", timeout=10) as resp:
            return resp.geturl()

    assert queue_page().endswith("/review")  # the session works
    done = subprocess.run(
        [sys.executable, "-m", "modstream.cli", "review", "set-password", name, "--password-stdin", "--users", users,
         "--bootstrap", console.bootstrap],
        cwd=REPO_ROOT, input=second + "\n", text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "/login" in queue_page()  # the old session was ended: redirected to log in again
    assert _post_login(opener, console.port, name, second) == 200


def _annotated_task(ls_id: int, post_id: str, hate: str, sarcasm: str, updated: str) -> dict[str, Any]:
    """One task of a Label Studio JSON export, annotated with a label for each task."""
    answers = [
        {"id": "h", "type": "choices", "from_name": "hate", "to_name": "text", "value": {"choices": [hate]}},
        {"id": "s", "type": "choices", "from_name": "sarcasm", "to_name": "text", "value": {"choices": [sarcasm]}},
    ]
    annotation = {"id": ls_id * 10, "completed_by": 1, "was_cancelled": False, "created_at": updated,
                  "updated_at": updated, "task": ls_id, "result": answers}  # fmt: skip
    return {"id": ls_id, "data": {"text": "t", "image": "", "post_id": post_id}, "annotations": [annotation]}


def test_label_studio_import_respects_double_review(stack: LocalStack, tmp_path: Path) -> None:
    """At second-review rate 1 (review/agreement.py): an imported annotation is a first review
    (stage first: no decided marker, the item stays open, nothing trains) that another annotator's
    import or a console reviewer completes, never the same annotator; an import completes a
    console reviewer's first review; gold items are neither exported nor imported."""
    from review.agreement import SecondReviewSampler
    from review.label_studio import export_open_items, import_export_file
    from review.queue import PARKED

    redis_url = f"redis://127.0.0.1:{stack.redis_port}/{LS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    run = tmp_path.name[-8:]
    ls_first, console_first, console_second, gold = (f"dr-{name}-{run}" for name in ("ls", "console", "second", "gold"))
    every_post = SecondReviewSampler(1.0, b"a test key")

    async def queue_call(what: Any) -> Any:
        queue = ReviewQueue(aioredis.Redis.from_url(redis_url))
        try:
            await queue.ensure_group()
            return await what(queue)
        finally:
            await queue.client.aclose()

    async def setup(queue: ReviewQueue) -> str:
        store = RedisStore(redis_url)
        try:
            for post_id in (console_first, ls_first, console_second):
                assert (await store.enqueue_review_many([review_item(post_id, f"text {post_id}", None)]))[0]
        finally:
            await store.close()
        await queue.add_gold(review_item(gold, "a gold post", None), {"expected": {"hate": "hateful"}})
        claim = await queue.claim("alice")  # the console reviewer's first review of console_first
        assert claim is not None and claim.item.post_id == console_first
        labels: dict[str, str | None] = {"hate": "hateful", "sarcasm": "not_sarcastic"}
        await queue.first_review_done(claim.entry_id, console_first, "alice", "d-alice", labels, "routed")
        return claim.entry_id

    def import_as(reviewer: str, tasks: list[dict[str, Any]]) -> Any:
        path = tmp_path / f"export-{reviewer}-{len(tasks)}.json"
        path.write_text(json.dumps(tasks))
        return run_async(
            import_export_file(
                path, reviewer, bootstrap=stack.bootstrap, redis_url=redis_url, second_reviews=every_post
            )
        )

    parked_entry = run_async(queue_call(setup))
    exported = tmp_path / "tasks.json"
    run_async(export_open_items(redis_url, exported, None))
    assert {t["data"]["post_id"] for t in json.loads(exported.read_text())} == {
        ls_first,
        console_first,
        console_second,
    }, "the parked item is open for a second reviewer; the gold item is not exported"

    # ls-ann's annotation of ls_first is its first review: on record as such, the item still open.
    ann = [
        _annotated_task(1, ls_first, "hateful", "sarcastic", "2026-12-01T10:00:00Z"),
        _annotated_task(2, console_first, "hateful", "not_sarcastic", "2026-12-01T10:00:00Z"),
        _annotated_task(3, console_second, "not_hateful", "not_sarcastic", "2026-12-01T10:00:00Z"),
        _annotated_task(4, gold, "hateful", "not_sarcastic", "2026-12-01T10:00:00Z"),
    ]
    report = import_as("ls-ann", ann)
    assert f"post {gold}: a gold item is answered in the console only" in report.summary()
    (first,) = decisions_for(stack.bootstrap, ls_first)
    assert first.review_stage == "first" and first.reviewer == "ls-ann" and not first.trains
    agreed = decisions_for(stack.bootstrap, console_first)
    assert [d.review_stage for d in agreed] == ["agreed"] and agreed[0].trains, "ls-ann completes alice's pair"

    def open_posts() -> set[str]:
        return {item.post_id for _, item in run_async(queue_call(lambda q: q.open_items()))}

    assert open_posts() == {ls_first, console_second, gold}  # the refused gold item still waits too
    assert run_async(queue_call(lambda q: q.owner(parked_entry))) is None, "the second review acked alice's entry"
    assert run_async(queue_call(lambda q: q.pair(ls_first))).first_reviewer == "ls-ann"

    # The same annotator again (the same file, or an edit): never their own second reviewer.
    again = import_as("ls-ann", ann[:1])
    assert again.imported == [] and "already imported" in again.summary()
    edited = import_as("ls-ann", [_annotated_task(1, ls_first, "not_hateful", "sarcastic", "2026-12-02T10:00:00Z")])
    assert edited.imported == [] and "ls-ann gave it its first review" in edited.summary()
    # alice gave console_first its first review: her own Label Studio annotation cannot finish it either.
    assert len(decisions_for(stack.bootstrap, ls_first)) == 1

    # A different annotator's import is the second review: it disagrees, so an admin settles it.
    ben = import_as("ls-ben", [_annotated_task(1, ls_first, "not_hateful", "sarcastic", "2026-12-03T10:00:00Z")])
    assert ben.imported == [f"{ls_first} (second review: disagreed)"], ben.summary()
    stages = [d.review_stage for d in decisions_for(stack.bootstrap, ls_first)]
    assert stages == ["first", "disagreed"], "neither decision trains before an admin settles it"
    escalated = run_async(queue_call(lambda q: q.escalated()))
    assert [(e["post_id"], e.get("double_review"), e.get("first_reviewer")) for e in escalated] == [
        (ls_first, "1", "ls-ann")
    ]
    pairs = run_async(queue_call(lambda q: q.pairs()))
    assert {(p["post_id"], p["outcome"]) for p in pairs} == {(ls_first, "disagreed"), (console_first, "agreed")}
    assert open_posts() == {console_second, gold}

    # console_second, first reviewed by ls-ann in Label Studio, goes to a different console reviewer.
    async def console_claims(queue: ReviewQueue) -> tuple[Any, Any, str | None]:
        own = await queue.claim("ls-ann")  # the annotator, as a console reviewer: parks it, gets the next item
        parked = await queue.find_entry(console_second)
        owner = await queue.owner(parked) if parked else None
        return own, await queue.claim("bob"), owner

    own, bobs, owner = run_async(queue_call(console_claims))
    assert own is not None and own.item.post_id == gold and owner == PARKED
    assert bobs is not None and bobs.item.post_id == console_second
    assert [d.review_stage for d in decisions_for(stack.bootstrap, console_second)] == ["first"]
