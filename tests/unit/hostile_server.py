"""A misbehaving image server on 127.0.0.1 for the media fetcher tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
import zlib
from collections import Counter

from aiohttp import web
from aiohttp.typedefs import Handler
from PIL import Image


def _encode(fmt: str, size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buf, fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


PNG = _encode("PNG")
JPEG = _encode("JPEG")
# A well-formed PNG header declaring 100000 x 100000 RGB pixels, with a few bytes of data.
BOMB_PNG = (
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    + _png_chunk(b"IEND", b"")
)
TRUNCATED_PNG = _encode("PNG", (64, 64))[:-40]


def _static(body: bytes, content_type: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    return handler


class HostileServer:
    """Routes for every failure the fetcher must classify; counts hits per path."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # the client's max_bytes, to size the oversized bodies
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/ok.png", _static(PNG, "image/png"))
        app.router.add_get("/ok.jpg", _static(JPEG, "image/jpeg"))
        app.router.add_get("/octet.png", _static(PNG, "application/octet-stream"))
        app.router.add_get("/octet.html", _static(b"<html>hi</html>", "application/octet-stream"))
        app.router.add_get("/page.html", _static(b"<html>no</html>", "text/html"))
        app.router.add_get("/truncated.png", _static(TRUNCATED_PNG, "image/png"))
        app.router.add_get("/bomb.png", _static(BOMB_PNG, "image/png"))
        app.router.add_get("/empty.png", _static(b"", "image/png"))
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/flaky", self._flaky)
        app.router.add_get("/drip", self._drip)
        app.router.add_get("/big-cl", self._big_with_length)
        app.router.add_get("/big-chunked", self._big_chunked)
        app.router.add_get("/loop", self._redirect_loop)
        app.router.add_get("/chain/{n}", self._chain)
        app.router.add_get("/to", self._redirect_to)
        app.router.add_get("/slow.png", self._slow)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        return await handler(request)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def _flaky(self, request: web.Request) -> web.Response:
        # 503 on the first hit, then the image: a transient failure a retry fixes.
        if self.hits[request.path] == 1:
            return web.Response(status=503)
        return web.Response(body=PNG, content_type="image/png")

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(len(PNG))})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # raised once the client hangs up
            for byte in PNG:
                await resp.write(bytes([byte]))
                await asyncio.sleep(0.5)
        return resp

    async def _big_with_length(self, request: web.Request) -> web.Response:
        return web.Response(body=PNG + b"\0" * (2 * self.cap), content_type="image/png")

    async def _big_chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the client stops reading at its cap
            await resp.write(PNG)
            for _ in range(4 * self.cap // 4096):
                await resp.write(b"\0" * 4096)
            await resp.write_eof()
        return resp

    async def _redirect_loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def _redirect_to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    async def _chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        raise web.HTTPFound(str(n - 1))  # relative: resolved against the current URL

    async def _slow(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.in_flight -= 1
        return web.Response(body=PNG, content_type="image/png")
