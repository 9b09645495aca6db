"""The GPU suite runs only where CUDA is available (a lent GPU machine: tests/gpu/run_all.sh)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
SKIP_REASON = "CUDA is not available: tests/gpu runs on a GPU machine (tests/gpu/run_all.sh)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _minilm_tokenizer() -> None:
    if CUDA:
        from tests.gpu.assets import ensure_minilm

        ensure_minilm()
