"""Media fetcher against a hostile local server; no connection ever leaves 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

from models.ocr import OcrError
from stream.media import FetchConfig, MediaFetcher, address_block_reason, decode_and_read, sniff_format
from stream.ocr import ImageTextReader
from tests.unit.hostile_server import PNG, HostileServer
from tests.unit.loopback_media import count_decodes, serve_bytes

CAP = 64 * 1024
CONFIG = FetchConfig(
    connect_timeout=0.5,
    read_timeout=0.2,
    total_timeout=3.0,
    max_bytes=CAP,
    max_pixels=1_000_000,
    retries=2,
    backoff_base=0.01,
    allow_loopback=True,
)

DNS = {
    "good.test": ["127.0.0.1"],
    "mixed.test": ["10.0.0.5", "127.0.0.1"],  # one blocked answer among allowed ones
    "evil-private.test": ["10.0.0.5"],
    "evil-metadata.test": ["169.254.169.254"],
    "evil-mapped.test": ["::ffff:127.0.0.1"],
    "evil-nat64.test": ["64:ff9b::a00:1"],
    "evil-cgnat.test": ["100.64.1.1"],
    "evil-many.test": ["10.0.0.5", "169.254.169.254", "fd00::1", "::ffff:192.168.1.1"],
}
EVIL_HOSTS = [h for h in DNS if h.startswith("evil-")]


class FakeResolver(AbstractResolver):
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        results: list[ResolveResult] = []
        for addr in self.table[host]:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            results.append(
                ResolveResult(hostname=host, host=addr, port=port, family=fam, proto=0, flags=socket.AI_NUMERICHOST)
            )
        return results

    async def close(self) -> None:
        pass


@pytest_asyncio.fixture
async def server() -> AsyncIterator[HostileServer]:
    srv = HostileServer(cap=CAP)
    await srv.start()
    yield srv
    await srv.stop()


@pytest_asyncio.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every address a socket is connected to. Anything but 127.0.0.1 is recorded and
    refused here, so a broken guard fails the test instead of reaching the network."""
    loop = asyncio.get_running_loop()
    real = loop.sock_connect
    seen: list[tuple[Any, ...]] = []

    async def recording(sock: socket.socket, address: Any) -> None:
        seen.append(tuple(address))
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test refuses {address}")
        await real(sock, address)

    monkeypatch.setattr(loop, "sock_connect", recording)
    return seen


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(DNS)


async def _fetch(url: str, resolver: FakeResolver, config: FetchConfig = CONFIG):
    async with MediaFetcher(config, resolver=resolver) as fetcher:
        return await fetcher.fetch(url)


def _only_loopback(connects: list[tuple[Any, ...]]) -> None:
    assert all(addr[0] == "127.0.0.1" for addr in connects), connects


# --- the address classifier ---------------------------------------------------------------

BLOCKED_TABLE = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a00:1",
    "64:ff9b::7f00:1",
    "64:ff9b:1::808:808",
    "2002:a00:1::1",
    "2002:7f00:1::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "::a00:1",
    "::7f00:1",
    "2001:db8::1",
    "localhost",
    "not-an-ip",
    "",
]
ALLOWED_TABLE = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", BLOCKED_TABLE)
def test_classifier_blocks(address: str) -> None:
    assert address_block_reason(address) is not None
    if address not in ("127.0.0.1", "::1"):
        assert address_block_reason(address, allow_loopback=True) is not None


@pytest.mark.parametrize("address", ALLOWED_TABLE)
def test_classifier_allows_public(address: str) -> None:
    assert address_block_reason(address) is None


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1"])
def test_classifier_loopback_only_when_allowed(address: str) -> None:
    assert address_block_reason(address) == "loopback"
    assert address_block_reason(address, allow_loopback=True) is None


def test_sniff_format() -> None:
    assert sniff_format(PNG) == "PNG"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"<html>") is None


# --- successful fetches -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/ok.png", "/ok.jpg", "/octet.png"])
async def test_ok(server, resolver, connects, path: str) -> None:
    res = await _fetch(server.url(path), resolver)
    assert res.status == "ok", res.reason
    assert res.image is not None and res.image.mode == "RGB" and res.image.size == (16, 12)
    assert res.attempts == 1 and res.size > 0 and res.final_url == server.url(path)
    if path != "/ok.jpg":
        assert res.content_hash == hashlib.sha256(PNG).hexdigest() and res.size == len(PNG)
    _only_loopback(connects)


@pytest.mark.asyncio
async def test_ok_through_fake_dns(server, resolver, connects) -> None:
    res = await _fetch(server.url("/ok.png", host="good.test"), resolver)
    assert res.status == "ok", res.reason
    assert resolver.calls == ["good.test"]
    assert connects == [("127.0.0.1", server.port)]


@pytest.mark.asyncio
async def test_blocked_answer_is_skipped_for_an_allowed_one(server, resolver, connects) -> None:
    res = await _fetch(server.url("/ok.png", host="mixed.test"), resolver)
    assert res.status == "ok", res.reason
    assert connects == [("127.0.0.1", server.port)]


# --- HTTP errors and retries --------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("code", "hits"), [(404, 1), (403, 1), (500, 1), (429, 3), (502, 3), (503, 3), (504, 3)])
async def test_http_errors_retry_only_transient(server, resolver, code: int, hits: int) -> None:
    res = await _fetch(server.url(f"/status/{code}"), resolver)
    assert res.status == "http_error"
    assert res.reason.startswith(f"HTTP {code}")
    assert server.hits[f"/status/{code}"] == hits == res.attempts


@pytest.mark.asyncio
async def test_transient_503_then_ok(server, resolver) -> None:
    res = await _fetch(server.url("/flaky"), resolver)
    assert res.status == "ok", res.reason
    assert res.attempts == 2 and server.hits["/flaky"] == 2


@pytest.mark.asyncio
async def test_slow_drip_times_out(server, resolver) -> None:
    res = await _fetch(server.url("/drip"), resolver, replace(CONFIG, retries=1))
    assert res.status == "timeout"
    assert res.attempts == 2 and server.hits["/drip"] == 2  # timeouts are transient
    assert res.elapsed_s < 2


@pytest.mark.asyncio
async def test_total_deadline(server, resolver) -> None:
    cfg = replace(CONFIG, read_timeout=5.0, total_timeout=0.4)
    res = await _fetch(server.url("/drip"), resolver, cfg)
    assert res.status == "timeout"
    assert res.elapsed_s < 1.5


# --- size and content ---------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/big-cl", "/big-chunked"])
async def test_too_large(server, resolver, path: str) -> None:
    res = await _fetch(server.url(path), resolver)
    assert res.status == "too_large"
    assert res.attempts == 1 and res.image is None
    if path == "/big-cl":
        assert "Content-Length" in res.reason


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/page.html", "wrong_content_type"),
        ("/octet.html", "wrong_content_type"),
        ("/truncated.png", "truncated"),
        ("/bomb.png", "decompression_bomb"),
        ("/empty.png", "empty"),
    ],
)
async def test_bad_content(server, resolver, path: str, status: str) -> None:
    res = await _fetch(server.url(path), resolver)
    assert res.status == status, res.reason
    assert res.image is None and res.attempts == 1


@pytest.mark.asyncio
async def test_small_pixel_budget_is_a_bomb(server, resolver) -> None:
    res = await _fetch(server.url("/ok.png"), resolver, replace(CONFIG, max_pixels=100))
    assert res.status == "decompression_bomb"


# --- redirects ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redirect_chain_within_limit(server, resolver) -> None:
    res = await _fetch(server.url("/chain/2"), resolver)
    assert res.status == "ok", res.reason
    assert res.final_url == server.url("/chain/0")


@pytest.mark.asyncio
async def test_redirect_chain_too_long(server, resolver) -> None:
    res = await _fetch(server.url("/chain/4"), resolver)
    assert res.status == "too_many_redirects"
    assert server.hits["/chain/0"] == 0 and res.attempts == 1


@pytest.mark.asyncio
async def test_redirect_loop(server, resolver) -> None:
    res = await _fetch(server.url("/loop"), resolver)
    assert res.status == "too_many_redirects"
    assert server.hits["/loop"] == CONFIG.max_redirects + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("host", EVIL_HOSTS)
async def test_redirect_to_internal_address_is_blocked(server, resolver, connects, host: str) -> None:
    target = f"http://{host}:{server.port}/ok.png"
    res = await _fetch(server.url(f"/to?url={target}"), resolver)
    assert res.status == "blocked_address", res.reason
    assert res.attempts == 1 and res.final_url == target
    assert host in resolver.calls
    assert connects == [("127.0.0.1", server.port)]  # only the redirecting hop connected


@pytest.mark.asyncio
async def test_redirect_to_other_scheme_is_blocked(server, resolver) -> None:
    res = await _fetch(server.url("/to?url=file:///etc/passwd"), resolver)
    assert res.status == "blocked_scheme"


# --- addresses and URLs -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x",
        "http://[::ffff:10.0.0.1]/",
        "http://[::ffff:127.0.0.1]/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fd00::1]:8080/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://100.64.0.1/",
    ],
)
async def test_ip_literals_blocked_without_connecting(resolver, connects, url: str) -> None:
    res = await _fetch(url, resolver)
    assert res.status == "blocked_address", res.reason
    assert connects == [] and resolver.calls == []  # the resolver is skipped; the socket guard is not


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "good.test"])
async def test_loopback_blocked_by_default(server, resolver, connects, host: str) -> None:
    res = await _fetch(server.url("/ok.png", host=host), resolver, replace(CONFIG, allow_loopback=False))
    assert res.status == "blocked_address", res.reason
    assert connects == [] and sum(server.hits.values()) == 0
    assert res.attempts == 1  # blocked is never retried


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("ftp://example.com/a.png", "blocked_scheme"),
        ("file:///etc/passwd", "blocked_scheme"),
        ("gopher://example.com/", "blocked_scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "blocked_scheme"),
        ("not a url", "invalid_url"),
        ("", "invalid_url"),
        ("http://", "invalid_url"),
        ("http://[::1", "invalid_url"),
        ("//example.com/a.png", "invalid_url"),
        ("http://2130706433/", "invalid_url"),  # legacy numeric IPv4 forms are refused by aiohttp
        ("http://nowhere.test/a.png", "dns_error"),
    ],
)
async def test_bad_urls(resolver, connects, url: str, status: str) -> None:
    res = await _fetch(url, resolver)
    assert res.status == status, res.reason
    assert connects == [] and res.image is None


# --- many ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fetch_many_bounded_per_host(server, resolver, connects) -> None:
    urls = [server.url("/slow.png")] * 6 + ["ftp://x/y", server.url("/status/404")]
    async with MediaFetcher(replace(CONFIG, per_host=2), resolver=resolver) as fetcher:
        results = await fetcher.fetch_many(urls)
    assert [r.status for r in results] == ["ok"] * 6 + ["blocked_scheme", "http_error"]
    assert [r.url for r in results] == urls
    assert server.max_in_flight == 2
    _only_loopback(connects)


@pytest.mark.asyncio
async def test_fetch_requires_start() -> None:
    with pytest.raises(RuntimeError):
        await MediaFetcher(CONFIG).fetch("http://127.0.0.1/")


# --- text inside images, read on the decode pool ------------------------------------------


class _RecordingEngine:
    identity = "recording"

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[str, tuple[int, int]]] = []
        self.fail = fail

    def __call__(self, image: Any) -> str:
        self.seen.append((threading.current_thread().name, image.size))
        if self.fail:
            raise OcrError("unreadable")
        return "words on the meme"


@contextlib.asynccontextmanager
async def serve_png(image: Image.Image) -> AsyncIterator[str]:
    """Serves `image` as a PNG from a loopback server on a free port; yields its URL."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    async with serve_bytes({"/image.png": (buf.getvalue(), "image/png")}) as base:
        yield f"{base}/image.png"


@pytest_asyncio.fixture
async def meme_url() -> AsyncIterator[str]:
    """A 1200x400 PNG: larger than the model's bound, within the OCR bound."""
    async with serve_png(Image.new("RGB", (1200, 400), (240, 240, 240))) as url:
        yield url


@pytest.mark.asyncio
async def test_ocr_runs_on_the_decode_pool_and_the_model_gets_the_bounded_image(meme_url, resolver, connects) -> None:
    engine = _RecordingEngine()
    config = replace(CONFIG, max_side=64)
    async with MediaFetcher(config, resolver=resolver, ocr=ImageTextReader(engine)) as fetcher:
        first = await fetcher.fetch(meme_url)
        second = await fetcher.fetch(meme_url)
    assert first.status == "ok", first.reason
    assert first.ocr_text == second.ocr_text == "words on the meme"
    assert first.image is not None and first.image.size == (64, 21)  # 1200x400 bounded to 64
    (thread, size), *more = engine.seen
    assert more == []  # the second fetch of the same bytes came from the cache
    assert thread.startswith("media-decode") and size == (1200, 400)  # OCR saw more than the model keeps
    _only_loopback(connects)


@pytest.mark.asyncio
async def test_an_ocr_failure_keeps_the_image_and_the_post(meme_url, resolver, connects) -> None:
    engine = _RecordingEngine(fail=True)
    async with MediaFetcher(replace(CONFIG, max_side=64), resolver=resolver, ocr=ImageTextReader(engine)) as f:
        res = await f.fetch(meme_url)
    assert res.status == "ok" and res.image is not None and res.ocr_text is None
    assert len(engine.seen) == 1


@pytest.mark.asyncio
async def test_without_ocr_nothing_is_read(meme_url, resolver, connects) -> None:
    async with MediaFetcher(replace(CONFIG, max_side=64), resolver=resolver) as fetcher:
        res = await fetcher.fetch(meme_url)
    assert res.status == "ok" and res.ocr_text is None and max(res.image.size) == 64


@pytest.mark.asyncio
async def test_real_tesseract_reads_the_words_of_a_fetched_image(resolver, connects) -> None:
    from PIL import ImageDraw, ImageFont

    from models.ocr import TesseractOcr

    card = Image.new("RGB", (560, 140), (250, 250, 250))
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 40)
    ImageDraw.Draw(card).text((20, 40), "NOT FUNNY AT ALL", fill=(0, 0, 0), font=font)
    reader = ImageTextReader(TesseractOcr("eng+hin"))
    fetcher = MediaFetcher(replace(CONFIG, max_side=64), resolver=resolver, ocr=reader)
    async with serve_png(card) as url, fetcher:
        res = await fetcher.fetch(url)
    assert res.status == "ok" and res.ocr_text is not None
    assert {"NOT", "FUNNY", "AT", "ALL"} <= set(res.ocr_text.split()), res.ocr_text
    _only_loopback(connects)


class _ReadsNothing:
    """An OCR reader for the decode path's OCR branch (it decodes larger, then shrinks)."""

    def read(self, image: Image.Image, digest: str | None) -> str:
        return f"{image.width}x{image.height}"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("ocr", [None, _ReadsNothing()])
def test_decode_pool_makes_the_models_input_with_the_pixels_prepare_would_make(mode, ocr) -> None:
    from models.preprocess import ImagePreprocessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    prepare = ImagePreprocessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    bounded, text, _, _ = decode_and_read(data, None, FetchConfig(max_side=448), ocr)
    model_ready, text_too, _, _ = decode_and_read(data, None, FetchConfig(max_side=448, model_side=224), ocr)
    assert bounded.size == (448, 314) and (model_ready.mode, model_ready.size) == ("RGB", (224, 224))
    assert text == text_too  # OCR read the same larger copy either way
    np.testing.assert_array_equal(prepare.uint8_one(model_ready), prepare.uint8_one(bounded))


def test_the_pdq_hash_is_taken_from_the_bounded_image_before_the_model_input_resize() -> None:
    """A post's PDQ must not depend on the worker's --decode-model-input (a square crop or pad
    of the model's input is another picture to PDQ), nor exist when hashing is off."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8).repeat(10, axis=0).repeat(10, axis=1)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    plain = decode_and_read(data, None, FetchConfig(max_side=448, pdq=True), None)
    model_ready = decode_and_read(data, None, FetchConfig(max_side=448, model_side=224, pdq=True), None)
    assert plain.pdq is not None and plain.pdq.usable
    assert model_ready.image.size == (224, 224) and model_ready.pdq == plain.pdq
    square = decode_and_read(data, None, FetchConfig(max_side=224, model_side=224, pdq=False), None)
    assert square.pdq is None


# --- the decode memo: a repost of the same bytes is not decoded again ----------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return count_decodes(monkeypatch)


@pytest.mark.asyncio
async def test_a_repost_of_the_same_bytes_skips_decode_resize_and_hash(meme_url, resolver, connects, decodes) -> None:
    config = replace(CONFIG, max_side=64, pdq=True)
    async with MediaFetcher(config, resolver=resolver) as fetcher:
        first = await fetcher.fetch(meme_url)
        together = await fetcher.fetch_many([meme_url, meme_url])
    assert first.status == "ok" and not first.decoded_before
    assert all(r.status == "ok" and r.decoded_before for r in together)
    assert len(decodes) == 1
    assert all(r.image is first.image and r.pdq == first.pdq and r.content_hash == first.content_hash for r in together)
    _only_loopback(connects)


@pytest.mark.asyncio
async def test_posts_of_new_bytes_arriving_together_decode_once(resolver, connects, decodes) -> None:
    fetcher = MediaFetcher(replace(CONFIG, max_side=64), resolver=resolver)
    async with serve_png(Image.new("RGB", (300, 200), (10, 200, 30))) as url, fetcher:
        results = await fetcher.fetch_many([url] * 6)
    assert [r.status for r in results] == ["ok"] * 6
    assert len(decodes) == 1 and sum(not r.decoded_before for r in results) == 1


@pytest.mark.asyncio
async def test_a_refused_file_posted_again_is_refused_again_without_decoding(server, resolver, decodes) -> None:
    url = server.url("/truncated.png")
    async with MediaFetcher(CONFIG, resolver=resolver) as fetcher:
        results = await fetcher.fetch_many([url, url, url])
        again = await fetcher.fetch(url)
    assert {r.status for r in [*results, again]} == {"truncated"}
    assert all(r.reason for r in [*results, again]) and len(decodes) == 1


@pytest.mark.asyncio
async def test_the_same_bytes_under_a_non_image_content_type_are_still_refused(resolver, connects, decodes) -> None:
    """The memo answers for bytes, never for a response: the content-type check runs on each."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")
    body = buf.getvalue()

    routes = {"/a.png": (body, "image/png"), "/b.html": (body, "text/html")}
    async with serve_bytes(routes) as base, MediaFetcher(CONFIG, resolver=resolver) as fetcher:
        ok = await fetcher.fetch(f"{base}/a.png")
        html = await fetcher.fetch(f"{base}/b.html")
    assert ok.status == "ok" and html.status == "wrong_content_type" and html.image is None
    _only_loopback(connects)


@pytest.mark.asyncio
async def test_without_the_memo_or_after_an_ocr_change_the_bytes_are_decoded_again(meme_url, resolver, decodes) -> None:
    async with MediaFetcher(replace(CONFIG, max_side=64, decode_memo_bytes=0), resolver=resolver) as fetcher:
        await fetcher.fetch_many([meme_url, meme_url])
    assert len(decodes) == 2
    engine = _RecordingEngine()
    async with MediaFetcher(replace(CONFIG, max_side=64), resolver=resolver) as fetcher:
        before = await fetcher.fetch(meme_url)
        fetcher.ocr = ImageTextReader(engine)  # a swap to a model that reads image text
        after = await fetcher.fetch(meme_url)
    assert before.ocr_text is None and after.ocr_text == "words on the meme" and not after.decoded_before
    assert len(decodes) == 4
