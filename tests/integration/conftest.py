"""Fixtures for tests against a real Kafka 4.x broker and a real redis-server (deploy/local-stack.sh)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modstream.manifest import read_manifest
from stream.media_server import BackgroundMediaServer
from tests.integration.worker_harness import register_tiny_model
from trainer.synthetic import write_synthetic

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


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with a tiny random model (weights don't matter to the stream's guarantees)."""
    root = tmp_path_factory.mktemp("registry")
    register_tiny_model(root)
    return root


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list]]:
    """Synthetic images on a loopback server running in its own thread's event loop, and
    the examples they belong to."""
    root = tmp_path_factory.mktemp("media")
    examples = read_manifest(write_synthetic(root, n=200, seed=3, image_size=48))
    server = BackgroundMediaServer(root / "images")
    try:
        yield server.url, examples
    finally:
        server.stop()


DEMO_DIRS = ("registry", "cache", "base")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `make run` demo model (stream/demo.py: ~90-150 s of single-threaded training on two
    cores), trained once per session into a folder holding its registry, feature cache and base
    data; a test takes its own copy with `copy_demo_model`, so what it promotes or retrains
    stays its own."""
    from models.registry import ModelRegistry
    from stream.demo import ensure_default_model

    root = tmp_path_factory.mktemp("demo-model")
    for name in DEMO_DIRS:
        (root / name).mkdir()
    ensure_default_model(ModelRegistry(root / "registry"), root / "cache", root / "base")
    return root


def copy_demo_model(demo_model: Path, dirs: dict[str, Path]) -> None:
    """The session's trained demo model into a test's own registry, cache and base folders."""
    import shutil

    for name in DEMO_DIRS:
        shutil.copytree(demo_model / name, dirs[name], dirs_exist_ok=True)
