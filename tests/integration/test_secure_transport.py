"""Authenticated transport on a real secured broker (deploy/local-stack.sh with
MODSTREAM_STACK_SECURE=1: SASL_SSL only, SCRAM-SHA-512, StandardAuthorizer, an ACL per role).

- a client without credentials, with a wrong password, or that does not trust the stack's CA
  cannot connect: the broker (or TLS) refuses, and the test shows the error;
- each role's principal can write exactly the topics modstream/kafka_acls.py grants it (the
  worker cannot forge a decision on `reviewed`), and read only its own;
- the whole review loop of test_review_loop.py passes with every process as its own principal;
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
from tests.integration.stack import TOPICS, LocalStack, StackError
from tests.integration.test_review_loop import run_review_loop

ROLE_NAMES = tuple(ROLES)


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = LocalStack.with_free_ports(tmp_path_factory.mktemp("secure-stack"), secure=True)
    try:
        error = None
        try:
            local.start()
        except StackError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"could not start the secured stack: {error}", pytrace=False)
        yield local
    finally:
        local.shutdown()


def _passwords(stack: LocalStack) -> dict[str, str]:
    return {role: (stack.credentials(role) / "MODSTREAM_KAFKA_PASSWORD").read_text() for role in ("admin", *ROLE_NAMES)}


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
