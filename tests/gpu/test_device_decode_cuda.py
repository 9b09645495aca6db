"""JPEGs decoded on the GPU with nvJPEG (models/device_decode.py, the worker's --device-decode):
the same pixels and labels as the host path within the stated tolerance, and a bad JPEG falls
back alone. tests/unit/test_device_decode.py runs the same logic on the CPU decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.card import ModelCard
from models.device_decode import EncodedJpeg, decode_jpegs_to, jpeg_header_ok
from models.images import decode_for_model, model_input
from models.inference import Predictor
from tests.unit.test_device_decode import _jpeg, _photo

CUDA0 = torch.device("cuda:0")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _photo_jpeg(size: tuple[int, int], seed: int) -> bytes:
    return _jpeg(_photo(size, seed), quality=90)


def test_nvjpeg_pixels_match_the_host_path_within_a_few_grey_levels() -> None:
    bodies = [_photo_jpeg(size, seed) for seed, size in enumerate([(1000, 700), (700, 1000), (1600, 1200), (300, 200)])]
    decoded = decode_jpegs_to(bodies, 224, CUDA0)
    assert decoded.failed == [] and decoded.pixels.device.type == "cuda"
    for row, body in zip(decoded.pixels.cpu().numpy().astype(np.int16), bodies, strict=True):
        host = np.asarray(model_input(decode_for_model(body), 224), dtype=np.int16)
        diff = np.abs(row - host.transpose(2, 0, 1))
        assert diff.mean() <= 4.0, diff.mean()  # nvJPEG's IDCT and upsampling are not libjpeg-turbo's
        assert np.percentile(diff, 99) <= 20, np.percentile(diff, 99)


def test_a_bad_jpeg_fails_alone_on_the_gpu_and_the_batch_is_decoded_as_without_it() -> None:
    good = [_photo_jpeg((1000, 700), seed) for seed in range(3)]
    garbage = b"\xff\xd8\xff" + bytes(range(256)) * 8
    alone = decode_jpegs_to(good, 224, CUDA0)
    mixed = decode_jpegs_to([good[0], garbage, good[1], good[2]], 224, CUDA0)
    assert mixed.failed == [1]
    assert torch.equal(mixed.pixels[[0, 2, 3]], alone.pixels)


def test_labels_from_the_gpu_decode_match_the_host_path_within_tolerance() -> None:
    from tests.tiny import tiny_model

    model, tok = tiny_model()
    predictor = Predictor(model, tok, ModelCard(config=model.config, version="v1"), CUDA0)
    side = predictor.images.size
    bodies = [_photo_jpeg((1000, 700), seed) for seed in range(4)]
    assert all(jpeg_header_ok(b) for b in bodies)
    texts = [f"caption {i}" for i in range(4)]
    on_gpu = predictor.predict(texts, [EncodedJpeg(b) for b in bodies])
    on_host = predictor.predict(texts, [decode_for_model(b, side) for b in bodies])
    for gpu, host in zip(on_gpu, on_host, strict=True):
        assert gpu.image_error is None and gpu.itm_match is not None
        assert gpu.itm_match == pytest.approx(host.itm_match, abs=0.02)
        for task, prediction in gpu.tasks.items():
            assert prediction.score == pytest.approx(host.tasks[task].score, abs=0.02)
