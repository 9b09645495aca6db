"""Login and logout pages."""

from __future__ import annotations

import asyncio
import secrets

from aiohttp import web

from review.auth import csrf_ok
from review.console.base import HandlerBase, _ident
from review.console.core import LOGIN_CSRF_COOKIE
from review.console.middlewares import _safe_next


class LoginPages(HandlerBase):
    """Login and logout (the login form's CSRF token is a double-submit cookie)."""

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        ident = await self.c.identify(request)
        if ident is not None and ident.session is not None:
            raise web.HTTPFound(_safe_next(request.query.get("next")))
        return self._login_form(request, error=None, status=200)

    def _login_form(self, request: web.Request, *, error: str | None, status: int, name: str = "") -> web.Response:
        # Keep the double-submit token a browser already holds: a second login tab (or any
        # other request that lands here) must not invalidate the form open in the first.
        token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not (40 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()):
            token = secrets.token_urlsafe(32)
        response = self.c.render(
            request,
            "login.html",
            status=status,
            error=error,
            login_csrf=token,
            name=name,
            next=_safe_next(request.query.get("next")),
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            path="/login",
            httponly=True,
            secure=self.c.config.secure_cookies,
            samesite="Strict",
            max_age=3600,
        )
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), form.get("csrf_token")):
            response = self._login_form(request, error="The login form expired; please try again.", status=403)
            return response
        name = str(form.get("username", ""))[:64]
        password = str(form.get("password", ""))
        addr = request.remote or "unknown"
        if not await self.c.limiter.attempt(name, addr):
            return self._login_form(
                request, error="Too many failed logins. Wait 15 minutes and try again.", status=429, name=name
            )
        user = await asyncio.to_thread(self.c.users.authenticate, name, password)
        if user is None:
            return self._login_form(request, error="Wrong user name or password.", status=401, name=name)
        await self.c.limiter.succeeded(name, addr)
        sid, _ = await self.c.sessions.create(user.name, user.fingerprint)
        response = web.HTTPSeeOther(_safe_next(str(form.get("next", "")) or None))
        self.c.set_session_cookie(response, sid)
        response.del_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = _ident(request).session
        if session is not None:
            await self.c.sessions.delete(session)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(self.c.config.session_cookie, path="/")
        return response
