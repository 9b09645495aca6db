"""The console's images: only the scored bytes from the evidence store, verified, re-encoded
to plain pixels; a bounded cache; one read per hash; never a URL."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from review.evidence_images import EvidenceImages, MediaError, reencode
from stream.evidence import EvidenceStore, LocalBackend


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret metadata <script>")
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


async def _kept(root: Path, *blobs: bytes) -> tuple[EvidenceStore, list[str]]:
    store = EvidenceStore(LocalBackend(root))
    hashes = [hashlib.sha256(b).hexdigest() for b in blobs]
    for digest, blob in zip(hashes, blobs, strict=True):
        await store.put(digest, blob)
    return store, hashes


@pytest.mark.asyncio
async def test_the_scored_image_is_read_once_and_reencoded_without_metadata(tmp_path: Path) -> None:
    store, (digest,) = await _kept(tmp_path, _png((200, 30, 30), size=(3000, 1500)))
    images = EvidenceImages(store)
    first, second = await asyncio.gather(images.get(digest), images.get(digest))
    assert images.reads == 1 and first is second  # concurrent requests share one read
    img = Image.open(io.BytesIO(first.body))
    assert img.format == "PNG" and max(img.size) == 1024  # scaled down for review
    assert "Comment" not in img.info and b"secret metadata" not in first.body
    assert img.getpixel((10, 10)) == (200, 30, 30)


@pytest.mark.asyncio
async def test_missing_tampered_or_undecodable_evidence_is_never_shown(tmp_path: Path) -> None:
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    script = b"<script>alert(1)</script>"
    store, (red_hash, blue_hash, script_hash) = await _kept(tmp_path, red, blue, script)
    images = EvidenceImages(store)
    assert isinstance(store.backend, LocalBackend)
    store.backend.path(blue_hash).write_bytes(red)  # the blob now holds other bytes
    await store.delete(red_hash)
    for digest, status in ((red_hash, "missing"), (blue_hash, "mismatch"), (script_hash, "undecodable")):
        with pytest.raises(MediaError) as err:
            await images.get(digest)
        assert err.value.status == status
        assert await images.has(digest) is False
    assert await images.has(None) is False


@pytest.mark.asyncio
async def test_cache_is_bounded(tmp_path: Path) -> None:
    blobs = [_png((i * 60, 10, 10)) for i in range(4)]
    store, hashes = await _kept(tmp_path, *blobs)
    sizes = [len(reencode(Image.open(io.BytesIO(b)))[0]) for b in blobs]
    images = EvidenceImages(store, cache_bytes=sizes[2] + sizes[3])  # room for the last two
    for digest in hashes:
        await images.get(digest)
    assert images._size <= images.cache_bytes and list(images._cache) == hashes[2:]  # LRU went first
    images.forget(hashes[3])
    assert list(images._cache) == hashes[2:3]


@pytest.mark.asyncio
async def test_a_blob_removed_elsewhere_stops_showing_once_its_cache_entry_is_old(tmp_path: Path) -> None:
    store, (digest,) = await _kept(tmp_path, _png((1, 2, 3)))
    images = EvidenceImages(store, max_age_s=0.2)
    await images.get(digest)
    await EvidenceStore(LocalBackend(tmp_path)).delete(digest)  # a purge in another process
    assert await images.has(digest) is True  # still cached
    await asyncio.sleep(0.3)
    assert await images.has(digest) is False and images.reads == 2


def test_large_photos_become_jpeg() -> None:
    import random

    rng = random.Random(0)
    noise = Image.frombytes("RGB", (1024, 1024), bytes(rng.getrandbits(8) for _ in range(1024 * 1024 * 3)))
    body, ctype = reencode(noise)
    assert ctype == "image/jpeg" and Image.open(io.BytesIO(body)).format == "JPEG"
