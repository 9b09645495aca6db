"""The review console: web pages for reviewers, a bearer-token JSON API, /metrics and /healthz.

Security model, in short:
- Every route but the login page and /static needs a user: pages a session (cookie
  HttpOnly, SameSite=Strict, Secure unless `secure_cookies=False`; server-side in Redis),
  the API (/api/v1) a bearer token, /metrics and /healthz either. Anonymous page requests
  are redirected to the login page, everything else gets 401.
- Every POST from a page carries the session's synchronizer CSRF token (the login form a
  double-submit cookie); a missing or wrong token is 403. The API takes no cookies, so it
  needs no CSRF token.
- Headers on every response: a CSP with no inline script or style (JS and CSS are static
  files), frame-ancestors 'none' + X-Frame-Options DENY, Referrer-Policy no-referrer, nosniff.
- Post text is rendered by jinja2 with autoescape on; images only through /media (see
  media_proxy.py), and only to the reviewer who holds the item, or an admin.
- A decision goes to Kafka (acks=all, awaited) before its Redis entry is acknowledged: when
  Kafka fails the reviewer sees the error and keeps the claim.
- A claim is kept alive while its page is open: the page's script renews it every
  claim_timeout/3 (POST /review/{entry_id}/renew, CSRF-checked like every page POST) and, when
  the renewal says the claim was lost, locks the form. A submit renews the claim (owner-checked)
  right before producing the decision and closes the item only if the submitter still holds
  it; a reviewer who lost it gets 409 and a page that says so, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from modstream.records import RecordError, ReviewDecision, ReviewItem
from review.auth import User, UserStore, csrf_ok
from review.decisions import (
    DecisionProducer,
    KafkaUnavailable,
    build_decision,
    choices_from_form,
    choices_from_json,
    item_tasks,
    model_label,
)
from review.media_proxy import MediaError, MediaProxy
from review.queue import Claim, NotClaimed, QueueError, QueueStats, ReviewQueue
from review.sessions import LoginLimiter, Session, SessionStore

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
LOGIN_CSRF_COOKIE = "modstream_login_csrf"

# What each action key does (shown on the page; console.js binds the same keys).
SHORTCUTS = (
    ("j / k", "next / previous task"),
    ("1-9", "jump to task"),
    ("c", "confirm the model's label"),
    ("x", "correct (binary: the other label; again: next label)"),
    ("n", "not violating"),
    ("s", "skip"),
    ("e", "escalate"),
    ("a", "confirm all undecided tasks"),
    ("v", "reveal / hide the image"),
    ("Enter", "submit when all tasks are decided"),
    ("?", "show / hide this help"),
    ("Esc", "leave the note field"),
)
ACTION_KEYS = {"confirm": "c", "correct": "x", "not_violating": "n", "skip": "s", "escalate": "e"}
ACTION_TITLES = {
    "confirm": "Confirm",
    "correct": "Correct",
    "not_violating": "Not violating",
    "skip": "Skip",
    "escalate": "Escalate",
}


@dataclass
class ConsoleConfig:
    bootstrap: str = "127.0.0.1:19092"
    redis_url: str = "redis://127.0.0.1:16379/0"
    users_path: Path = Path("var/review-users.json")
    claim_timeout_s: float = 300.0
    max_deliveries: int = 5
    allow_loopback_media: bool = False
    secure_cookies: bool = True
    topic: str = "reviewed"
    session_idle_s: int = 8 * 3600

    @property
    def session_cookie(self) -> str:
        # __Host- binds the cookie to this origin (Secure, Path=/, no Domain); plain name otherwise.
        return "__Host-modstream_session" if self.secure_cookies else "modstream_session"


class Metrics:
    """The console's own registry, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "modstream_review_decisions_total", "Task decisions written to Kafka, by action", ["action"], registry=r
        )
        self.items_decided = Counter("modstream_review_items_decided_total", "Review items decided", registry=r)
        self.claims = Counter("modstream_review_claims_total", "New review items handed to a reviewer", registry=r)
        self.reclaims = Counter(
            "modstream_review_reclaims_total", "Abandoned claims taken over by another reviewer", registry=r
        )
        self.dead = Counter("modstream_review_dead_lettered_total", "Items moved to the dead-letter stream", registry=r)
        self.renewals = Counter(
            "modstream_review_renewals_total", "Claims renewed by their holder (page heartbeat or API)", registry=r
        )
        self.claims_lost = Counter(
            "modstream_review_claims_lost_total",
            "Requests refused because the caller did not hold the item: a renewal, a submit (nothing "
            "recorded), or the close after the decision was produced (item left to its new holder)",
            ["stage"],
            registry=r,
        )
        self.kafka_errors = Counter(
            "modstream_review_kafka_errors_total", "Decisions that could not be written to Kafka", registry=r
        )
        self.depth = Gauge("modstream_review_queue_depth", "Review entries not yet acknowledged", registry=r)
        self.oldest = Gauge("modstream_review_oldest_item_age_seconds", "Age of the oldest open item", registry=r)
        self.escalations_settled = Counter(
            "modstream_review_escalations_settled_total",
            "Escalated items settled by an admin: decided (a labelled decision written to Kafka) or dismissed",
            ["outcome"],
            registry=r,
        )
        self.dead_depth = Gauge(
            "modstream_review_dead_letter_depth", "Items in the review dead-letter stream", registry=r
        )
        self.latency = Histogram(
            "modstream_review_request_seconds",
            "Console request latency by route",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self._seen = (0, 0, 0)

    def sync_queue(self, queue: ReviewQueue) -> None:
        events = queue.events
        claims, reclaims, dead = events.claims, events.reclaims, events.dead_lettered
        self.claims.inc(claims - self._seen[0])
        self.reclaims.inc(reclaims - self._seen[1])
        self.dead.inc(dead - self._seen[2])
        self._seen = (claims, reclaims, dead)

    def set_stats(self, stats: QueueStats) -> None:
        self.depth.set(stats.depth)
        self.oldest.set(stats.oldest_age_s or 0)
        self.dead_depth.set(stats.dead_letters)

    def stats_unknown(self) -> None:
        """Redis did not answer: NaN, not the last value nor 0 (a queue depth of 0 while Redis
        was down read as "all reviewed"). NaN compares false, so no queue alert fires on it."""
        for gauge in (self.depth, self.oldest, self.dead_depth):
            gauge.set(float("nan"))


@dataclass
class Identity:
    user: User
    session: Session | None  # None for bearer-token requests


IDENTITY = web.RequestKey("identity", Identity)  # set by the auth middleware on every request it lets through


class Console:
    """Holds the services one console process shares; the handlers are its methods."""

    def __init__(self, config: ConsoleConfig, *, producer: DecisionProducer | None = None) -> None:
        self.config = config
        self.users = UserStore(config.users_path)
        self.redis = aioredis.Redis.from_url(config.redis_url, socket_timeout=5.0, socket_connect_timeout=3.0)
        self.queue = ReviewQueue(
            self.redis, claim_timeout_s=config.claim_timeout_s, max_deliveries=config.max_deliveries
        )
        self.sessions = SessionStore(self.redis, idle_s=config.session_idle_s)
        self.limiter = LoginLimiter(self.redis)
        self.producer = producer or DecisionProducer(config.bootstrap, topic=config.topic)
        if config.claim_timeout_s < self.producer.timeout_s:
            # The submit renews the claim right before producing; a produce that outlasts the
            # claim timeout can still let the item change hands (the close is then refused).
            log.warning(
                "claim timeout %.1f s is shorter than the decision produce timeout %.1f s: with a slow Kafka "
                "an item can be reassigned while its decision is being written",
                config.claim_timeout_s,
                self.producer.timeout_s,
            )
        self.media = MediaProxy(allow_loopback=config.allow_loopback_media)
        self.metrics = Metrics()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,  # every template, whatever its name: post text is hostile
            undefined=jinja2.StrictUndefined,
        )
        self._stats_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        await self.media.start()
        try:
            await self.queue.ensure_group()
        except (RedisError, OSError) as exc:  # Redis may come later; pages answer 503 meanwhile
            log.warning("redis unavailable at start-up: %r", exc)
        self._stats_task = asyncio.create_task(self._refresh_stats(), name="review-stats")

    async def on_cleanup(self, app: web.Application) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await self.producer.close()
        await self.media.close()
        await self.redis.aclose()

    async def _refresh_stats(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                await self.stats()
            await asyncio.sleep(15)

    async def stats(self) -> QueueStats:
        stats = await self.queue.stats()
        self.metrics.set_stats(stats)
        self.metrics.sync_queue(self.queue)
        return stats

    # -- identity ---------------------------------------------------------------------------

    async def identify(self, request: web.Request) -> Identity | None:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            user = self.users.user_for_token(token.strip())
            return Identity(user, None) if user else None
        if request.path.startswith("/api/"):
            return None  # the API takes bearer tokens only, so it needs no CSRF defence
        session = await self.sessions.get(request.cookies.get(self.config.session_cookie))
        if session is None:
            return None
        user = self.users.get(session.user)
        if user is None or not hmac.compare_digest(session.fingerprint, user.fingerprint):
            # Removed, or password / role changed, or re-created under the same name since login.
            await self.sessions.delete(session)
            return None
        return Identity(user, session)

    # -- rendering --------------------------------------------------------------------------

    def render(self, request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
        ident: Identity | None = request.get(IDENTITY)
        html = self.templates.get_template(template).render(
            user=ident.user if ident else None,
            csrf=ident.session.csrf if ident and ident.session else "",
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def set_session_cookie(self, response: web.StreamResponse, sid: str) -> None:
        response.set_cookie(
            self.config.session_cookie,
            sid,
            path="/",
            httponly=True,
            secure=self.config.secure_cookies,
            samesite="Strict",
            max_age=self.config.session_idle_s,
        )


def _is_public(request: web.Request) -> bool:
    return request.path == "/login" or request.path.startswith("/static/")


def _wants_json(request: web.Request) -> bool:
    return (
        request.path.startswith("/api/")
        or request.path in ("/metrics", "/healthz")
        or request.path.startswith("/media/")
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
        if not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        if isinstance(response, web.HTTPException):
            raise response
        return response

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

    return [timing, headers, auth]


# -- helpers for handlers ----------------------------------------------------------------------


class ClaimLostAfterProduce(NotClaimed):
    """The decision reached Kafka, but the submitter no longer held the item when it was to
    be closed (the produce outlasted the claim timeout): the item stays with its new holder."""


RENEW_FLOOR_MS = 250  # a heartbeat no more often than this, however short the claim timeout


def renew_interval_ms(claim_timeout_s: float) -> int:
    """Three heartbeats per claim timeout: two can be lost (a slow network, a throttled
    background tab) before the claim lapses."""
    return max(RENEW_FLOOR_MS, int(claim_timeout_s * 1000 / 3))


LOST_TITLE = "Item reassigned"
LOST_MESSAGE = (
    "This item was reassigned to another reviewer (or closed) before your decision was saved: "
    "your claim on it lapsed. Nothing was recorded for it."
)
LOST_AFTER_PRODUCE_MESSAGE = (
    "Your decision was written to the decision log, but this item had been reassigned to another "
    "reviewer before it could be closed; it stays with them, and the later decision is the one kept."
)


def claim_decision_id(claim: Claim) -> str:
    """One id per claim: a submit retried after a Kafka timeout (whose first attempt may have
    reached the topic after all) is recognised downstream as the same decision."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"modstream-review:{claim.entry_id}:{claim.reviewer}:{claim.deliveries}"))


def _ident(request: web.Request) -> Identity:
    ident: Identity = request[IDENTITY]
    return ident


def _require_admin(request: web.Request) -> User:
    user = _ident(request).user
    if not user.is_admin:
        if _wants_json(request):
            raise web.HTTPForbidden(text=json.dumps({"error": "admin role required"}), content_type="application/json")
        raise web.HTTPForbidden(text="admin role required")
    return user


def _task_rows(claim: Claim, chosen: dict[str, tuple[str, str | None]] | None = None) -> list[dict[str, Any]]:
    item = claim.item
    rows = []
    for index, (task, labels) in enumerate(item_tasks(item).items()):
        value = (item.label.get("labels") or {}).get(task) or {}
        action, label = (chosen or {}).get(task, ("", None))
        rows.append(
            {
                "index": index + 1,
                "name": task,
                "labels": labels,
                "model_label": model_label(item, task),
                "score": value.get("score"),
                "threshold": value.get("threshold"),
                "decision": value.get("decision"),
                "action": action,
                "chosen": label,
            }
        )
    return rows


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SettledElsewhere(QueueError):
    """The admin's decision reached Kafka, but another admin settled or dismissed the
    escalation during the produce: nothing more is changed in Redis."""


def escalation_decision_id(escalation_id: str, admin: str) -> str:
    """One id per (escalation, admin): a decide retried after a Kafka timeout is recognised
    downstream as the same decision."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"modstream-escalation:{escalation_id}:{admin}"))


def admin_choices(item: ReviewItem, labels: Any) -> dict[str, tuple[str, str | None]]:
    """An admin's final labels (task -> label name, or empty / None for no label) as the
    choices `build_decision` takes: the model's label is a confirm, the task's first
    (negative) label not_violating, any other label a correction; no label a skip. RecordError
    for a task or label the item does not have, or when nothing at all is labelled."""
    if not isinstance(labels, Mapping):
        raise RecordError("labels", "expected {task: label or null}")
    tasks = item_tasks(item)
    unknown = sorted(set(labels) - set(tasks))
    if unknown:
        raise RecordError("labels", f"unknown task(s) {', '.join(map(str, unknown))}; this item has {', '.join(tasks)}")
    choices: dict[str, tuple[str, str | None]] = {}
    for task, names in tasks.items():
        chosen = labels.get(task)
        if chosen is not None and not isinstance(chosen, str):
            raise RecordError(f"labels.{task}", "must be a label name or null")
        if not chosen:
            choices[task] = ("skip", None)
        elif chosen not in names:
            raise RecordError(f"labels.{task}", f"{chosen!r} is not one of {names}")
        elif chosen == model_label(item, task):
            choices[task] = ("confirm", None)
        elif chosen == names[0]:
            choices[task] = ("not_violating", None)
        else:
            choices[task] = ("correct", chosen)
    if all(action == "skip" for action, _ in choices.values()):
        raise RecordError("labels", "choose a label for at least one task (or dismiss the escalation)")
    return choices


def _escalation_row(entry: dict[str, Any]) -> dict[str, Any]:
    """What the escalations page shows of one entry; an unreadable item can only be dismissed."""
    item: ReviewItem | None = None
    error = ""
    try:
        item = ReviewItem.from_json(entry.get("item", ""))
    except RecordError as exc:
        error = f"unreadable item: {exc}"
    tasks = []
    if item is not None:
        for task, names in item_tasks(item).items():
            value = (item.label.get("labels") or {}).get(task) or {}
            tasks.append(
                {"name": task, "labels": names, "model_label": model_label(item, task), "score": value.get("score")}
            )
    try:
        at_ms = int(entry.get("escalated_at", ""))
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at_ms / 1000))
        age: float | None = max(0.0, time.time() - at_ms / 1000)
    except ValueError:
        when, age = "?", None
    return {
        "id": entry["id"],
        "post_id": entry.get("post_id", ""),
        "text": item.text if item else "",
        "tasks": tasks,
        "reviewer": entry.get("reviewer", ""),
        "note": entry.get("note", ""),
        "when": when,
        "age": age,
        "error": error,
    }


class Handlers:
    def __init__(self, console: Console) -> None:
        self.c = console

    # -- login / logout -----------------------------------------------------------------------

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

    # -- pages ------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/review")

    async def review_page(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        claim = await self.c.queue.claim(user.name)
        stats = await self.c.stats()
        done = request.query.get("done")
        if claim is None:
            return self.c.render(request, "empty.html", stats=stats, fmt_age=_fmt_age, done=done)
        return self._item_page(request, claim, stats, done=done)

    def _item_page(
        self,
        request: web.Request,
        claim: Claim,
        stats: QueueStats,
        *,
        status: int = 200,
        error: str | None = None,
        chosen: dict[str, tuple[str, str | None]] | None = None,
        note: str | None = None,
        done: str | None = None,
    ) -> web.Response:
        item = claim.item
        media = item.label.get("media") or {}
        return self.c.render(
            request,
            "item.html",
            status=status,
            claim=claim,
            item=item,
            tasks=_task_rows(claim, chosen),
            media=media,
            has_image=bool(item.image_url),
            itm_match=item.label.get("itm_match"),
            model_version=item.label.get("model_version", ""),
            stats=stats,
            fmt_age=_fmt_age,
            error=error,
            note=note or "",
            done=done,
            shortcuts=SHORTCUTS,
            action_keys=ACTION_KEYS,
            action_titles=ACTION_TITLES,
            claim_timeout_s=self.c.config.claim_timeout_s,
            renew_interval_ms=renew_interval_ms(self.c.config.claim_timeout_s),
        )

    async def submit_page(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        entry_id = request.match_info["entry_id"]
        try:
            claim = await self.c.queue.get_claimed(entry_id, user.name)
        except NotClaimed:
            self.c.metrics.claims_lost.labels("submit").inc()
            return self._lost_page(request, LOST_MESSAGE)
        form = await request.post()
        choices, note = choices_from_form(form, list(item_tasks(claim.item)))
        try:
            decision = build_decision(claim.item, user.name, choices, note=note, decision_id=claim_decision_id(claim))
        except RecordError as exc:
            stats = await self.c.stats()
            return self._item_page(
                request, claim, stats, status=400, error=f"Not submitted: {exc}", chosen=choices, note=note
            )
        try:
            await self._commit(claim, decision)
        except ClaimLostAfterProduce:
            return self._lost_page(request, LOST_AFTER_PRODUCE_MESSAGE)
        except NotClaimed:
            return self._lost_page(request, LOST_MESSAGE)
        except KafkaUnavailable as exc:
            stats = await self.c.stats()
            return self._item_page(
                request,
                claim,
                stats,
                status=503,
                error=f"Not saved: {exc}. The item is still yours; submit again in a moment.",
                chosen=choices,
                note=note,
            )
        raise web.HTTPSeeOther("/review?done=" + quote(claim.item.post_id, safe=""))

    def _lost_page(self, request: web.Request, message: str) -> web.Response:
        return self.c.render(request, "error.html", status=409, title=LOST_TITLE, message=message)

    async def _commit(self, claim: Claim, decision: ReviewDecision) -> None:
        """The claim is renewed first (owner-checked: NotClaimed, nothing produced, if the
        submitter lost it), so it cannot lapse during the produce. Then Kafka (acks=all,
        awaited: every decision is on record), then Redis: a decision that labels something or
        escalates ends the item (mark decided + XACK; an escalation is also copied to the
        escalated stream for admins); one that only skips puts the item back in the queue for
        another reviewer. Each Redis step checks the owner again: ClaimLostAfterProduce when the
        item changed hands during the produce (nothing acked; it stays with its holder)."""
        try:
            await self.c.queue.hold(claim.entry_id, decision.reviewer)
        except NotClaimed:
            self.c.metrics.claims_lost.labels("submit").inc()
            raise
        try:
            await self.c.producer.send(decision)
        except KafkaUnavailable:
            self.c.metrics.kafka_errors.inc()
            raise
        labels = any(label is not None for label in decision.training_labels().values())
        try:
            if decision.escalated:
                await self.c.queue.escalate(claim.entry_id, decision.reviewer, decision.decision_id, decision.note)
            if labels or decision.escalated:
                await self.c.queue.complete(claim.entry_id, claim.item.post_id, decision.reviewer, decision.decision_id)
            else:
                await self.c.queue.release(claim.entry_id, decision.reviewer)
        except NotClaimed as exc:
            self.c.metrics.claims_lost.labels("close").inc()
            log.warning("decision %s produced, but %s", decision.decision_id, exc)
            raise ClaimLostAfterProduce(str(exc)) from exc
        for task_decision in decision.decisions.values():
            self.c.metrics.decisions.labels(task_decision.action).inc()
        self.c.metrics.items_decided.inc()

    async def media(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        try:
            claim = await self.c.queue.get_claimed(request.match_info["entry_id"], user.name, admin=user.is_admin)
        except NotClaimed:
            return _json_error(404, "no such item claimed by you")
        if not claim.item.image_url:
            return _json_error(404, "this post has no image")
        media = claim.item.label.get("media") or {}
        try:
            image = await self.c.media.get(claim.item.image_url, media.get("content_hash"))
        except MediaError as exc:
            return _json_error(502, f"image unavailable: {exc.status}", reason=exc.reason)
        response = web.Response(body=image.body, content_type=image.content_type)
        response.headers["Content-Disposition"] = "inline"
        return response

    async def dead_page(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        letters = await self.c.queue.dead_letters(200)
        rows = []
        for letter in letters:
            text = ""
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                text = json.loads(letter.get("item", "")).get("text", "")
            rows.append({**letter, "text": text})
        return self.c.render(request, "dead.html", letters=rows, stats=await self.c.stats(), fmt_age=_fmt_age)

    async def dead_action_page(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        dead_id, action = request.match_info["dead_id"], request.match_info["action"]
        try:
            if action == "requeue":
                await self.c.queue.requeue_dead(dead_id)
            elif action == "delete":
                await self.c.queue.delete_dead(dead_id)
            else:
                raise web.HTTPNotFound()
        except QueueError as exc:
            raise web.HTTPNotFound(text=str(exc)) from exc
        raise web.HTTPSeeOther("/admin/dead")

    async def escalated_page(
        self, request: web.Request, *, error: str | None = None, status: int = 200
    ) -> web.Response:
        _require_admin(request)
        rows = [_escalation_row(entry) for entry in await self.c.queue.escalated(200)]
        return self.c.render(
            request,
            "escalated.html",
            status=status,
            escalations=rows,
            error=error,
            done=request.query.get("done"),
            stats=await self.c.stats(),
            fmt_age=_fmt_age,
        )

    async def _decide_escalation(self, escalation_id: str, admin: str, labels: Any, note: Any) -> ReviewDecision:
        """The admin's final decision: checked, produced to Kafka (acks=all, awaited), then the
        escalation settled in Redis. QueueError (gone), RecordError (bad choice) and
        KafkaUnavailable change nothing."""
        entry = await self.c.queue.escalation(escalation_id)
        item = ReviewItem.from_json(entry.get("item", ""))
        if note is not None and not isinstance(note, str):
            raise RecordError("note", "must be a string")
        choices = admin_choices(item, labels)
        decision_id = escalation_decision_id(escalation_id, admin)
        decision = build_decision(item, admin, choices, note=note, decision_id=decision_id)
        try:
            await self.c.producer.send(decision)
        except KafkaUnavailable:
            self.c.metrics.kafka_errors.inc()
            raise
        try:
            await self.c.queue.settle_escalation(escalation_id, item.post_id, decision.decision_id, admin)
        except QueueError as exc:
            log.warning("decision %s produced, but %s", decision.decision_id, exc)
            raise SettledElsewhere(
                f"{exc}: another admin settled it while your decision was being saved; your decision "
                f"{decision.decision_id} is on the decision log all the same"
            ) from exc
        for task_decision in decision.decisions.values():
            self.c.metrics.decisions.labels(task_decision.action).inc()
        self.c.metrics.escalations_settled.labels("decided").inc()
        log.info("escalation %s (post %s) decided by %s: %s", escalation_id, item.post_id, admin, decision_id)
        return decision

    async def _dismiss_escalation(self, escalation_id: str, admin: str) -> None:
        entry = await self.c.queue.escalation(escalation_id)
        if not await self.c.queue.dismiss_escalation(escalation_id):
            raise QueueError(f"no open escalation {escalation_id} (settled or dismissed already?)")
        self.c.metrics.escalations_settled.labels("dismissed").inc()
        # Warning level, so it is logged by default: a dismissal leaves no record on Kafka.
        log.warning(
            "escalation %s (post %s, escalated by %s) dismissed without a label by %s",
            escalation_id,
            entry.get("post_id", ""),
            entry.get("reviewer", ""),
            admin,
        )

    async def escalated_action_page(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        escalation_id, action = request.match_info["esc_id"], request.match_info["action"]
        form = await request.post()
        try:
            if action == "decide":
                labels = {k.removeprefix("label."): v for k, v in form.items() if k.startswith("label.")}
                decision = await self._decide_escalation(escalation_id, admin.name, labels, form.get("note"))
                post_id = decision.post_id
            elif action == "dismiss":
                await self._dismiss_escalation(escalation_id, admin.name)
                post_id = ""
            else:
                raise web.HTTPNotFound()
        except SettledElsewhere as exc:
            return await self.escalated_page(request, error=str(exc), status=409)
        except QueueError as exc:
            return await self.escalated_page(request, error=str(exc), status=404)
        except RecordError as exc:
            return await self.escalated_page(request, error=f"Not decided: {exc}", status=400)
        except KafkaUnavailable as exc:
            return await self.escalated_page(
                request, error=f"Not saved: {exc}. Nothing changed; try again in a moment.", status=503
            )
        raise web.HTTPSeeOther("/admin/escalated" + ("?done=" + quote(post_id, safe="") if post_id else ""))

    # -- API --------------------------------------------------------------------------------

    async def api_claim(self, request: web.Request) -> web.StreamResponse:
        claim = await self.c.queue.claim(_ident(request).user.name)
        self.c.metrics.sync_queue(self.c.queue)
        if claim is None:
            return web.json_response({"item": None})
        return web.json_response(claim.to_json())

    async def api_item(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        try:
            claim = await self.c.queue.get_claimed(request.match_info["entry_id"], user.name, admin=user.is_admin)
        except NotClaimed as exc:
            return _json_error(404, str(exc))
        return web.json_response(claim.to_json())

    async def api_decision(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json_error(400, "body must be JSON")
        try:
            choices, note = choices_from_json(body)
        except RecordError as exc:
            return _json_error(400, str(exc))
        try:
            claim = await self.c.queue.get_claimed(request.match_info["entry_id"], user.name)
        except NotClaimed as exc:
            self.c.metrics.claims_lost.labels("submit").inc()
            return _json_error(409, str(exc), recorded=False)
        try:
            decision = build_decision(claim.item, user.name, choices, note=note, decision_id=claim_decision_id(claim))
        except RecordError as exc:
            return _json_error(400, str(exc))
        try:
            await self._commit(claim, decision)
        except ClaimLostAfterProduce as exc:
            return _json_error(409, str(exc), recorded=True, decision_id=decision.decision_id)
        except NotClaimed as exc:
            return _json_error(409, str(exc), recorded=False)
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        return web.json_response({"decision": decision.to_json()}, status=201)

    async def _renew(self, request: web.Request) -> web.Response:
        """The heartbeat: 200 while the caller holds the item (its idle clock reset), 409 once
        it is lost (taken over, decided elsewhere, or never theirs); changes nothing then."""
        user = _ident(request).user
        entry_id = request.match_info["entry_id"]
        interval = renew_interval_ms(self.c.config.claim_timeout_s)
        if await self.c.queue.renew(entry_id, user.name):
            self.c.metrics.renewals.inc()
            return web.json_response({"held": True, "entry_id": entry_id, "renew_interval_ms": interval})
        self.c.metrics.claims_lost.labels("renew").inc()
        return _json_error(
            409,
            f"item {entry_id} is no longer claimed by {user.name}: it was reassigned or closed",
            held=False,
            next="/review",
        )

    async def renew_page(self, request: web.Request) -> web.StreamResponse:
        return await self._renew(request)  # session + CSRF header checked by the auth middleware

    async def api_renew(self, request: web.Request) -> web.StreamResponse:
        return await self._renew(request)

    async def api_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response((await self.c.stats()).to_json())

    async def api_escalated(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            count = max(1, min(1000, int(request.query.get("count", "100"))))
        except ValueError:
            return _json_error(400, "count must be an integer")
        return web.json_response({"escalated": await self.c.queue.escalated(count)})

    async def api_escalated_decide(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json_error(400, "body must be JSON")
        if not isinstance(body, dict):
            return _json_error(400, 'expected {"labels": {task: label or null}, "note"?}')
        try:
            decision = await self._decide_escalation(
                request.match_info["esc_id"], admin.name, body.get("labels"), body.get("note")
            )
        except SettledElsewhere as exc:
            return _json_error(409, str(exc), recorded=True)
        except QueueError as exc:
            return _json_error(404, str(exc), recorded=False)
        except RecordError as exc:
            return _json_error(400, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        return web.json_response({"decision": decision.to_json()}, status=201)

    async def api_escalated_dismiss(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            await self._dismiss_escalation(request.match_info["esc_id"], admin.name)
        except QueueError as exc:
            return _json_error(404, str(exc))
        return web.json_response({"dismissed": request.match_info["esc_id"]})

    async def api_dead(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            count = max(1, min(1000, int(request.query.get("count", "100"))))
        except ValueError:
            return _json_error(400, "count must be an integer")
        return web.json_response({"dead_letters": await self.c.queue.dead_letters(count)})

    async def api_dead_requeue(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            new_id = await self.c.queue.requeue_dead(request.match_info["dead_id"])
        except QueueError as exc:
            return _json_error(404, str(exc))
        return web.json_response({"entry_id": new_id})

    async def api_dead_delete(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            deleted = await self.c.queue.delete_dead(request.match_info["dead_id"])
        except QueueError as exc:
            return _json_error(404, str(exc))
        return web.json_response({"deleted": deleted}, status=200 if deleted else 404)

    # -- operations -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.c.redis.ping()
        except (RedisError, OSError):
            return web.json_response({"status": "degraded", "redis": False}, status=503)
        return web.json_response({"status": "ok", "redis": True})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.c.stats()
        except (RedisError, OSError):
            self.c.metrics.stats_unknown()
        response = web.Response(body=generate_latest(self.c.metrics.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response


CONSOLE_KEY = web.AppKey("console", Console)


def create_app(config: ConsoleConfig, *, producer: DecisionProducer | None = None) -> web.Application:
    console = Console(config, producer=producer)
    h = Handlers(console)
    app = web.Application(middlewares=build_middlewares(console), client_max_size=1024 * 1024)
    app[CONSOLE_KEY] = console
    r = app.router
    r.add_get("/login", h.login_page)
    r.add_post("/login", h.login)
    r.add_post("/logout", h.logout)
    r.add_get("/", h.index)
    r.add_get("/review", h.review_page)
    r.add_post("/review/{entry_id}/decision", h.submit_page)
    r.add_post("/review/{entry_id}/renew", h.renew_page)
    r.add_get("/media/{entry_id}", h.media)
    r.add_get("/admin/dead", h.dead_page)
    r.add_post("/admin/dead/{dead_id}/{action}", h.dead_action_page)
    r.add_get("/admin/escalated", h.escalated_page)
    r.add_post("/admin/escalated/{esc_id}/{action}", h.escalated_action_page)
    r.add_post("/api/v1/claim", h.api_claim)
    r.add_get("/api/v1/items/{entry_id}", h.api_item)
    r.add_post("/api/v1/items/{entry_id}/decision", h.api_decision)
    r.add_post("/api/v1/items/{entry_id}/renew", h.api_renew)
    r.add_get("/api/v1/stats", h.api_stats)
    r.add_get("/api/v1/admin/escalated", h.api_escalated)
    r.add_post("/api/v1/admin/escalated/{esc_id}/decide", h.api_escalated_decide)
    r.add_post("/api/v1/admin/escalated/{esc_id}/dismiss", h.api_escalated_dismiss)
    r.add_get("/api/v1/admin/dead", h.api_dead)
    r.add_post("/api/v1/admin/dead/{dead_id}/requeue", h.api_dead_requeue)
    r.add_delete("/api/v1/admin/dead/{dead_id}", h.api_dead_delete)
    r.add_get("/healthz", h.healthz)
    r.add_get("/metrics", h.metrics)
    r.add_static("/static", STATIC, show_index=False, follow_symlinks=False)
    app.on_startup.append(console.on_startup)
    app.on_cleanup.append(console.on_cleanup)
    return app


def create_ops_app(main: web.Application) -> web.Application:
    """/healthz and /metrics without authentication, for probes and scrapers on an internal port."""
    console = main[CONSOLE_KEY]
    h = Handlers(console)
    app = web.Application()
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/metrics", h.metrics)
    return app


async def serve(config: ConsoleConfig, host: str, port: int, ops_port: int | None = None) -> None:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    ops_runner: web.AppRunner | None = None
    if ops_port:
        ops_runner = web.AppRunner(create_ops_app(app), access_log=None)
        await ops_runner.setup()
        await web.TCPSite(ops_runner, host, ops_port).start()
    print(f"review console on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        if ops_runner is not None:
            await ops_runner.cleanup()
        await runner.cleanup()
