"""Reposts of an image, as the verdict-bank acceptance (issue 20) describes them, and the
worker's way of hashing one: shared by tests/unit/test_banks.py and bench/bank_lookup.py, and
ready for the integration test, so all three mean the same thing by "cropped 5%".

A repost is the bytes a poster would upload: JPEG at quality 60; resized to 80%; cropped 5%
(5% of the width and height cut off the top-left corner, which shifts every pixel, the harder
case for PDQ than a centred crop); a caption bar (a white band 15% of the height with black
text, above the picture, the image growing by that much). The non-JPEG ones are PNG, so each
repost tests one change.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.images import decode_for_model
from stream.banks.hashing import PdqHash, pdq_hash


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_60(image: Image.Image) -> bytes:
    return encode(image.convert("RGB"), "JPEG", quality=60)


def resized_80(image: Image.Image) -> bytes:
    width, height = image.size
    return encode(image.resize((round(width * 0.8), round(height * 0.8)), Image.Resampling.BILINEAR))


def cropped_5(image: Image.Image) -> bytes:
    width, height = image.size
    return encode(image.crop((round(width * 0.05), round(height * 0.05), width, height)))


def captioned(image: Image.Image, text: str = "when the repost hits different") -> bytes:
    width, height = image.size
    bar = max(12, round(height * 0.15))
    out = Image.new("RGB", (width, height + bar), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, bar))
    font = ImageFont.load_default(size=max(10, bar // 2))
    ImageDraw.Draw(out).text((bar // 4, bar // 4), text, fill=(0, 0, 0), font=font)
    return encode(out)


REPOSTS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg_q60": jpeg_60,
    "resized_80": resized_80,
    "cropped_5": cropped_5,
    "caption_bar": captioned,
}


def worker_pdq(data: bytes) -> PdqHash:
    """PDQ of `data` as the default worker gets it (stream.media.FetchConfig's sides: bounded to
    MAX_SIDE, a JPEG decoded at the DCT scale covering MODEL_SIDE: decode_for_model), then hashed."""
    return pdq_hash(decode_for_model(data))


def photo_like(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A deterministic picture with structure at every scale: a gradient sky, overlapping
    shapes of several colours, a line of text and sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2
    base = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    pixels = base[0] * ramp[..., None] + base[1] * (1 - ramp[..., None])
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 12))):
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.5) * width, y0 + rng.uniform(0.1, 0.5) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    font = ImageFont.load_default(size=max(12, height // 12))
    draw.text((width * 0.05, height * 0.8), f"picture {seed}", fill=(255, 255, 255), font=font)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")
