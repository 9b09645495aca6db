"""Fixtures for tests against a real Kafka 4.x broker and a real redis-server (deploy/local-stack.sh)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import LocalStack, StackError

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs the real local Kafka + Redis stack (started by deploy/local-stack.sh)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration is an integration test: `-m "not integration"` leaves it out.
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Kafka (KRaft, one node) and Redis on free loopback ports, for the whole test session.

    Needs Java 17+ and, the first time, Maven and Maven Central (the jars are cached in
    ~/.cache/modstream); installs Debian's redis-server when missing and running as root.
    Fails (never skips) when the stack cannot be had: CI must run these tests.
    """
    local = LocalStack.with_free_ports(tmp_path_factory.mktemp("stack"))
    try:
        error = None
        try:
            local.start()
        except StackError as exc:
            error = str(exc)
        if error is not None:  # outside the except block: no chained traceback, just the script's story
            pytest.fail(f"could not start the local Kafka + Redis stack: {error}", pytrace=False)
        yield local
    finally:
        local.shutdown()
