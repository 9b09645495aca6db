"""Authenticated transport on a real secured stack (deploy/local-stack.sh with
MODSTREAM_STACK_SECURE=1: Kafka SASL_SSL only, SCRAM-SHA-512, StandardAuthorizer, an ACL per
role; redis-server on TLS only with an ACL user per role, modstream/redis_acls.py).

- a client without credentials, with a wrong password, or that does not trust the stack's CA
  cannot connect: the broker (or TLS) refuses, and the test shows the error;
- each role's principal can write exactly the topics modstream/kafka_acls.py grants it (the
  worker cannot forge a decision on `reviewed`), and read only its own;
- the whole review loop of test_review_loop.py passes with every process as its own principal;
- Redis refuses a plaintext client, one that does not trust the CA and one without
  credentials; the review sink's user cannot acknowledge,
  delete or trim, the worker's cannot touch the queue, the console's cannot delete from the
  review stream, yet every Redis step of double review and gold items works under it;
- no password appears in the process table or in any log while the roles run.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from modstream.kafka_acls import ROLES, TOPIC, WRITE, allowed, plan
from tests.integration.stack import TOPICS, LocalStack
from tests.integration.test_review_loop import run_review_loop

ROLE_NAMES = tuple(ROLES)


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack.with_free_ports(tmp_path_factory.mktemp("secure-stack"), secure=True).started() as local:
        yield local


def _passwords(stack: LocalStack) -> dict[str, str]:
    """Every Kafka and Redis password of the stack, by principal."""
    kafka = {
        role: (stack.credentials(role) / "MODSTREAM_KAFKA_PASSWORD").read_text() for role in ("admin", *ROLE_NAMES)
    }
    redis_users = {p.parent.name: p.read_text() for p in stack.state_dir.glob("credentials/*/redis.password")}
    assert len(redis_users) == 4, redis_users
    return {**{f"kafka:{r}": pw for r, pw in kafka.items()}, **{f"redis:{r}": pw for r, pw in redis_users.items()}}


async def _send(stack: LocalStack, topic: str, options: dict) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, request_timeout_ms=8000, **options)
    await asyncio.wait_for(producer.start(), 20)
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b'{"probe": true}'), 20)
    finally:
        await producer.stop()


def _refused(stack: LocalStack, options: dict, caplog: pytest.LogCaptureFixture) -> str:
    """Connects with `options`, expects no connection, and returns aiokafka's reason (the
    exception only says it could not bootstrap; the log line says why)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        asyncio.run(_send(stack, "labels", options))
    reasons = [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]
    assert reasons, "no reason logged"
    print(reasons[0])
    return reasons[0]


def test_a_client_without_valid_credentials_cannot_connect(
    secure_stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    import ssl

    worker = secure_stack.client_options("worker")
    # Plaintext to a SASL_SSL listener: the broker drops the connection.
    assert "closed" in _refused(secure_stack, {}, caplog)
    # The right user with a wrong password: SCRAM fails.
    wrong = _refused(secure_stack, {**worker, "sasl_plain_password": "not the password"}, caplog)
    assert "SaslAuthenticationFailed" in wrong and "invalid credentials" in wrong
    # A user the broker does not know.
    assert "SaslAuthenticationFailed" in _refused(secure_stack, {**worker, "sasl_plain_username": "mallory"}, caplog)
    # A client that does not trust the stack's CA (the system's CAs only) refuses the broker.
    untrusted = _refused(secure_stack, {**worker, "ssl_context": ssl.create_default_context()}, caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted
    # The same worker with its real credentials gets through: the refusals were about credentials.
    asyncio.run(_send(secure_stack, "labels", worker))


def test_each_role_writes_exactly_the_topics_its_acl_grants(secure_stack: LocalStack) -> None:
    bindings = plan()
    topics = [t for t in TOPICS]
    checked = 0
    for role in ROLE_NAMES:
        options = secure_stack.client_options(role)
        for topic in topics:
            expected = allowed(bindings, role, TOPIC, topic, WRITE)
            try:
                asyncio.run(_send(secure_stack, topic, options))
                wrote = True
            except TopicAuthorizationFailedError:
                wrote = False
            assert wrote == expected, f"{role} {'could' if wrote else 'could not'} write {topic}"
            checked += 1
    assert checked == len(ROLE_NAMES) * len(topics)
    assert not allowed(bindings, "worker", TOPIC, "reviewed", WRITE), "the worker must not forge decisions"


def test_a_role_cannot_read_what_it_was_not_granted(secure_stack: LocalStack) -> None:
    async def read(role: str, topic: str) -> None:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=secure_stack.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            request_timeout_ms=8000,
            **secure_stack.client_options(role),
        )
        await asyncio.wait_for(consumer.start(), 20)
        try:
            await consumer.getmany(timeout_ms=2000)
        finally:
            await consumer.stop()

    asyncio.run(read("dataset-sink", "reviewed"))  # granted
    for role, topic in (("review-sink", "reviewed"), ("console", "review"), ("worker", "labels")):
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(read(role, topic))


def test_the_review_loop_runs_with_every_role_as_its_own_principal_and_no_secret_shows(
    secure_stack: LocalStack, tmp_path: Path
) -> None:
    dirs = {name: tmp_path / name for name in ("registry", "reviewed", "logs", "cache", "base", "media")}
    for path in dirs.values():
        path.mkdir()
    secrets = _passwords(secure_stack)
    seen: list[str] = []

    def no_secret_in_the_process_table() -> None:
        table = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
        assert "modstream.cli" in table and "review serve" in table, "the roles are not running"
        leaked = [role for role, password in secrets.items() if password in table]
        assert not leaked, f"the password of {leaked} is in the process table"
        seen.append("checked")

    run_review_loop(secure_stack, dirs, while_running=no_secret_in_the_process_table)
    assert seen == ["checked"]
    logs = [*dirs["logs"].rglob("*.log"), secure_stack.state_dir / "kafka.log", secure_stack.state_dir / "redis.log"]
    assert len(logs) >= 5
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = [role for role, password in secrets.items() if password in text]
        assert not leaked, f"{path} holds the password of {leaked}"


def test_redis_users_can_do_only_what_their_role_needs(secure_stack: LocalStack) -> None:
    import redis
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    ca = str(secure_stack.state_dir / "tls" / "ca.pem")
    tls = {"port": secure_stack.redis_port, "ssl": True, "ssl_ca_certs": ca}
    # The review Redis speaks only TLS: a plaintext client (even with the right password) gets no answer.
    plain_url = secure_stack.redis_url_for("admin").replace("rediss://", "redis://", 1).partition("?")[0]
    plain = redis.Redis.from_url(plain_url)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    # A client that does not trust the stack's CA refuses the server (the system's CAs don't sign it).
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
        redis.Redis(port=secure_stack.redis_port, ssl=True, ssl_cert_reqs="required").ping()
    with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
        redis.Redis(**tls).ping()
    with pytest.raises(AuthenticationError):
        redis.Redis(**tls, username="review-sink", password="not the password").ping()
    assert all(secure_stack.redis_url_for(role).startswith("rediss://") for role in ("admin", "worker", "console"))

    operator = redis.Redis.from_url(secure_stack.redis_url_for("admin"))
    operator.flushdb()  # the loop test's queue and group, if it ran first
    entry = operator.xadd("modstream:review", {"post_id": "acl-probe"})
    operator.xadd("modstream:review:dead", {"post_id": "acl-probe"})
    operator.xgroup_create("modstream:review", "reviewers", id="0", mkstream=True)

    sink = redis.Redis.from_url(secure_stack.redis_url_for("review-sink"))
    sink.xadd("modstream:review", {"post_id": "acl-probe-2"})  # its job
    for forbidden in (
        lambda: sink.xack("modstream:review", "reviewers", entry),
        lambda: sink.xdel("modstream:review", entry),
        lambda: sink.xtrim("modstream:review", maxlen=0),
        lambda: sink.delete("modstream:review"),
        lambda: sink.xreadgroup("reviewers", "sink", {"modstream:review": ">"}),
    ):
        with pytest.raises(NoPermissionError):
            forbidden()

    worker = redis.Redis.from_url(secure_stack.redis_url_for("worker"))
    worker.set("modstream:dedupe:probe", "1", ex=60)
    assert worker.mget(["modstream:dedupe:probe"]) == [b"1"]
    for forbidden in (
        lambda: worker.xadd("modstream:review", {"post_id": "forged"}),
        lambda: worker.xrange("modstream:review"),
        lambda: worker.set("modstream:review:decided:x", "1"),
    ):
        with pytest.raises(NoPermissionError):
            forbidden()

    console = redis.Redis.from_url(secure_stack.redis_url_for("console"))
    claimed = console.xreadgroup("reviewers", "alice", {"modstream:review": ">"}, count=1)
    assert claimed and console.xack("modstream:review", "reviewers", claimed[0][1][0][0]) == 1
    assert console.xdel("modstream:review:dead", operator.xrange("modstream:review:dead")[0][0]) == 1
    for forbidden in (
        lambda: console.xdel("modstream:review", entry),
        lambda: console.xtrim("modstream:review", maxlen=0),
        lambda: console.delete("modstream:review"),
        lambda: console.xgroup_destroy("modstream:review", "reviewers"),
    ):
        with pytest.raises(NoPermissionError):
            forbidden()
    assert operator.xlen("modstream:review") == 2, "nothing the roles tried deleted an item"
    operator.delete("modstream:review", "modstream:review:dead", "modstream:dedupe:probe")


def test_double_review_and_gold_items_run_under_the_console_redis_user(secure_stack: LocalStack) -> None:
    """Every Redis step of double review and gold items (review/queue.py: the first review parked
    under ~second-review, met again by its own reviewer and parked back, taken by another
    reviewer, the disagreement escalated and settled; a gold item added, answered, scored and
    removed; the Label Studio import's first and second review) as the console's ACL user: a key
    or command its rule lacks is a NoPermissionError."""
    import redis
    import redis.asyncio as aioredis

    from modstream.records import encode
    from review.queue import PARKED, QueueError, ReviewQueue
    from tests.integration.test_review_queue import _item

    operator = redis.Redis.from_url(secure_stack.redis_url_for("admin"))
    operator.flushdb()

    async def run() -> None:
        queue = ReviewQueue(aioredis.Redis.from_url(secure_stack.redis_url_for("console")))
        try:
            await queue.ensure_group()
            for post_id in ("pair-1", "pair-2"):
                operator.xadd("modstream:review", {"post_id": post_id, "item": encode(_item(post_id)).decode()})
            first = await queue.claim("alice")
            assert first is not None and first.item.post_id == "pair-1"
            await queue.first_review_done(first.entry_id, "pair-1", "alice", "d-first", {"hate": "hateful"}, "routed")
            assert await queue.owner(first.entry_id) == PARKED
            assert await queue.decided_decision(first.entry_id, "alice") == ("pair-1", "d-first")
            assert await queue.decided_decision(first.entry_id, "bob") is None
            # alice never gets her own first review back: her next claim is the next item.
            other = await queue.claim("alice")
            assert other is not None and other.item.post_id == "pair-2"
            await queue.release(other.entry_id, "alice")
            second = await queue.claim("bob")  # the parked entry, through the take-second script
            assert second is not None and second.entry_id == first.entry_id
            pair = await queue.pair("pair-1")
            assert pair is not None and pair.first_reviewer == "alice" and pair.first_labels == {"hate": "hateful"}
            await queue.second_review_done(
                second.entry_id, "pair-1", "bob", "d-second", "disagreed", {"hate": "not_hateful"}, "disagreement"
            )
            assert await queue.owner(first.entry_id) is None
            assert [(p["first_reviewer"], p["second_reviewer"], p["outcome"]) for p in await queue.pairs()] == [
                ("alice", "bob", "disagreed")
            ]
            (escalation,) = await queue.escalated()
            assert escalation["post_id"] == "pair-1" and escalation["first_reviewer"] == "alice"
            await queue.settle_escalation(escalation["id"], "pair-1", "d-settled", "root")
            await queue.pair_settled("pair-1", "root", "d-settled")
            settled = await queue.pair("pair-1")
            assert settled is not None and settled.state == "settled"
            # A first reviewer who meets her parked entry again on a takeover parks it back (_park).
            bounced = await queue.claim("bob")
            assert bounced is not None and bounced.item.post_id == "pair-2"
            await queue.first_review_done(bounced.entry_id, "pair-2", "bob", "d-b", {"hate": "hateful"}, "routed")
            operator.xclaim("modstream:review", "reviewers", "bob", 0, [bounced.entry_id], justid=True)
            assert await queue.claim("bob") is None and await queue.owner(bounced.entry_id) == PARKED

            gold = _item("gold-1")
            await queue.add_gold(gold, {"expected": {"hate": "hateful"}, "added_by": "root"})
            assert set(await queue.gold_items()) == {"gold-1"}
            parked = await queue.claim("carol")  # a parked second review comes before new items
            assert parked is not None and parked.item.post_id == "pair-2"
            await queue.release(parked.entry_id, "carol")  # a skip: back in the queue, still a second review
            answered = await queue.claim("dave")
            assert answered is not None and answered.item.post_id == "gold-1"
            assert await queue.gold("gold-1") is not None
            await queue.gold_done(answered.entry_id, "gold-1", answered.reviewer, "d-gold", {"hate": {"ok": True}})
            assert [a["post_id"] for a in await queue.gold_answers()] == ["gold-1"]
            assert await queue.remove_gold("gold-1")

            # The Label Studio import's first and second review (no claim: no owner check).
            imported = operator.xadd("modstream:review", {"post_id": "ls-1", "item": encode(_item("ls-1")).decode()})
            entry = imported.decode()
            labels: dict[str, str | None] = {"hate": "hateful"}
            await queue.first_review_done(entry, "ls-1", "ls-ann", "d-ls1", labels, "routed", claimed=False)
            with pytest.raises(QueueError):  # never one's own second reviewer
                await queue.second_review_done(entry, "ls-1", "ls-ann", "d-ls2", "agreed", labels, "", claimed=False)
            await queue.second_review_done(entry, "ls-1", "ls-ben", "d-ls2", "agreed", labels, "", claimed=False)
            assert await queue.decided_decision(entry) == ("ls-1", "d-ls2")
        finally:
            await queue.client.aclose()

    asyncio.run(run())
    operator.flushdb()
