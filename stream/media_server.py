"""A loopback HTTP server for synthetic post images (demo, tests, benchmarks).

Serves `root/<name>` at `http://127.0.0.1:<port>/img/<name>`, optionally after a fixed
delay that stands in for a remote CDN's latency.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web


class MediaServer:
    def __init__(self, root: Path, *, latency_s: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = root.resolve()
        self.latency_s = latency_s
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.hits = 0

    async def _image(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        path = (self.root / request.match_info["name"]).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type="image/png")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/img/{name}", self._image)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self.url

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/img"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
