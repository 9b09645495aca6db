"""Fixtures for browser tests of the review console: real headless Chromium (Debian's
/usr/bin/chromium driven by Playwright), the real Kafka + Redis stack, the console as a real
`python -m modstream.cli review serve` subprocess, and a loopback media server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from modstream.records import ReviewDecision, ReviewItem
from stream.media_server import BackgroundMediaServer
from tests.integration.console_harness import json_api
from tests.integration.stack import REPO_ROOT, LocalStack, free_loopback_ports

T = TypeVar("T")
CHROMIUM = Path("/usr/bin/chromium")
REDIS_DB = 7  # the console's own database on the shared test redis-server, flushed per console
PASSWORD = "e2e password 0123"
USERS = {"alice": "reviewer", "bob": "reviewer", "carol": "reviewer", "root": "admin"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CHROMIUM.exists():
        return
    if in_ci():
        return  # the `browser` fixture fails instead: CI must run these tests
    skip = pytest.mark.skip(reason=f"{CHROMIUM} is missing (apt-get install chromium); CI is unset, so skipping")
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Module-scoped on purpose: Playwright's sync API keeps an event loop running in the
    test thread until it stops, and every later test that calls asyncio.run() would fail."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing and CI is set: the browser tests must run", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def users_file(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Users added through the real CLI (each change recorded on the audit topic); returns the
    file and API tokens of root and alice."""
    path = tmp_path_factory.mktemp("review-users") / "users.json"
    for name, role in USERS.items():
        subprocess.run(
            [sys.executable, "-m", "modstream.cli", "review", "add-user", name, "--role", role, "--password-stdin",
             "--users", str(path), "--bootstrap", stack.bootstrap],
            input=PASSWORD + "\n", text=True, check=True, cwd=REPO_ROOT, capture_output=True,
        )  # fmt: skip
    tokens = {
        name: subprocess.run(
            [sys.executable, "-m", "modstream.cli", "review", "token", name, "--users", str(path),
             "--bootstrap", stack.bootstrap],
            text=True, check=True, cwd=REPO_ROOT, capture_output=True,
        ).stdout.strip()
        for name in ("root", "alice")
    }  # fmt: skip
    return path, tokens


def make_image(path: Path, seed: int) -> None:
    """A synthetic, clearly artificial test image (never real post data)."""
    from PIL import Image, ImageDraw

    w, h = 640, 420
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / h
        draw.line([(0, y), (w, y)], fill=(int(40 + 120 * t), int(90 + 60 * (1 - t)), int(200 - 80 * t)))
    palette = [(250, 200, 60), (230, 80, 90), (80, 200, 150), (250, 250, 250)]
    for i in range(6):
        x0 = (seed * 53 + i * 97) % (w - 160)
        y0 = (seed * 31 + i * 71) % (h - 160)
        draw.ellipse([x0, y0, x0 + 90 + i * 10, y0 + 90 + i * 10], fill=palette[i % 4])
    draw.rectangle([24, h - 70, w - 24, h - 24], fill=(15, 19, 28))
    draw.text((40, h - 56), f"SYNTHETIC TEST IMAGE #{seed}", fill=(255, 255, 255))
    img.save(path, format="PNG")


@dataclass
class Media:
    """The posts' host (a loopback server the console must never ask) and the evidence folder
    where a worker would have kept the bytes it scored: each synthetic image is in both."""

    server: BackgroundMediaServer
    root: Path
    evidence: Path

    @property
    def url(self) -> str:
        return self.server.url

    def keep(self, data: bytes) -> str:
        """Store `data` as a worker would; returns its hash."""
        from stream.evidence import LocalBackend

        digest = hashlib.sha256(data).hexdigest()
        LocalBackend(self.evidence).put(digest, data)
        return digest


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Media]:
    root = tmp_path_factory.mktemp("review-media")
    files = tmp_path_factory.mktemp("review-evidence")
    server = BackgroundMediaServer(root)
    kept = Media(server, root, files)
    for seed in range(4):
        make_image(root / f"synthetic-{seed}.png", seed)
        kept.keep((root / f"synthetic-{seed}.png").read_bytes())
    try:
        yield kept
    finally:
        server.stop()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion in a thread of its own: Playwright's sync API keeps an
    event loop running in the test's thread, where asyncio.run refuses to start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def read_decision(bootstrap: str, post_id: str, timeout: float = 30.0) -> ReviewDecision:
    """The decision keyed `post_id` on the `reviewed` topic (read from the start)."""
    from aiokafka import AIOKafkaConsumer

    async def consume() -> ReviewDecision:
        consumer = AIOKafkaConsumer(
            "reviewed", bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        if record.key == post_id.encode():
                            return ReviewDecision.from_json(record.value)
            raise AssertionError(f"no decision for {post_id} on `reviewed` within {timeout:.0f} s")
        finally:
            await consumer.stop()

    return run_async(consume())


def escalate_behind_the_console(console: Console, post_id: str) -> None:
    """What the console does when alice escalates `post_id`, done in Redis directly: for
    consoles whose Kafka is down (the escalation happened while it was up)."""
    import redis.asyncio as aioredis

    from review.queue import ReviewQueue

    async def escalate() -> None:
        queue = ReviewQueue(aioredis.Redis.from_url(console.redis_url))
        try:
            await queue.ensure_group()
            claim = await queue.claim("alice")
            assert claim is not None and claim.item.post_id == post_id
            await queue.escalate(claim.entry_id, "alice", "d-esc", "check")
            await queue.complete(claim.entry_id, post_id, "alice", "d-esc")
        finally:
            await queue.client.aclose()

    run_async(escalate())


def audit_records(bootstrap: str, subject: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The `audit` topic's records about `subject` (read from the start), each checked against
    the committed schema and the parser."""
    from jsonschema import Draft202012Validator

    from modstream.records import AuditEvent
    from tests.integration.worker_harness import collect

    schema = json.loads((REPO_ROOT / "schemas" / "audit-event.schema.json").read_text())
    records = run_async(
        collect(bootstrap, "audit", lambda r: len(r) >= count, timeout, lambda r: r.get("subject") == subject)
    )
    for record in records:
        assert list(Draft202012Validator(schema).iter_errors(record)) == [], record
        AuditEvent.from_json(record)
    return records


def review_item(
    post_id: str, text: str, image_url: str | None, content_hash: str | None = None, kind: str = "routed"
) -> ReviewItem:
    return ReviewItem(
        post_id=post_id,
        text=text,
        image_url=image_url,
        reasons=["weak_image_text_match", "uncertain_sarcasm"],
        label={
            "v": 1,
            "post_id": post_id,
            "labels": {
                "hate": {"label": "hateful", "score": 0.734, "decision": True, "threshold": 0.52,
                         "probs": {"not_hateful": 0.266, "hateful": 0.734}},
                "sarcasm": {"label": "not_sarcastic", "score": 0.41, "decision": False, "threshold": 0.45,
                            "probs": {"not_sarcastic": 0.59, "sarcastic": 0.41}},
            },
            "itm_match": 0.183,
            "route": "review",
            "reasons": ["weak_image_text_match", "uncertain_sarcasm"],
            "media": {"status": "ok" if image_url else "none", "url": image_url, "content_hash": content_hash,
                      "reason": None},
            "model_version": "v0004",
        },
        tasks={"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]},
        kind=kind,
    )  # fmt: skip


@dataclass
class Console:
    url: str  # http://localhost:PORT (Chromium accepts Secure cookies on localhost)
    port: int
    redis_url: str
    bootstrap: str
    token: str  # root's (admin)
    reviewer_token: str  # alice's
    media: Media
    prefix: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}")

    @property
    def media_url(self) -> str:
        return self.media.url

    def enqueue(
        self,
        text: str,
        *,
        image: str | None = "synthetic-0.png",
        post_id: str | None = None,
        scored: bytes | None = None,
        kind: str = "routed",
    ) -> str:
        """A review item for a post whose image URL is `image` on the media server; the worker
        scored the bytes `scored` (default: the file's bytes), kept in the evidence folder."""
        from stream.redis_store import RedisStore

        post_id = post_id or f"{self.prefix}-{uuid.uuid4().hex[:6]}"
        digest = None
        if image:
            data = scored if scored is not None else (self.media.root / image).read_bytes()
            digest = self.media.keep(data)
        item = review_item(post_id, text, f"{self.media_url}/{image}" if image else None, digest, kind)

        async def put() -> None:
            store = RedisStore(self.redis_url)
            try:
                assert (await store.enqueue_review_many([item]))[0]
            finally:
                await store.close()

        run_async(put())
        return post_id

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        return json_api(self.port, token or self.token, method, path, body, timeout=20)


def _flush_db(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def start_console(
    stack: LocalStack, users_file: tuple[Path, dict[str, str]], media: Media, tmp_path: Path
) -> Iterator[Callable[..., Console]]:
    """Starts `modstream review serve` on a free port against a flushed Redis database."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        *,
        claim_timeout: float = 300,
        max_deliveries: int = 5,
        bootstrap: str | None = None,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> Console:
        (port,) = free_loopback_ports(1)
        redis_url = f"redis://127.0.0.1:{stack.redis_port}/{REDIS_DB}"
        _flush_db(redis_url)
        log = open(tmp_path / f"console-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "review", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--bootstrap", bootstrap or stack.bootstrap, "--redis", redis_url, "--users", str(users_file[0]),
             "--claim-timeout", str(claim_timeout), "--max-deliveries", str(max_deliveries),
             "--evidence", str(media.evidence), "--second-review-rate", "0", *extra_args],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"console exited: {(tmp_path / f'console-{port}.log').read_text()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=1).close()
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("console did not start within 30 s")
        tokens = users_file[1]
        return Console(
            f"http://localhost:{port}", port, redis_url, stack.bootstrap, tokens["root"], tokens["alice"], media
        )

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
