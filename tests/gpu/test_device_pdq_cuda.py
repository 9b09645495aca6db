"""The banks' PDQ taken on the GPU (stream/banks/device_pdq.py): the same hashes as on the CPU
for the same pixels, captioned images included, and, from nvJPEG's decode, near the host path's
hash of the same JPEG. tests/unit/test_device_pdq.py holds the CPU version against Meta's
reference (pdqhash), which the GPU image may lack: only the last test needs it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.device_decode import decode_jpegs_to
from models.images import decode_for_model
from stream.banks.device_pdq import DeviceHashes, DevicePdq
from tests.unit.test_device_decode import _jpeg, _photo

CUDA0 = torch.device("cuda:0")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _captioned(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo under a white caption bar a fifth of its height (the bar trim's case)."""
    width, height = size
    bar = height // 5
    out = Image.new("RGB", size, (255, 255, 255))
    out.paste(_photo((width, height - bar), seed), (0, bar))
    return out


def test_the_gpu_hashes_the_same_pixels_as_the_cpu() -> None:
    pictures = [_photo(size, seed) for seed, size in enumerate([(448, 314), (375, 263), (64, 64), (100, 70)])]
    pictures += [_captioned((448, 336), 7), _captioned((300, 400), 8)]
    images = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pictures]
    on_cpu = DevicePdq()(images)
    on_gpu = DevicePdq()([image.to(CUDA0) for image in images])
    assert sum(h is not None and h.pdq_trimmed is not None for h in on_cpu) == 2  # both captions found
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert isinstance(cpu, DeviceHashes) and isinstance(gpu, DeviceHashes)
        assert gpu.pdq.distance(cpu.pdq) <= 2 and abs(gpu.pdq.quality - cpu.pdq.quality) <= 1
        assert (gpu.pdq_trimmed is None) == (cpu.pdq_trimmed is None)
        if gpu.pdq_trimmed is not None and cpu.pdq_trimmed is not None:
            assert gpu.pdq_trimmed.distance(cpu.pdq_trimmed) <= 2


def test_nvjpeg_and_the_hook_give_a_hash_near_the_host_paths() -> None:
    pytest.importorskip("pdqhash", reason="no pdqhash on this image: the host path's hash cannot be taken")
    from stream.banks.hashing import pdq_hash

    bodies = [_jpeg(_photo((1000, 700), seed), quality=90) for seed in range(16)]
    buf = io.BytesIO()
    _captioned((800, 600), 3).save(buf, "JPEG", quality=90)
    bodies.append(buf.getvalue())
    decoded = decode_jpegs_to(bodies, 224, CUDA0, DevicePdq())
    assert decoded.failed == []
    distances = []
    for row, body in enumerate(bodies):
        found = decoded.found[row]
        assert isinstance(found, DeviceHashes)
        distances.append(found.pdq.distance(pdq_hash(decode_for_model(body))))
    assert max(distances) <= 10 and np.mean(distances) <= 4, distances  # the banks match within 31
