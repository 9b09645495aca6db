"""Post images for the console, fetched and re-encoded on the server.

The reviewer's browser never requests a URL from a post (that would leak the reviewer's
address and cookies-less requests to an attacker's server, and let it serve anything it
likes). The console fetches with the worker's SSRF-guarded `MediaFetcher`, decodes with its
format allow-list and pixel budget, scales down and re-encodes to PNG (JPEG for photos
that would be large as PNG), so only pixels reach the browser: no metadata, no polyglots.
Results are cached by the content hash in a bounded in-memory LRU; concurrent requests for
the same URL share one fetch.
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image

from stream.media import FetchConfig, MediaFetcher

DISPLAY_MAX_SIDE = 1024  # what reviewers see; not the model's decode bound (models.images.MAX_SIDE)
PNG_LIMIT = 1_500_000  # bytes; above this a JPEG is smaller and fine for review


@dataclass
class ServedImage:
    body: bytes
    content_type: str
    content_hash: str


class MediaError(RuntimeError):
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


class MediaProxy:
    def __init__(self, *, allow_loopback: bool = False, cache_bytes: int = 64 * 1024 * 1024) -> None:
        options: dict[str, Any] = {"allow_loopback": allow_loopback, "retries": 1}
        if "max_side" in {f.name for f in fields(FetchConfig)}:
            # The worker shrinks to about twice the model's input; a reviewer needs more detail.
            options["max_side"] = DISPLAY_MAX_SIDE
        self.fetcher = MediaFetcher(FetchConfig(**options))
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, ServedImage] = OrderedDict()
        self._size = 0
        self._inflight: dict[str, asyncio.Future[ServedImage]] = {}
        self.fetches = 0

    async def start(self) -> None:
        await self.fetcher.start()

    async def close(self) -> None:
        await self.fetcher.close()

    def _cached(self, content_hash: str | None) -> ServedImage | None:
        if content_hash and content_hash in self._cache:
            self._cache.move_to_end(content_hash)
            return self._cache[content_hash]
        return None

    def _remember(self, image: ServedImage) -> None:
        if image.content_hash in self._cache or len(image.body) > self.cache_bytes:
            return
        self._cache[image.content_hash] = image
        self._size += len(image.body)
        while self._size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._size -= len(old.body)

    async def get(self, url: str, content_hash: str | None = None) -> ServedImage:
        """The re-encoded image of `url` (`content_hash`, when known, finds it in the cache)."""
        hit = self._cached(content_hash)
        if hit is not None:
            return hit
        if url in self._inflight:
            return await asyncio.shield(self._inflight[url])
        future: asyncio.Future[ServedImage] = asyncio.get_running_loop().create_future()
        self._inflight[url] = future
        try:
            image = await self._fetch(url)
            future.set_result(image)
            return image
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters get it, and no "never retrieved" warning
            raise
        finally:
            del self._inflight[url]

    async def _fetch(self, url: str) -> ServedImage:
        self.fetches += 1
        result = await self.fetcher.fetch(url)
        if not result.ok or result.image is None or result.content_hash is None:
            raise MediaError(result.status, result.reason)
        hit = self._cached(result.content_hash)
        if hit is not None:
            return hit
        body, ctype = await asyncio.to_thread(reencode, result.image)
        image = ServedImage(body, ctype, result.content_hash)
        self._remember(image)
        return image
