import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """160 synthetic posts at 32 px (the tiny ViT's input size)."""
    from trainer.manifest import read_manifest
    from trainer.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return read_manifest(write_synthetic(out, n=160, seed=5, image_size=32))
