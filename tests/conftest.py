import os
from collections.abc import Iterator

import pytest

from tests.integration.stack import LocalStack

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """160 synthetic posts at 32 px (the tiny ViT's input size)."""
    from modstream.manifest import read_manifest
    from trainer.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return read_manifest(write_synthetic(out, n=160, seed=5, image_size=32))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One Kafka (KRaft, one node) and Redis on free loopback ports, for the whole test session.

    Needs Java 17+ and, the first time, Maven and Maven Central (the jars are cached in
    ~/.cache/modstream); installs Debian's redis-server when missing and running as root.
    Fails (never skips) when the stack cannot be had: CI must run these tests.
    """
    with LocalStack.with_free_ports(tmp_path_factory.mktemp("stack")).started() as local:
        yield local
