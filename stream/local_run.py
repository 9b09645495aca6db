"""`modstream run` (what `make run` does): the whole pipeline on one machine.

Starts the local Kafka + Redis stack (deploy/local-stack.sh), makes sure a default model
is registered (trained on synthetic posts the first time), serves synthetic media from a
loopback server, produces sample posts, runs a worker, shows live progress from the
worker's /metrics and ends with a summary. The worker and the stack are stopped at the end
(`--keep-stack` leaves Kafka and Redis running).

`--review` (what `make review` does) then keeps everything up, media server included, and
serves the review console on the run's stack with a demo admin whose password is printed
once, so the items the run routed can be decided in a browser, images shown; Ctrl-C (or
SIGTERM) stops it all.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from models.registry import ModelRegistry
from modstream.manifest import read_manifest
from stream.demo import ensure_default_model
from stream.media_server import BackgroundMediaServer
from stream.producer import encode_posts, produce, synthetic_posts
from trainer.synthetic import write_synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
STACK = REPO_ROOT / "deploy" / "local-stack.sh"


@dataclass
class RunOptions:
    posts: int = 500
    bootstrap_port: int = 19092
    redis_port: int = 16379
    web_port: int = 6066
    repost_rate: float = 0.2
    mismatch_share: float = 0.1
    keep_stack: bool = False
    timeout_s: float = 600.0
    review: bool = False  # then serve the console on the run's stack until interrupted
    review_port: int = 8080
    exporter_port: int = 6070
    sink_port: int = 6067


def _stack(command: str, opts: RunOptions) -> None:
    env = {**os.environ, "KAFKA_PORT": str(opts.bootstrap_port), "REDIS_PORT": str(opts.redis_port)}
    subprocess.run(["bash", str(STACK), command], check=True, env=env)


def _counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for outcome, value in re.findall(r'^modstream_posts_total\{outcome="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
        out[outcome] = float(value)
    hits = re.search(r"^modstream_dedupe_hits_total ([0-9.e+]+)$", text, re.M)
    out["dedupe_hits"] = float(hits.group(1)) if hits else 0.0
    for reason, value in re.findall(r'^modstream_review_routed_total\{reason="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
        out[f"reason:{reason}"] = float(value)
    return out


def _scrape(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return _counts(resp.read().decode())
    except OSError:
        return None


def run_local(registry_root: Path, cache: Path, home: Path, opts: RunOptions) -> int:
    print("starting the local stack (Kafka 4, Redis) ...", file=sys.stderr)
    _stack("start", opts)
    worker: subprocess.Popen[bytes] | None = None
    sink: subprocess.Popen[bytes] | None = None
    exporter: subprocess.Popen[bytes] | None = None
    console: subprocess.Popen[bytes] | None = None
    try:
        registry = ModelRegistry(registry_root)
        version = ensure_default_model(registry, cache, home)
        examples = read_manifest(write_synthetic(home / "firehose", n=400, seed=7, mismatch_rate=opts.mismatch_share))
        server = BackgroundMediaServer(home / "firehose" / "images")
        log_path = home / "worker.log"
        print(f"starting a worker (model {version}); its log: {log_path}", file=sys.stderr)
        worker = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "worker", "--registry", str(registry_root),
             "--bootstrap", f"127.0.0.1:{opts.bootstrap_port}", "--redis", f"redis://127.0.0.1:{opts.redis_port}/0",
             "--web-port", str(opts.web_port), "--allow-loopback-media", "--evidence", str(home / "evidence"),
             # The demo's queue holds what routing chose; blind audit items (a production
             # default of 1%) would mix in items without the model's view.
             "--audit-rate", "0",
             "--app-id", "modstream-run"],
            cwd=REPO_ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        # The review sink copies the `review` topic into the Redis stream reviewers claim from.
        sink = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "review-sink",
             "--bootstrap", f"127.0.0.1:{opts.bootstrap_port}", "--redis", f"redis://127.0.0.1:{opts.redis_port}/0",
             "--metrics-port", str(opts.sink_port)],
            cwd=REPO_ROOT, stdout=(home / "review-sink.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        # Both groups' lag from outside the consumers (deploy/prometheus/prometheus.yml scrapes :6070).
        exporter = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "lag-exporter", "--bootstrap", f"127.0.0.1:{opts.bootstrap_port}",
             "--group", "modstream-run=posts", "--group", "modstream-review-sink=review",
             "--metrics-port", str(opts.exporter_port)],
            cwd=REPO_ROOT, stdout=(home / "lag-exporter.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        before = _wait_for_metrics(opts.web_port, worker)
        prefix = f"run{int(time.time())}"
        posts = synthetic_posts(examples, server.url, opts.posts, repost_rate=opts.repost_rate, prefix=prefix)
        started = time.perf_counter()
        asyncio.run(produce(f"127.0.0.1:{opts.bootstrap_port}", "posts", encode_posts(posts)))
        print(f"produced {opts.posts} posts", file=sys.stderr)
        final = _follow(opts, worker, before, started)
        _summary(final, before, opts.posts, time.perf_counter() - started)
        _review_queue_summary(opts, int(final.get("review", 0) - before.get("review", 0)))
        ok = _done(final, before) >= opts.posts
        if opts.review:
            console = _serve_review(opts, home)
            _wait_until_interrupted(console)
        return 0 if ok else 1
    finally:
        for process in (console, worker, sink, exporter):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        if not opts.keep_stack:
            _stack("stop", opts)


def _wait_for_metrics(port: int, worker: subprocess.Popen[bytes], timeout: float = 180) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}; see var/worker.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
                if resp.status == 200:
                    return _scrape(port) or {}
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the worker did not become ready")


def _done(now: dict[str, float], before: dict[str, float]) -> int:
    keys = ("auto", "review", "bank_match", "dead_letter")
    return int(sum(now.get(k, 0) - before.get(k, 0) for k in keys))


def _follow(
    opts: RunOptions, worker: subprocess.Popen[bytes], before: dict[str, float], started: float
) -> dict[str, float]:
    deadline = time.monotonic() + opts.timeout_s
    now = before
    while time.monotonic() < deadline and worker.poll() is None:
        now = _scrape(opts.web_port) or now
        done = _done(now, before)
        elapsed = time.perf_counter() - started
        review = now.get("review", 0) - before.get("review", 0)
        dead = now.get("dead_letter", 0) - before.get("dead_letter", 0)
        print(
            f"\r{done:>6}/{opts.posts} labelled  {done / max(elapsed, 1e-9):6.1f} posts/s  "
            f"review {100 * review / max(done, 1):5.1f}%  DLQ {int(dead)}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if done >= opts.posts:
            break
        time.sleep(0.5)
    print(file=sys.stderr)
    return now


def _summary(now: dict[str, float], before: dict[str, float], total: int, seconds: float) -> None:
    def delta(key: str) -> int:
        return int(now.get(key, 0) - before.get(key, 0))

    done = _done(now, before)
    print(f"\nsummary: {done}/{total} posts labelled in {seconds:.1f} s ({done / seconds:.1f} posts/s)")
    print(f"  auto: {delta('auto')}   review: {delta('review')}   dead-lettered: {delta('dead_letter')}")
    reasons = sorted((k.removeprefix("reason:"), delta(k)) for k in now if k.startswith("reason:") and delta(k))
    if reasons:
        print("  routed to review because: " + ", ".join(f"{reason} {count}" for reason, count in reasons))
    print(f"  dedupe hits (reposted media + text): {delta('dedupe_hits')}")
    print("  labels are on the 'labels' topic; review items on 'review' and in the Redis stream modstream:review")


DEMO_REVIEWER = "demo"


def _serve_review(opts: RunOptions, home: Path) -> subprocess.Popen[bytes]:
    """The console on the run's Redis and Kafka, with a fresh demo admin (a new random password
    each run, printed once; the users file lives under the run's home), showing the images the
    worker scored from the run's evidence folder."""
    users = home / "run-review-users.json"
    users.unlink(missing_ok=True)
    password = secrets.token_urlsafe(12)
    subprocess.run(
        [sys.executable, "-m", "modstream", "review", "add-user", DEMO_REVIEWER, "--role", "admin",
         "--password-stdin", "--users", str(users), "--bootstrap", f"127.0.0.1:{opts.bootstrap_port}"],
        input=password + "\n", text=True, check=True, cwd=REPO_ROOT, capture_output=True,
    )  # fmt: skip
    console = subprocess.Popen(
        [sys.executable, "-m", "modstream", "review", "serve", "--port", str(opts.review_port),
         "--users", str(users), "--bootstrap", f"127.0.0.1:{opts.bootstrap_port}",
         "--redis", f"redis://127.0.0.1:{opts.redis_port}/0", "--evidence", str(home / "evidence")],
        cwd=REPO_ROOT, stdout=(home / "review-console.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if console.poll() is not None:
            raise RuntimeError(f"the review console exited with {console.returncode}; see {home}/review-console.log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{opts.review_port}/login", timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    print(
        f"\nreview console: http://localhost:{opts.review_port}/review  user {DEMO_REVIEWER}  password {password}"
        "  (printed once; a new one each run)\n"
        "decide the items routed above there; Ctrl-C stops the console, the worker and the stack",
        flush=True,
    )
    return console


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_until_interrupted(console: subprocess.Popen[bytes]) -> None:
    """Until Ctrl-C, SIGTERM or the console's exit; the caller's `finally` stops everything."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while console.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _review_queue_summary(opts: RunOptions, routed: int, timeout_s: float = 30.0) -> None:
    """Waits briefly for the review sink to copy this run's review items into Redis."""
    import redis

    client = redis.Redis(port=opts.redis_port, socket_timeout=2)
    try:
        deadline = time.monotonic() + timeout_s
        length = 0
        while time.monotonic() < deadline:
            length = int(client.xlen("modstream:review"))
            if length >= routed:
                break
            time.sleep(0.5)
        print(
            f"  review queue (Redis stream modstream:review): {length} items; decide them in a browser: "
            "`make review` (this run again, then the console with a demo reviewer, images shown)"
        )
    except redis.RedisError as exc:
        print(f"  review queue: Redis unavailable ({exc})")
    finally:
        client.close()
