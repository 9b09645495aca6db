"""Post images for the console, read from the evidence store by the hash the model scored.

The console never fetches a post's URL: a host can serve the worker one image and anyone
after another (cloaking), and the reviewer must judge what the model judged. It reads the
bytes the worker kept (stream/evidence.py) under the Label's content hash, which the store
verifies, then decodes them with the worker's format allow-list and pixel budget, scales down
and re-encodes to PNG (JPEG for photos that would be large as PNG), so only pixels reach the
browser: no metadata, no polyglots. Results are cached by hash in a bounded in-memory LRU for
at most `max_age_s` (a blob purged or expired elsewhere stops showing within that), and
concurrent requests for one hash share one read.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from models.images import ImageError, decode_image
from stream.evidence import EvidenceStore

DISPLAY_MAX_SIDE = 1024  # what reviewers see; not the model's decode bound (models.images.MAX_SIDE)
PNG_LIMIT = 1_500_000  # bytes; above this a JPEG is smaller and fine for review


@dataclass
class ServedImage:
    body: bytes
    content_type: str
    content_hash: str
    read_at: float = 0.0  # time.monotonic() of the store read


class MediaError(RuntimeError):
    """The scored image cannot be shown: `status` is missing, mismatch, unavailable (the store)
    or undecodable."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


def reencode(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> tuple[bytes, str]:
    img = image.convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    if buf.tell() <= PNG_LIMIT:
        return buf.getvalue(), "image/png"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue(), "image/jpeg"


def render(data: bytes, max_side: int = DISPLAY_MAX_SIDE) -> tuple[bytes, str]:
    """Evidence bytes to display pixels (raises ImageError for anything decode_image refuses)."""
    with decode_image(data, max_side=max_side) as image:
        return reencode(image, max_side)


class EvidenceImages:
    def __init__(self, store: EvidenceStore, *, cache_bytes: int = 64 * 1024 * 1024, max_age_s: float = 60.0) -> None:
        self.store = store
        self.cache_bytes = cache_bytes
        self.max_age_s = max_age_s
        self._cache: OrderedDict[str, ServedImage] = OrderedDict()
        self._size = 0
        self._inflight: dict[str, asyncio.Future[ServedImage]] = {}
        self.reads = 0

    async def has(self, content_hash: str | None) -> bool:
        """Whether the scored image can be shown now (what a decision records as seen)."""
        if not content_hash:
            return False
        try:
            await self.get(content_hash)
            return True
        except MediaError:
            return False

    def _remember(self, image: ServedImage) -> None:
        if image.content_hash in self._cache or len(image.body) > self.cache_bytes:
            return
        self._cache[image.content_hash] = image
        self._size += len(image.body)
        while self._size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._size -= len(old.body)

    def forget(self, content_hash: str) -> None:
        """Drop a cached image (its blob was purged)."""
        old = self._cache.pop(content_hash, None)
        if old is not None:
            self._size -= len(old.body)

    async def get(self, content_hash: str) -> ServedImage:
        """The display image of the blob `content_hash`; MediaError when it cannot be shown."""
        cached = self._cache.get(content_hash)
        if cached is not None and time.monotonic() - cached.read_at <= self.max_age_s:
            self._cache.move_to_end(content_hash)
            return cached
        if cached is not None:
            self.forget(content_hash)
        if content_hash in self._inflight:
            return await asyncio.shield(self._inflight[content_hash])
        future: asyncio.Future[ServedImage] = asyncio.get_running_loop().create_future()
        self._inflight[content_hash] = future
        try:
            image = await self._read(content_hash)
            future.set_result(image)
            return image
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters get it, and no "never retrieved" warning
            raise
        finally:
            del self._inflight[content_hash]

    async def _read(self, content_hash: str) -> ServedImage:
        self.reads += 1
        blob = await self.store.get(content_hash)
        if not blob.ok or blob.data is None:
            raise MediaError(blob.status, blob.reason)
        try:
            body, ctype = await asyncio.to_thread(render, blob.data)
        except ImageError as exc:
            raise MediaError("undecodable", str(exc)) from None
        image = ServedImage(body, ctype, content_hash, time.monotonic())
        self._remember(image)
        return image

    def close(self) -> None:
        self.store.close()
