"""Helpers for media-fetcher tests: a loopback server for fixed bodies, and a count of decodes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web


@contextlib.asynccontextmanager
async def serve_bytes(routes: dict[str, tuple[bytes, str]]) -> AsyncIterator[str]:
    """Serves each path's (body, content type) from 127.0.0.1 on a free port; yields the base URL."""

    def handler(body: bytes, content_type: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type)

        return handle

    app = web.Application()
    for path, (body, content_type) in routes.items():
        app.router.add_get(path, handler(body, content_type))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the decode pool's work (stream.media.decode_and_read), by digest."""
    import stream.media as media

    seen: list[str] = []
    real = media.decode_and_read

    def counting(data: bytes, digest: str | None, *args: Any) -> Any:
        seen.append(digest or "")
        return real(data, digest, *args)

    monkeypatch.setattr(media, "decode_and_read", counting)
    return seen
