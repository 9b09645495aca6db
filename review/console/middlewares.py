"""Middlewares: request timing, security headers on every response, and authentication
(sessions for pages, bearer tokens for the API, CSRF on every page POST)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from redis.exceptions import RedisError

from review.auth import csrf_ok
from review.console.core import IDENTITY, SECURITY_HEADERS, Console

log = logging.getLogger(__name__)


def _is_public(request: web.Request) -> bool:
    # /ls-media/ carries its own credential: a signed, expiring link (review/media_links.py).
    return request.path == "/login" or request.path.startswith(("/static/", "/ls-media/"))


def _wants_json(request: web.Request) -> bool:
    return (
        request.path.startswith("/api/")
        or request.path in ("/metrics", "/healthz")
        or request.path.startswith(("/media/", "/ls-media/"))
        or (request.path.startswith("/review/") and request.path.endswith("/renew"))  # the page's heartbeat
    )


def _safe_next(raw: str | None) -> str:
    """Only same-origin paths after login (no open redirect)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/review"
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc:
        return "/review"
    return raw


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def build_middlewares(console: Console) -> list[Any]:
    @web.middleware
    async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = "unmatched"
        resource = request.match_info.route.resource
        if resource is not None:
            route = resource.canonical
        try:
            return await handler(request)
        finally:
            console.metrics.latency.labels(route, request.method).observe(time.perf_counter() - started)

    @web.middleware
    async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        except (RedisError, OSError) as exc:
            log.warning("redis error on %s: %r", request.path, exc)
            if _wants_json(request):
                response = _json_error(503, "the review queue (Redis) is unavailable; try again shortly")
            else:
                response = console.render(
                    request,
                    "error.html",
                    status=503,
                    title="Queue unavailable",
                    message="The review queue (Redis) is unavailable. Nothing was lost; try again shortly.",
                )
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/ls-media/"):
            # Loaded by Label Studio's page on its own origin: allowed to cross, for a valid link only.
            response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
        if not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        """A browser POST from another origin is refused before anything else looks at it.
        Cookies do not separate ports, so a page on another port of the same host could plant
        the login form's CSRF cookie with a token of its own and log the victim's browser in
        as the attacker (login CSRF); browsers send Origin on every POST, and it names the
        port. Requests without Origin (API clients, curl) keep their other checks."""
        origin = request.headers.get("Origin")
        changes = request.method not in ("GET", "HEAD", "OPTIONS")
        if changes and origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host):
            log.warning("refused a %s to %s from origin %r", request.method, request.path, origin)
            if _wants_json(request):
                return _json_error(403, "cross-origin request refused")
            return console.render(
                request,
                "error.html",
                status=403,
                title="Refused",
                message="This form was sent from another site. Open the console's own page and try again.",
            )
        return await handler(request)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_public(request):
            return await handler(request)
        ident = await console.identify(request)
        if ident is None:
            if _wants_json(request) or request.method != "GET":
                response = _json_error(401, "authentication required")
                if request.path.startswith("/api/"):
                    response.headers["WWW-Authenticate"] = 'Bearer realm="modstream-review"'
                return response
            raise web.HTTPFound("/login?next=" + quote(request.path_qs, safe="/"))
        request[IDENTITY] = ident
        # Synchronizer token: every state-changing request made with a session cookie.
        if ident.session is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
            given: Any = request.headers.get("X-CSRF-Token")
            if given is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                given = (await request.post()).get("csrf_token")
            if not csrf_ok(ident.session.csrf, given):
                return console.render(
                    request,
                    "error.html",
                    status=403,
                    title="Form expired",
                    message="This form's security token is missing or stale. Reload the page and try again.",
                )
        return await handler(request)

    return [timing, headers, same_origin, auth]
