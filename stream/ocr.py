"""OCR in the worker: which deployments read image text, and a per-image cache in front of it.

Runs on the media decode pool (stream.media), right after an image is decoded, so the event
loop never waits on Tesseract. Results are cached by the image's content hash in a bounded
LRU: reposted memes are common and OCR costs more than the model's forward on a CPU. One
image OCR cannot read costs that post its OCR text only (counted), never the post.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Literal

from PIL import Image
from prometheus_client import Counter, Histogram

from models.config import ModelConfig
from models.ocr import OcrEngine, OcrError, OcrUnavailable, TesseractOcr

log = logging.getLogger(__name__)

OcrMode = Literal["auto", "on", "off"]
OCR_MODES: tuple[str, ...] = ("auto", "on", "off")
DEFAULT_CACHE_SIZE = 4096  # texts are short: a few hundred KiB at most

OCR_IMAGES = Counter(
    "modstream_ocr_images_total",
    "Images OCR was asked to read, by outcome (read, cached, failed: the post goes on without OCR text)",
    ["outcome"],
)
OCR_SECONDS = Histogram(
    "modstream_ocr_seconds",
    "Time Tesseract took to read one image (cache misses only)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
for _outcome in ("read", "cached", "failed"):
    OCR_IMAGES.labels(_outcome)


class ImageTextReader:
    """`read(image, content_hash)`: the image's text, from the LRU or the engine; None when the
    engine fails. Thread-safe (the decode pool calls it from several threads)."""

    def __init__(self, engine: OcrEngine, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, not {cache_size}")
        self.engine = engine
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, image: Image.Image, content_hash: str | None) -> str | None:
        if content_hash is not None:
            with self._lock:
                text = self._cache.get(content_hash)
                if text is not None:
                    self._cache.move_to_end(content_hash)
            if text is not None:
                OCR_IMAGES.labels("cached").inc()
                return text
        started = time.perf_counter()
        try:
            text = self.engine(image)
        except OcrError as exc:
            OCR_IMAGES.labels("failed").inc()
            log.warning("OCR failed, the post goes on without OCR text: %s", exc)
            return None
        OCR_SECONDS.observe(time.perf_counter() - started)
        OCR_IMAGES.labels("read").inc()
        if content_hash is not None and self.cache_size:
            with self._lock:
                self._cache[content_hash] = text
                self._cache.move_to_end(content_hash)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return text


def ocr_enabled(mode: str, config: ModelConfig) -> bool:
    """Whether a deployment reads image text: `auto` when the model was trained with the OCR
    segment, `on` always (the text then only goes to the Label record), `off` never; `off`
    with a model that expects the segment is refused, as it would be fed inputs unlike its training."""
    if mode not in OCR_MODES:
        raise ValueError(f"OCR mode must be one of {', '.join(OCR_MODES)}, not {mode!r}")
    if mode == "off" and config.ocr_segment:
        raise OcrUnavailable(
            "the model was trained with text read from images (ocr_segment in its card): "
            "it cannot be served with OCR off"
        )
    return mode == "on" or config.ocr_segment


def reader_for(mode: str, config: ModelConfig, cache_size: int = DEFAULT_CACHE_SIZE) -> ImageTextReader | None:
    """The reader a worker serving `config` needs, or None. Raises OcrUnavailable at start,
    with what to install, when OCR is needed and Tesseract or a language model is missing."""
    if not ocr_enabled(mode, config):
        return None
    try:
        engine = TesseractOcr(config.ocr_languages)
    except OcrUnavailable as exc:
        need = "the model was trained with OCR text" if config.ocr_segment else "OCR was turned on"
        raise OcrUnavailable(f"{need}, but Tesseract is not usable: {exc}") from exc
    log.info("reading text inside images with %s", engine.identity)
    return ImageTextReader(engine, cache_size)
