from __future__ import annotations

import hashlib
import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.images import (
    ALLOWED_FORMATS,
    MAX_PIXELS,
    ImageError,
    content_hash,
    decode_image,
    load_image,
)


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noisy(size: int = 64, seed: int = 0) -> Image.Image:
    # Noise does not compress, so cutting the file really cuts pixel data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes, colour_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes_to_rgb(fmt: str) -> None:
    img = Image.new("RGB", (20, 10), (200, 30, 40))
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (20, 10)
    r, g, b = out.getpixel((5, 5))  # type: ignore[misc]
    assert r > 150 and g < 80 and b < 80


def test_palette_and_grey_images_become_rgb() -> None:
    assert decode_image(_encode(Image.new("P", (8, 8), 3), "PNG")).mode == "RGB"
    grey = decode_image(_encode(Image.new("L", (8, 8), 77), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)


def test_transparent_pixels_are_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(_encode(img, "PNG"))
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_animated_gif_yields_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3  # type: ignore[attr-defined]
    out = decode_image(data)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))  # type: ignore[misc]
    assert r > 200 and g < 50 and b < 50


def test_real_compressed_bomb_is_refused_before_decoding() -> None:
    # 4000x4000 grey pixels of zeros: ~16 MB of pixels packed into a few KB.
    side = 4000
    raw = (b"\x00" + b"\x00" * side) * side
    data = _png(side, side, zlib.compress(raw, 9), colour_type=0)
    assert len(data) < 100_000
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=1_000_000)
    assert info.value.reason == "decompression_bomb"
    assert "4000x4000" in str(info.value)
    assert "1,000,000" in str(info.value)


def test_declared_size_over_our_limit_is_refused() -> None:
    # 7000x7000 = 49 MP: above MAX_PIXELS (40 MP) but below Pillow's own 89 MP limit,
    # so only our check stands between this header and a 147 MB allocation.
    assert MAX_PIXELS < 7000 * 7000
    with pytest.raises(ImageError) as info:
        decode_image(_png(7000, 7000, zlib.compress(b"\x00" * 64)))
    assert info.value.reason == "decompression_bomb"


def test_pillow_bomb_warning_is_an_error_not_a_warning() -> None:
    # 10000x10000 = 100 MP: in Pillow's "warn only" band (89-179 MP). With our own limit
    # raised out of the way, the promoted warning must still stop it, and no warning leaks.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as info:
            decode_image(_png(10_000, 10_000, zlib.compress(b"\x00" * 64)), max_pixels=10**9)
    assert info.value.reason == "decompression_bomb"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_hard_bomb_limit_is_an_image_error() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(_png(20_000, 20_000, zlib.compress(b"\x00" * 64)), max_pixels=10**9)
    assert info.value.reason == "decompression_bomb"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF"])
def test_truncated_file(fmt: str) -> None:
    data = _encode(_noisy(), fmt)
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason == "truncated"
    assert "truncated" in str(info.value)


def test_damaged_header_is_corrupt_not_unsupported() -> None:
    # A well-formed PNG start whose IHDR checksum is wrong.
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.reason == "corrupt"


@pytest.mark.parametrize(
    "data",
    [
        _encode(Image.new("RGB", (8, 8)), "TIFF"),
        _encode(Image.new("RGB", (8, 8)), "PPM"),
        b"hello, this is plain text and not an image\n",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ],
    ids=["tiff", "ppm", "text", "svg"],
)
def test_unsupported_formats(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.reason == "unsupported_format"
    assert "PNG" in str(info.value)  # the message lists what is allowed


def test_empty_data() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(b"")
    assert info.value.reason == "empty"


def test_mutated_files_only_raise_image_error() -> None:
    # Random byte corruption must surface as ImageError (or decode), never a raw exception.
    rng = random.Random(1234)
    seeds = [_encode(_noisy(24, s), fmt) for s, fmt in enumerate(ALLOWED_FORMATS)]
    outcomes: set[str] = set()
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 64))] = rng.randrange(256)
        try:
            assert decode_image(bytes(data)).mode == "RGB"
            outcomes.add("ok")
        except ImageError as exc:
            assert exc.reason in {
                "unsupported_format",
                "corrupt",
                "truncated",
                "decompression_bomb",
            }
            outcomes.add(exc.reason)
    assert len(outcomes) >= 2  # the corruption actually exercised error paths


def test_load_image_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("RGB", (12, 7), (0, 128, 0)).save(path)
    img = load_image(path)
    assert img.size == (12, 7) and img.mode == "RGB"


def test_load_image_sniffs_content_not_extension(tmp_path: Path) -> None:
    # The CM-Off-Meme sample names JPEG files *.png; the extension must not matter.
    path = tmp_path / "really_a_jpeg.png"
    Image.new("RGB", (9, 9), (10, 20, 30)).save(path, format="JPEG")
    assert load_image(path).size == (9, 9)


def test_load_image_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.reason == "missing"
    assert "nope.png" in str(info.value)


def test_load_image_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_encode(_noisy(64), "PNG"))
    with pytest.raises(ImageError) as info:
        load_image(path, max_bytes=1000)
    assert info.value.reason == "too_large"
    assert load_image(path).size == (64, 64)  # the default cap lets it through


def test_load_image_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        load_image(tmp_path)
    assert info.value.reason == "unreadable"


def test_load_image_prefixes_path_and_keeps_reason(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    data = _encode(_noisy(), "PNG")
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == "truncated"
    assert str(info.value).startswith(str(path))


def test_load_image_passes_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=5_000)
    assert info.value.reason == "decompression_bomb"


def test_content_hash_is_sha256_hex() -> None:
    data = b"\x89PNG some bytes"
    assert content_hash(data) == hashlib.sha256(data).hexdigest()
    assert content_hash(data) != content_hash(data + b"!")
    assert len(content_hash(b"")) == 64


# --- bounded decoding ---------------------------------------------------------------------------


def _flat(mode: str, size: tuple[int, int]) -> Image.Image:
    if mode == "P":
        return Image.new("RGB", size, (200, 30, 60)).convert("P")
    fill = {"L": 128, "RGBA": (10, 200, 30, 255)}.get(mode, (10, 200, 30))
    return Image.new(mode, size, fill)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"),
     ("BMP", "RGB")],
)  # fmt: skip
@pytest.mark.parametrize("size", [(3000, 1000), (900, 2700)])
def test_decode_shrinks_to_max_side_keeping_the_aspect_ratio(fmt: str, mode: str, size: tuple[int, int]) -> None:
    data = _encode(_flat(mode, size), fmt)
    img = decode_image(data, max_side=448)
    assert img.mode == "RGB"
    assert max(img.size) == 448  # bounded, and not shrunk further than the bound asks
    assert img.size[0] / img.size[1] == pytest.approx(size[0] / size[1], rel=0.01)


@pytest.mark.parametrize(
    ("size", "scaled"), [((1000, 700), (500, 350)), ((700, 1000), (350, 500)), ((3600, 900), (450, 113))]
)
def test_bounded_jpeg_decodes_at_a_reduced_dct_scale_whatever_its_shape(monkeypatch, size, scaled) -> None:
    """A landscape or portrait JPEG decodes at the smallest DCT scale that still covers the
    bound (a square box would keep it at full scale: its short side is below the box)."""
    import models.images as images

    decoded_at = []
    decode_jpeg = images.simplejpeg.decode_jpeg

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        pixels = decode_jpeg(*args, **kwargs)
        decoded_at.append((pixels.shape[1], pixels.shape[0]))
        return pixels

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", recording)
    img = decode_image(_encode(_flat("RGB", size), "JPEG"), max_side=448)
    assert decoded_at == [scaled]
    assert max(img.size) == 448 and img.getpixel((10, 10)) == pytest.approx((10, 200, 30), abs=3)


def test_pillow_decodes_what_simplejpeg_will_not_at_the_same_reduced_scale(monkeypatch) -> None:
    """The fallback (a CMYK JPEG, or data simplejpeg refuses) keeps Pillow's DCT-scaled draft."""
    from PIL import JpegImagePlugin

    decoded_at = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):  # type: ignore[no-untyped-def]
        result = draft(self, mode, size)
        decoded_at.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    cmyk = _flat("RGB", (1000, 700)).convert("CMYK")
    img = decode_image(_encode(cmyk, "JPEG"), max_side=448)
    assert decoded_at == [(500, 350)] and img.mode == "RGB" and img.size == (448, 314)


def test_simplejpeg_and_pillow_decode_a_photo_to_the_same_pixels(monkeypatch) -> None:
    import models.images as images

    rng = np.random.default_rng(5)
    coarse = Image.fromarray(rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)).resize((1000, 700), Image.BICUBIC)
    data = _encode(coarse, "JPEG")
    fast = decode_image(data, max_side=448)
    monkeypatch.setattr(images, "_decode_jpeg_scaled", lambda *args: None)
    slow = decode_image(data, max_side=448)
    assert fast.size == slow.size
    diff = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(slow, dtype=np.int16))
    assert diff.max() <= 2, diff.max()  # the same libjpeg-turbo IDCT; Pillow's bundled build may differ by a level


def test_bounded_decode_keeps_colours() -> None:
    img = decode_image(_encode(_flat("RGB", (2000, 1000)), "PNG"), max_side=100)
    assert img.getpixel((50, 25)) == (10, 200, 30)


def test_small_images_are_not_enlarged_and_unbounded_decode_keeps_full_size() -> None:
    assert decode_image(_encode(_noisy(64), "PNG"), max_side=448).size == (64, 64)
    assert decode_image(_encode(_flat("RGB", (1200, 600)), "PNG")).size == (1200, 600)


def test_bounded_decode_keeps_the_guards() -> None:
    big = _encode(_flat("RGB", (2000, 2000)), "PNG")
    with pytest.raises(ImageError) as bomb:
        decode_image(big, max_pixels=1_000_000, max_side=448)
    assert bomb.value.reason == "decompression_bomb"
    jpeg = _encode(_noisy(512), "JPEG")
    with pytest.raises(ImageError) as cut:
        decode_image(jpeg[: len(jpeg) // 2], max_side=64)
    assert cut.value.reason == "truncated"
    with pytest.raises(ImageError) as other:
        decode_image(_encode(_noisy(64), "TIFF"), max_side=64)
    assert other.value.reason == "unsupported_format"


# --- decoding for the model's input (min_side): one resize per JPEG photo ---------------------


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((1000, 700), (375, 263)),  # 3/8: the smallest eighth whose short side still reaches 224
        ((700, 1000), (263, 375)),
        ((1600, 1200), (400, 300)),  # 2/8
    ],
)
def test_a_jpeg_decodes_at_the_smallest_dct_scale_covering_the_model_input_and_is_not_resized(
    monkeypatch, size, decoded
) -> None:
    import models.images as images

    resized = []
    monkeypatch.setattr(images, "bounded_rgb", lambda img, side: resized.append(img.size) or img)
    img = decode_image(_encode(_flat("RGB", size), "JPEG"), max_side=448, min_side=224)
    assert img.size == decoded and min(img.size) >= 224 and max(img.size) <= 448
    assert resized == []  # the model's resize is the only one left
    assert img.mode == "RGB" and img.getpixel((10, 10)) == pytest.approx((10, 200, 30), abs=3)


@pytest.mark.parametrize("size", [(4000, 3000), (3600, 900), (40000, 300), (120, 90)])
def test_min_side_never_decodes_larger_than_the_bound_alone_and_still_bounds(monkeypatch, size) -> None:
    """A strip or a big photo whose smallest covering scale is still over the bound is bounded
    as before, and its DCT scale is never above the one the bound alone picks (a hostile
    40000 x 300 strip must not decode at full width); a small image stays as it is."""
    import models.images as images

    decoded_at = []
    decode_jpeg = images.simplejpeg.decode_jpeg

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        pixels = decode_jpeg(*args, **kwargs)
        decoded_at.append(pixels.shape[0] * pixels.shape[1])
        return pixels

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", recording)
    data = _encode(_flat("RGB", size), "JPEG")
    plain, covering = decode_image(data, max_side=448), decode_image(data, max_side=448, min_side=224)
    assert decoded_at[1] <= decoded_at[0]
    assert max(covering.size) <= 448
    assert covering.size == plain.size or min(covering.size) >= min(224, *plain.size)


def test_min_side_leaves_other_formats_bounded_as_before() -> None:
    data = _encode(_flat("RGB", (1000, 700)), "PNG")
    assert decode_image(data, max_side=448, min_side=224).size == decode_image(data, max_side=448).size == (448, 314)


def test_the_banks_hash_a_decided_jpeg_from_the_pixels_the_default_worker_hashes() -> None:
    """review.bank_verdicts.hashes_of and the worker's decode (FetchConfig defaults) must hash
    the same pixels: a banked decision matches its own repost at distance 0."""
    from review.bank_verdicts import hashes_of
    from stream.media import FetchConfig, decode_and_read

    rng = np.random.default_rng(9)
    photo = Image.fromarray(rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)).resize((1000, 700), Image.BICUBIC)
    data = _encode(photo, "JPEG")
    worker = decode_and_read(data, None, FetchConfig(pdq=True), None)
    assert worker.image.size == (375, 263)
    assert worker.pdq is not None and hashes_of(data)[0].bits == worker.pdq.bits


def test_a_worker_reading_image_text_hashes_a_jpeg_as_the_bank_side_does_too() -> None:
    """With OCR the image is first decoded larger for the OCR engine; the model and the banks
    must still get the DCT-scaled decode the bank side hashes, not that copy shrunk."""
    from review.bank_verdicts import hashes_of
    from stream.media import FetchConfig, decode_and_read

    class SeesSize:
        def read(self, image: Image.Image, digest: str | None) -> str:
            return f"{image.width}x{image.height}"

    rng = np.random.default_rng(9)
    photo = Image.fromarray(rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)).resize((1000, 700), Image.BICUBIC)
    data = _encode(photo, "JPEG")
    worker = decode_and_read(data, None, FetchConfig(pdq=True), SeesSize())  # type: ignore[arg-type]
    assert worker.text == "1000x700"  # OCR read the larger copy
    assert worker.image.size == (375, 263)
    assert worker.pdq is not None and hashes_of(data)[0].bits == worker.pdq.bits
