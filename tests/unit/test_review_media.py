"""The console's image proxy: SSRF guard, re-encoding to plain pixels, bounded cache, one fetch per URL."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from review.media_proxy import MediaError, MediaProxy, reencode
from stream.media_server import MediaServer


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret metadata <script>")
    Image.new("RGB", size, color).save(path, format="PNG", pnginfo=info)


@pytest.mark.asyncio
async def test_image_is_refetched_never_and_reencoded_without_metadata(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (200, 30, 30), size=(3000, 1500))
    server = MediaServer(tmp_path)
    url = await server.start()
    proxy = MediaProxy(allow_loopback=True)
    await proxy.start()
    try:
        first, second = await asyncio.gather(proxy.get(f"{url}/a.png"), proxy.get(f"{url}/a.png"))
        assert server.hits == 1 and proxy.fetches == 1  # concurrent requests share one fetch
        assert first is second
        again = await proxy.get(f"{url}/a.png", first.content_hash)
        assert again is first and server.hits == 1  # the content hash finds it in the cache
        img = Image.open(io.BytesIO(first.body))
        assert img.format == "PNG" and max(img.size) == 1024  # scaled down for review
        assert "Comment" not in img.info and b"secret metadata" not in first.body
        assert first.content_type == "image/png"
    finally:
        await proxy.close()
        await server.stop()


@pytest.mark.asyncio
async def test_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (0, 0, 0))
    server = MediaServer(tmp_path)
    url = await server.start()
    proxy = MediaProxy(allow_loopback=False)
    await proxy.start()
    try:
        with pytest.raises(MediaError) as err:
            await proxy.get(f"{url}/a.png")
        assert err.value.status == "blocked_address"
        assert server.hits == 0
        with pytest.raises(MediaError) as err:
            await proxy.get("file:///etc/passwd")
        assert err.value.status == "blocked_scheme"
    finally:
        await proxy.close()
        await server.stop()


@pytest.mark.asyncio
async def test_cache_is_bounded(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png", (i * 60, 10, 10))
    server = MediaServer(tmp_path)
    url = await server.start()
    sizes = [len(reencode(Image.open(tmp_path / f"{i}.png"))[0]) for i in range(4)]
    proxy = MediaProxy(allow_loopback=True, cache_bytes=sizes[2] + sizes[3])  # room for the last two
    await proxy.start()
    try:
        hashes = [(await proxy.get(f"{url}/{i}.png")).content_hash for i in range(4)]
        assert len(set(hashes)) == 4
        assert proxy._size <= proxy.cache_bytes and len(proxy._cache) == 2
        assert list(proxy._cache) == hashes[2:]  # least recently used went first
    finally:
        await proxy.close()
        await server.stop()


def test_large_photos_become_jpeg() -> None:
    import random

    rng = random.Random(0)
    noise = Image.frombytes("RGB", (1024, 1024), bytes(rng.getrandbits(8) for _ in range(1024 * 1024 * 3)))
    body, ctype = reencode(noise)
    assert ctype == "image/jpeg" and Image.open(io.BytesIO(body)).format == "JPEG"
