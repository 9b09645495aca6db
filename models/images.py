"""Safe image decoding from bytes, shared by the trainer and the stream workers (no file I/O).

Every failure surfaces as `ImageError` with a short machine-readable `reason`, so callers
can count, route to a dead-letter topic, or fall back to text-only without catching the
assorted exception types Pillow's decoders raise.

Defences, in order: an explicit format allow-list (no exotic decoders reachable from
untrusted bytes), a pixel budget checked from the header before any pixel is decoded, and
Pillow's own decompression-bomb warning promoted to an error.
"""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image

try:  # a declared dependency; a GPU image built without it still decodes, through Pillow's draft
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
# 40 MP is well above any meme or photo we classify (the model sees ~224 px) yet far below
# the memory a crafted header could ask for.
MAX_PIXELS = 40_000_000
MAX_BYTES = 20_000_000
# The default model's square input side (models/config.py's image_size).
MODEL_SIDE = 224
# Decoded images are kept at most this many pixels on their longer side: twice the default
# model's input, so the model's own resize still sees more detail than it keeps, while a 40 MP
# upload costs ~0.6 MB of RGB instead of 120 MB.
MAX_SIDE = 2 * MODEL_SIDE

# Magic numbers of the allowed formats: when Pillow cannot identify data that starts like
# an allowed format, the file is damaged rather than of an unsupported kind.
_SIGNATURES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
)


# ImageError reasons that mean the bytes were read whole and are not a usable image (the others,
# missing / unreadable / too_large, are about reading them): the worker's media status codes.
DECODE_ERROR_REASONS: tuple[str, ...] = ("unsupported_format", "decompression_bomb", "truncated", "corrupt", "empty")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short code for metrics and counters.

    Reasons: missing, unreadable, too_large, empty, unsupported_format, decompression_bomb,
    truncated, corrupt.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def content_hash(data: bytes) -> str:
    """sha256 hex digest of the raw bytes (dedupe key; stable across processes)."""
    return hashlib.sha256(data).hexdigest()


def _looks_allowed(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(sig) for sig in _SIGNATURES)


def decode_image(
    data: bytes, *, max_pixels: int = MAX_PIXELS, max_side: int | None = None, min_side: int | None = None
) -> Image.Image:
    """Decode `data` into an RGB image (first frame of an animation).

    With `max_side`, the result is shrunk (aspect ratio kept) so neither side exceeds it, as
    early as the format allows: JPEG decodes straight at a reduced DCT scale (`draft`), other
    formats are reduced right after decoding, before the RGB conversion, so the full-size
    pixels live only inside this call.

    With `min_side` too (the model's square input side), a JPEG decodes at the smallest DCT
    scale whose both sides still reach `min_side` and stays at that size when it is within
    `max_side`: the model's resize is then the only one (a 1000 x 700 photo decodes to
    375 x 263 instead of 500 x 350 shrunk to 448 x 314, ~1.6 ms of CPU less). Other formats are
    bounded to `max_side` as without it.

    Raises ImageError for anything that is not a complete, reasonably sized image in one of
    ALLOWED_FORMATS.
    """
    if not data:
        raise ImageError("empty", "image data is empty")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning is not a
        # defence, so make it raise like the hard limit does.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError("decompression_bomb", f"image rejected as a decompression bomb: {exc}") from exc
        except Image.UnidentifiedImageError as exc:
            if _looks_allowed(data):
                raise ImageError("corrupt", "image header is damaged") from exc
            raise ImageError(
                "unsupported_format",
                f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            ) from exc
        except Exception as exc:
            # Plugins raise OSError, SyntaxError, struct.error, ValueError... on bad headers.
            raise _classify(exc) from exc
        with img:
            width, height = img.size
            fmt = img.format or "?"
            if width <= 0 or height <= 0:
                raise ImageError("corrupt", f"{fmt} image declares an empty size {width}x{height}")
            # The header is parsed but no pixels are decoded yet: refuse before allocating.
            if width * height > max_pixels:
                raise ImageError(
                    "decompression_bomb",
                    f"{fmt} image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
                )
            try:
                # Animated GIF/WEBP/PNG: open() leaves frame 0 current and load() decodes only
                # that frame; asking for n_frames/is_animated would scan the whole file.
                if max_side is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
                    fast = _decode_jpeg_scaled(data, _jpeg_target(img.size, max_side, min_side), max_side)
                    if fast is not None:
                        return fast
                if max_side is not None and img.format == "JPEG":
                    # DCT scaling (1/2, 1/4, 1/8) picks the smallest scale still >= the size
                    # asked for in both sides, so no detail the bound keeps is lost. Ask for the
                    # bounded size itself: a square box would keep any landscape or portrait
                    # photo at full scale (its short side is below the box).
                    img.draft("RGB", _jpeg_target(img.size, max_side, min_side))
                # Formats other than JPEG decode at full size first (a flat 6000x6000 PNG: 108 MB);
                # that lasts only until the reduction below, so the transient cost is one such
                # image per decode thread, never one per post in flight.
                img.load()
                if max_side is None:
                    return _to_rgb(img)
                return bounded_rgb(img, max_side)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
                raise ImageError("decompression_bomb", f"image rejected as a decompression bomb: {exc}") from exc
            except Exception as exc:
                raise _classify(exc, fmt) from exc


def decode_for_model(data: bytes, side: int = MODEL_SIDE, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`data` decoded as the worker's decode threads do for a model whose input is `side` px
    (stream.media.FetchConfig: bounded to twice that, a JPEG at the DCT scale covering it)."""
    return decode_image(data, max_pixels=max_pixels, max_side=2 * side, min_side=side)


def jpeg_decode_size(size: tuple[int, int], side: int = MODEL_SIDE) -> tuple[int, int]:
    """(width, height) of a JPEG of `size` as `decode_for_model(data, side)` decodes it: the
    smallest DCT scale (in eighths, libjpeg's rounding up) covering `_jpeg_target`, then bounded
    to twice `side`. The device decodes at full size and shrinks to this size where it must hash
    what the host would (stream/banks/device_pdq.py)."""
    max_side = 2 * side
    target = _jpeg_target(size, max_side, side)
    width, height = size
    for eighths in range(1, 9):
        scaled = (-(-width * eighths // 8), -(-height * eighths // 8))
        if scaled[0] >= target[0] and scaled[1] >= target[1]:
            break
    return scaled if max(scaled) <= max_side else fit_within(scaled, max_side)


def _jpeg_target(size: tuple[int, int], max_side: int, min_side: int | None) -> tuple[int, int]:
    """The size a JPEG's DCT scale must still cover: the bounded size, or with `min_side` a
    `min_side` square (the model's input, which squashes the whole image), each side no larger
    than the bounded size's: a 40000 x 300 strip still decodes at 1/8 scale, as the bound would
    leave it 448 x 3 anyway."""
    width, height = fit_within(size, max_side)
    if min_side is None:
        return width, height
    return min(width, min_side), min(height, min_side)


def _decode_jpeg_scaled(data: bytes, target: tuple[int, int], max_side: int) -> Image.Image | None:
    """A JPEG whose header Pillow has already vetted (allowed format, pixel limit), decoded by
    libjpeg-turbo through simplejpeg at the smallest DCT scale still covering `target` (as
    `draft` does, in eighths where `draft` has halves), then bounded to `max_side` if it is
    still larger. Why not Pillow: the same library without Pillow's per-image work, and with the
    GIL released, so decode threads run in parallel (bench/feed_throughput.py).
    None for whatever simplejpeg will not decode strictly (damaged or truncated data, odd
    markers): Pillow then decodes it or names the error, as before."""
    if simplejpeg is None:
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=target[0], min_height=target[1])
    except ValueError:
        return None
    image = Image.fromarray(pixels, "RGB")
    # Within the bound (the usual case with `min_side`) it is kept as decoded: no second copy.
    return image if max(image.size) <= max_side else bounded_rgb(image, max_side)


def _classify(exc: BaseException, fmt: str = "image") -> ImageError:
    text = str(exc)
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return ImageError("truncated", f"{fmt} data is truncated ({text})")
    if isinstance(exc, MemoryError):
        return ImageError("too_large", f"{fmt} needs too much memory to decode")
    return ImageError("corrupt", f"{fmt} data is corrupt ({type(exc).__name__}: {text})")


# Modes whose pixels can be averaged as they are; palette and bit-depth modes are converted first.
_REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "RGBa", "La"})


def bounded_rgb(img: Image.Image, max_side: int) -> Image.Image:
    """`img` as RGB, shrunk (aspect ratio kept) so neither side exceeds `max_side`."""
    if max(img.size) <= max_side:
        return _to_rgb(img)
    if img.mode not in _REDUCIBLE_MODES:
        img = _to_rgb(img)
    # reducing_gap: box-reduce by an integer factor first (fast, little memory), then a short
    # bilinear resize. The full-size decode is dropped when the caller closes `img`.
    small = img.resize(fit_within(img.size, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _to_rgb(small)


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` scaled so its longer side is `max_side`, aspect ratio kept (never below 1 px): the
    size `bounded_rgb` gives a larger image."""
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    # Transparent pixels often hold black or junk colour; composite over white, which is how
    # viewers show memes with transparent backgrounds.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def model_input(image: Image.Image, size: int) -> Image.Image:
    """The whole image as the model's RGB `size` x `size` square (no crop: text printed on
    memes sits at the edges). Idempotent: an image already in that form is returned as is, so
    the worker's media decode threads can apply it as each post's media arrives (stream.media)
    and models.preprocess.ImagePreprocessor then only copies pixels, with the same result."""
    if image.mode == "RGB" and image.size == (size, size):
        return image
    return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
