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


class BackgroundMediaServer:
    """A MediaServer on its own event loop in a daemon thread, for synchronous callers
    (the `run` command, benchmarks, test fixtures). `latency_s` can be changed live."""

    def __init__(self, root: Path, *, latency_s: float = 0.0) -> None:
        import threading

        self.server = MediaServer(root, latency_s=latency_s)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.server.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name="media-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("media server did not start")

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
