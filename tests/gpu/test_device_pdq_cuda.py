"""The banks' PDQ taken on the GPU (stream/banks/device_pdq.py): the same hashes as on the CPU
for the same pixels, and, from nvJPEG's decode, near the host path's hash of the same JPEG.
tests/unit/test_device_pdq.py holds the CPU version against Meta's reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pdqhash", reason="the GPU image has no pdqhash wheel: the banks cannot run there")

from models.device_decode import decode_jpegs_to
from models.images import decode_for_model
from stream.banks.device_pdq import DeviceHashes, DevicePdq
from stream.banks.hashing import pdq_hash
from tests.unit.test_device_decode import _jpeg, _photo

CUDA0 = torch.device("cuda:0")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def test_the_gpu_hashes_the_same_pixels_as_the_cpu() -> None:
    images = [
        torch.from_numpy(np.array(_photo(size, seed))).permute(2, 0, 1)
        for seed, size in enumerate([(1000, 700), (375, 263), (64, 64), (100, 40), (448, 131)])
    ]
    on_cpu = DevicePdq()(images)
    on_gpu = DevicePdq()([image.to(CUDA0) for image in images])
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert isinstance(cpu, DeviceHashes) and isinstance(gpu, DeviceHashes)
        assert gpu.pdq.distance(cpu.pdq) <= 2 and abs(gpu.pdq.quality - cpu.pdq.quality) <= 1


def test_nvjpeg_and_the_hook_give_a_hash_near_the_host_paths() -> None:
    bodies = [_jpeg(_photo((1000, 700), seed), quality=90) for seed in range(16)]
    decoded = decode_jpegs_to(bodies, 224, CUDA0, DevicePdq())
    assert decoded.failed == []
    distances = [decoded.found[row].pdq.distance(pdq_hash(decode_for_model(body))) for row, body in enumerate(bodies)]  # type: ignore[attr-defined]
    assert max(distances) <= 10 and np.mean(distances) <= 4, distances  # the banks match within 31
