"""The console's settings, the services one process shares (users, sessions, queue, producer,
media proxy, templates) and the request's identity."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from review.agreement import DEFAULT_RATE as DEFAULT_SECOND_REVIEW_RATE
from review.agreement import second_review_sampler
from review.auth import User, UserStore
from review.console.metrics import Metrics
from review.decisions import (
    DecisionProducer,
)
from review.evidence_images import EvidenceImages
from review.queue import QueueStats, ReviewQueue
from review.sessions import LoginLimiter, Session, SessionStore
from stream.bank_topic import BankFollower
from stream.banks.bank import VerdictBanks
from stream.evidence import open_store

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parents[1]  # review/: the templates and static files live there
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer made browsers send Origin: null on our own forms
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
    ("m / u", "image and text belong together / are unrelated (again: not sure)"),
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
    # The evidence store the worker keeps scored media in (a folder or s3://bucket/prefix).
    evidence: str = "var/evidence"
    secure_cookies: bool = True
    topic: str = "reviewed"
    audit_topic: str = "audit"
    # Signed links to scored media for Label Studio (review/media_links.py); None: not served.
    media_link_key: str | None = None
    media_link_origin: str = "*"  # Access-Control-Allow-Origin of those images (Label Studio's origin)
    # The verdict banks' topic: decisions are banked there, and read back for precedent and
    # curation ("" : no banks).
    bank_topic: str = "bank-updates"
    session_idle_s: int = 8 * 3600
    # The share of review items a second reviewer decides too, blind (review/agreement.py; 0: none).
    second_review_rate: float = DEFAULT_SECOND_REVIEW_RATE
    # The Prometheus that scrapes the dataset sinks: the live-quality page reads it (None: not shown).
    prometheus_url: str | None = None

    @property
    def session_cookie(self) -> str:
        # __Host- binds the cookie to this origin (Secure, Path=/, no Domain); plain name otherwise.
        return "__Host-modstream_session" if self.secure_cookies else "modstream_session"


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
        self.media = EvidenceImages(open_store(config.evidence))
        self.metrics = Metrics()
        self.second_reviews = second_review_sampler(config.second_review_rate)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,  # every template, whatever its name: post text is hostile
            undefined=jinja2.StrictUndefined,
        )
        self._stats_task: asyncio.Task[None] | None = None
        # The banks as the workers hold them (read from the topic): precedent and curation.
        self.banks = VerdictBanks()
        self._bank_task: asyncio.Task[None] | None = None
        self.bank_follower: BankFollower | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        try:
            await self.queue.ensure_group()
        except (RedisError, OSError) as exc:  # Redis may come later; pages answer 503 meanwhile
            log.warning("redis unavailable at start-up: %r", exc)
        self._stats_task = asyncio.create_task(self._refresh_stats(), name="review-stats")
        if self.config.bank_topic:
            self.bank_follower = BankFollower(self.config.bootstrap, self.banks, self.config.bank_topic)
            self._bank_task = asyncio.create_task(self.bank_follower.run(), name="bank-updates")

    async def on_cleanup(self, app: web.Application) -> None:
        for task in (self._stats_task, self._bank_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.producer.close()
        self.media.close()
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
