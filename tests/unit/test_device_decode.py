"""models/device_decode.py on the CPU (torchvision's libjpeg-turbo decoder stands in for nvJPEG:
the same calls, batching and fallback); tests/gpu/test_device_decode_cuda.py runs it on nvJPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.device_decode import decode_jpegs_to, frame_header, jpeg_header_ok, squash
from models.images import decode_for_model, model_input

# pytest restores the warning filters for each test, dropping the module's own (it is planned for).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _jpeg(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth shapes plus grain, like a photo (pure noise is no photo to compare resizes on)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def _host(data: bytes, side: int = 224) -> np.ndarray:
    """What the worker's host path gives the model for the same bytes."""
    image = model_input(decode_for_model(data, side), side)
    return np.asarray(image, dtype=np.int16).transpose(2, 0, 1)


def test_the_header_check_lets_only_plain_jpegs_within_the_budget_through() -> None:
    photo = _photo((1000, 700))
    assert jpeg_header_ok(_jpeg(photo))
    assert jpeg_header_ok(_jpeg(photo.convert("L")))
    assert not jpeg_header_ok(_jpeg(photo.convert("CMYK")))  # Pillow decodes CMYK on the host
    png = io.BytesIO()
    photo.save(png, format="PNG")
    assert not jpeg_header_ok(png.getvalue())
    assert not jpeg_header_ok(_jpeg(photo), max_pixels=999 * 700)  # nvJPEG decodes at full size
    assert not jpeg_header_ok(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG magic with no header after it
    assert not jpeg_header_ok(b"")


def test_without_simplejpeg_pillow_checks_the_header_the_same_way(monkeypatch) -> None:
    """A GPU image built without simplejpeg still hands JPEGs over, and still refuses the rest."""
    import models.device_decode as device_decode

    monkeypatch.setattr(device_decode, "simplejpeg", None)
    photo = _photo((1000, 700))
    assert jpeg_header_ok(_jpeg(photo)) and jpeg_header_ok(_jpeg(photo.convert("L")))
    assert not jpeg_header_ok(_jpeg(photo.convert("CMYK")))
    assert not jpeg_header_ok(_jpeg(photo), max_pixels=999 * 700)
    assert not jpeg_header_ok(b"\xff\xd8\xff\xe0" + b"\x00" * 64)


def test_progressive_and_arithmetic_or_12_bit_jpegs_stay_on_the_host() -> None:
    """nvJPEG's hardware path takes sequential Huffman JPEGs; torchvision decodes the others in
    software, full size, one at a time on the device thread: the host does them, DCT-scaled."""
    photo = _photo((1000, 700))
    progressive = _jpeg(photo, progressive=True)
    assert frame_header(progressive).sof == 0xC2 and not jpeg_header_ok(progressive)
    for sof, precision in ((0xC9, 8), (0xC0, 12)):  # arithmetic-coded; 12-bit samples
        data = bytearray(_jpeg(photo))
        at = data.index(b"\xff\xc0")
        data[at + 1], data[at + 4] = sof, precision
        assert not jpeg_header_ok(bytes(data))


def test_a_file_of_endless_tiny_segments_is_refused_after_a_bounded_walk() -> None:
    padding = b"\xff\xfe\x00\x02" * 200_000  # 200,000 empty comments before any frame header
    data = b"\xff\xd8" + padding + _jpeg(_photo((64, 48)))[2:]
    assert frame_header(data) is None and not jpeg_header_ok(data)


def test_a_crafted_header_declaring_a_huge_image_stays_on_the_host() -> None:
    """The SOF0 marker carries the size; a 60000 x 60000 declaration must not reach nvJPEG."""
    data = bytearray(_jpeg(_photo((64, 48))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    assert not jpeg_header_ok(bytes(data))


def test_a_corrupt_jpeg_fails_alone_and_the_rest_of_the_batch_is_decoded_as_without_it() -> None:
    good = [_jpeg(_photo((1000, 700), seed=s)) for s in range(3)]
    truncated = good[0][: len(good[0]) // 3]
    garbage = b"\xff\xd8\xff" + bytes(range(256)) * 8
    alone = decode_jpegs_to(good, 224, "cpu")
    mixed = decode_jpegs_to([good[0], truncated, good[1], garbage, good[2]], 224, "cpu")
    assert alone.failed == [] and mixed.failed == [1, 3]
    assert torch.equal(mixed.pixels[[0, 2, 4]], alone.pixels)
    assert not mixed.pixels[[1, 3]].any()  # a failed row is zeros until the host decodes it


def test_a_big_batch_is_decoded_in_calls_under_the_pixel_budget_with_the_same_pixels(monkeypatch) -> None:
    import models.device_decode as device_decode

    bodies = [_jpeg(_photo((1000, 700), seed=s)) for s in range(5)]
    whole = decode_jpegs_to(bodies, 64, "cpu")
    calls = []
    real = device_decode._decode
    monkeypatch.setattr(device_decode, "_decode", lambda enc, dev: calls.append(len(enc)) or real(enc, dev))
    monkeypatch.setattr(device_decode, "CALL_MAX_PIXELS", 2 * 1000 * 700)
    split = decode_jpegs_to(bodies, 64, "cpu")
    assert calls == [2, 2, 1] and split.failed == [] and torch.equal(split.pixels, whole.pixels)


def test_a_call_that_runs_out_of_device_memory_is_split_until_it_fits(monkeypatch) -> None:
    import models.device_decode as device_decode

    bodies = [_jpeg(_photo((400, 300), seed=s)) for s in range(4)]
    whole = decode_jpegs_to(bodies, 64, "cpu")
    real = device_decode._decode

    def small_device(encoded, device):  # type: ignore[no-untyped-def]
        if len(encoded) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(encoded, device)

    monkeypatch.setattr(device_decode, "_decode", small_device)
    split = decode_jpegs_to(bodies, 64, "cpu")
    assert split.failed == [] and torch.equal(split.pixels, whole.pixels)


@pytest.mark.parametrize("size", [(1000, 700), (700, 1000), (1600, 1200), (300, 200)])
def test_device_pixels_match_the_host_path_within_a_few_grey_levels(size: tuple[int, int]) -> None:
    """The tolerance the device path is held to: it resizes the full decode where the host
    resizes a DCT-scaled one, so pixels may differ, but by a few levels on average."""
    data = _jpeg(_photo(size, seed=size[0]), quality=90)
    device = decode_jpegs_to([data], 224, "cpu").pixels[0].numpy().astype(np.int16)
    diff = np.abs(device - _host(data))
    assert diff.mean() <= 3.0, diff.mean()
    assert np.percentile(diff, 99) <= 16, np.percentile(diff, 99)


def test_images_of_one_size_are_resized_as_a_stack_with_the_pixels_one_at_a_time_gives(monkeypatch) -> None:
    import models.device_decode as device_decode
    from models.device_decode import host_sized

    sizes = [(640, 480), (300, 200), (640, 480), (640, 480), (300, 200), (480, 640)]
    bodies = [_jpeg(_photo(size, seed=s)) for s, size in enumerate(sizes)]
    seen: list[torch.Tensor] = []
    stacks: list[int] = []
    real_same_size = device_decode._same_size
    grouped = lambda images: [stacks.append(len(g)) or g for g in real_same_size(images)]  # noqa: E731
    monkeypatch.setattr(device_decode, "_same_size", grouped)
    monkeypatch.setattr(device_decode, "STACK_MAX_PIXELS", 2 * 640 * 480)
    out = decode_jpegs_to(bodies, 64, "cpu", lambda images: seen.extend(images) or list(range(len(images))))
    assert sorted(stacks) == [1, 1, 2, 2]  # 640x480 three (a stack of two, one), 300x200 two, 480x640 one
    assert out.pixels.dtype == torch.uint8 and out.failed == []
    assert sorted(out.found) == list(range(len(bodies)))
    for row, body in enumerate(bodies):
        (single,) = device_decode._decode([torch.frombuffer(bytearray(body), dtype=torch.uint8)], torch.device("cpu"))
        assert torch.equal(out.pixels[row], device_decode.squash(single, 64))
    assert sorted(tuple(im.shape) for im in seen) == sorted(tuple(host_sized(_decoded(b), 64).shape) for b in bodies)


def _decoded(body: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(body), dtype=torch.uint8), mode=ImageReadMode.RGB)


def test_squash_keeps_the_whole_image_and_leaves_a_model_sized_one_alone() -> None:
    image = torch.zeros(3, 100, 400, dtype=torch.uint8)
    image[:, :, :200] = 255  # left half white: squashing keeps it the left half
    out = squash(image, 50)
    assert out.shape == (3, 50, 50) and out.dtype == torch.uint8
    assert out[:, :, :24].min() == 255 and out[:, :, 26:].max() == 0
    square = torch.ones(3, 50, 50, dtype=torch.uint8)
    assert squash(square, 50) is square


def test_an_empty_batch_decodes_to_nothing() -> None:
    out = decode_jpegs_to([], 224, "cpu")
    assert out.pixels.shape == (0, 3, 224, 224) and out.failed == []


# --- the predictor: JPEGs handed over undecoded (the worker's --device-decode) -------------------


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    from models.card import ModelCard
    from models.inference import Predictor
    from tests.tiny import tiny_model

    model, tok = tiny_model()
    return Predictor(model, tok, ModelCard(config=model.config, version="v1"), "cpu")


def _scores(prediction) -> list[float]:  # type: ignore[no-untyped-def]
    return [p.score for p in prediction.tasks.values()]


def _host_image(data: bytes, side: int) -> Image.Image:
    return decode_for_model(data, side)


def test_the_predictor_decodes_a_handed_over_jpeg_and_scores_it_as_the_host_path(predictor) -> None:
    from models.device_decode import EncodedJpeg

    side = predictor.images.size
    data = _jpeg(_photo((400, 300), seed=3), quality=90)
    texts = ["a caption", "a caption", "text only"]
    images = [EncodedJpeg(data), _host_image(data, side), None]
    # What the model is fed: the device's pixels for the JPEG, within a few levels of the host's.
    batch = predictor.prepare(texts, images)
    decoded = predictor._device_pixels(batch)
    pixels, present = decoded.pixels, decoded.present
    assert present.tolist() == [True, True, False] and decoded.errors == {} and decoded.found == {}
    diff = (pixels[0].int() - pixels[1].int()).abs().float()
    # At the tiny model's 32 px the host decodes at 1/8 scale (50 x 38): softer than at 224 px,
    # where test_device_pixels_match_the_host_path_within_a_few_grey_levels holds it to 3.
    assert diff.mean() <= 8.0 and pixels[0].float().std() > 20  # a picture, not zeros
    assert not batch.pixels[0].any() and not batch.present[0]  # running a batch leaves it as prepared
    device = predictor.predict(texts, images)
    assert device[0].itm_match is not None and device[0].image_error is None and device[2].itm_match is None
    # The tolerance on scores: the device squashes the full decode, the host a DCT-scaled one.
    assert _scores(device[0]) == pytest.approx(_scores(device[1]), abs=0.05)


def test_a_jpeg_the_device_refuses_is_decoded_on_the_host_with_the_same_pixels(predictor, monkeypatch) -> None:
    import models.device_decode as device_decode
    from models.device_decode import EncodedJpeg

    def refuse(encoded, device):  # type: ignore[no-untyped-def]
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(device_decode, "_decode", refuse)
    side = predictor.images.size
    data = _jpeg(_photo((400, 300), seed=4))
    fallback, host = predictor.predict(["x", "x"], [EncodedJpeg(data), _host_image(data, side)])
    assert fallback.image_error is None
    assert fallback.itm_match == pytest.approx(host.itm_match, abs=1e-6)  # float noise of two rows, no more
    assert _scores(fallback) == pytest.approx(_scores(host), abs=1e-6)


def test_a_jpeg_neither_can_decode_is_scored_on_its_text_alone_and_says_why(predictor) -> None:
    from models.device_decode import EncodedJpeg

    good = _jpeg(_photo((400, 300), seed=5))
    broken = good[:1000]  # the header and a sliver of the scan: jpeg_header_ok passes it
    assert jpeg_header_ok(broken)
    out = predictor.predict(["x", "x", "x"], [EncodedJpeg(broken), None, EncodedJpeg(good)])
    assert out[0].image_error is not None and out[0].image_error.reason in {"truncated", "corrupt"}
    assert out[0].itm_match is None and _scores(out[0]) == _scores(out[1])  # exactly the text-only post
    assert out[2].image_error is None and out[2].itm_match is not None  # the batch went on
