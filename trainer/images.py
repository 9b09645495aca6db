"""Image files for datasets: read with a byte cap, then decode safely (models.images).

The decoding itself lives in `models.images` so the stream workers can use it without
importing training code; the names are re-exported here for the trainer's modules.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from models.images import (
    ALLOWED_FORMATS,
    MAX_BYTES,
    MAX_PIXELS,
    ImageError,
    content_hash,
    decode_image,
)

__all__ = ["ALLOWED_FORMATS", "MAX_BYTES", "MAX_PIXELS", "ImageError", "content_hash", "decode_image", "load_image"]


def load_image(path: Path, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode an image file; see `decode_image`. Adds reasons missing,
    unreadable and too_large (file over `max_bytes`)."""
    try:
        with path.open("rb") as fh:
            # Read one byte past the cap so an oversized (or growing) file is detected
            # without reading all of it.
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageError("missing", f"{path}: image file does not exist") from exc
    except OSError as exc:
        raise ImageError("unreadable", f"{path}: cannot read image ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{path}: image file is over {max_bytes:,} bytes")
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise ImageError(exc.reason, f"{path}: {exc}") from exc
