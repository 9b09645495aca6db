"""Review console JSON API throughput: decisions per second with K concurrent scripted reviewers.

Each reviewer loops: POST /api/v1/claim, then POST /api/v1/items/{id}/decision (confirm every
task). Every decision is produced to Kafka (acks=all, awaited) before its Redis entry is
acked, so this measures the whole decision path: HTTP, bearer auth, XREADGROUP/XPENDING,
the Kafka round trip and the XACK transaction. The run checks that every item was decided
exactly once, on the API and on the `reviewed` topic.

    .venv/bin/python bench/review_api_throughput.py [--items 400] [--reviewers 1,4,16]
        [--out var/bench/review_api_throughput.json]

Starts its own Kafka + Redis (deploy/local-stack.sh, free loopback ports) and a console
subprocess (`python -m modstream.cli review serve`), and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from modstream.records import ReviewItem  # noqa: E402
from review.auth import UserStore  # noqa: E402
from stream.redis_store import RedisStore  # noqa: E402
from tests.integration.stack import LocalStack, free_loopback_ports  # noqa: E402


def item(post_id: str) -> ReviewItem:
    return ReviewItem(
        post_id=post_id,
        text=f"bench post {post_id}",
        image_url=None,
        reasons=["weak_image_text_match"],
        label={
            "post_id": post_id,
            "labels": {
                "hate": {"label": "not_hateful", "score": 0.3, "decision": False, "threshold": 0.5},
                "sarcasm": {"label": "sarcastic", "score": 0.6, "decision": True, "threshold": 0.45},
            },
            "itm_match": 0.1,
            "media": {"status": "none"},
            "model_version": "v0001",
        },
        tasks={"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]},
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def enqueue(redis_url: str, post_ids: list[str]) -> None:
    store = RedisStore(redis_url)
    try:
        for post_id in post_ids:
            assert (await store.enqueue_review_many([item(post_id)]))[0]
    finally:
        await store.close()


async def reviewers(base: str, tokens: list[str]) -> dict[str, Any]:
    claim_s: list[float] = []
    decide_s: list[float] = []
    decided: list[str] = []
    errors: list[str] = []
    body = {"decisions": {"hate": {"action": "confirm"}, "sarcasm": {"action": "confirm"}}}

    async def one(session: aiohttp.ClientSession, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        while True:
            t0 = time.perf_counter()
            async with session.post(f"{base}/api/v1/claim", headers=headers) as resp:
                claim = await resp.json()
            claim_s.append(time.perf_counter() - t0)
            if resp.status != 200:
                errors.append(f"claim {resp.status}: {claim}")
                return
            if claim.get("item") is None:
                return
            t1 = time.perf_counter()
            url = f"{base}/api/v1/items/{claim['entry_id']}/decision"
            async with session.post(url, json=body, headers=headers) as resp:
                answer = await resp.json()
            decide_s.append(time.perf_counter() - t1)
            if resp.status != 201:
                errors.append(f"decision {resp.status}: {answer}")
                return
            decided.append(claim["item"]["post_id"])

    connector = aiohttp.TCPConnector(limit=len(tokens) * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, t) for t in tokens))
        elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "decided": decided, "errors": errors, "claim_s": claim_s, "decide_s": decide_s}


async def count_on_topic(bootstrap: str, prefix: str, want: int, timeout: float = 60.0) -> dict[str, int]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer("reviewed", bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    seen: dict[str, int] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(seen) < want:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    key = (record.key or b"").decode()
                    if key.startswith(prefix):
                        seen[key] = seen.get(key, 0) + 1
    finally:
        await consumer.stop()
    return seen


def start_console(stack: LocalStack, users: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_loopback_ports(1)
    cmd = [
        sys.executable, "-m", "modstream.cli", "review", "serve", "--port", str(port),
        "--bootstrap", stack.bootstrap, "--redis", stack.redis_url, "--users", str(users),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"console exited:\n{log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("console did not start within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400, help="items queued per round")
    parser.add_argument("--reviewers", default="1,4,16", help="concurrent reviewers per round, comma-separated")
    parser.add_argument("--out", default="var/bench/review_api_throughput.json")
    args = parser.parse_args()
    rounds = [int(k) for k in args.reviewers.split(",")]

    with tempfile.TemporaryDirectory(prefix="review-bench-") as tmp:
        tmpdir = Path(tmp)
        stack = LocalStack.with_free_ports(tmpdir / "stack")
        users = UserStore(tmpdir / "users.json")
        tokens = []
        for i in range(max(rounds)):
            users.add(f"bench{i:02d}", "reviewer", "bench password 0123")
            tokens.append(users.issue_token(f"bench{i:02d}"))
        print("starting Kafka + Redis ...", file=sys.stderr)
        stack.start()
        proc = None
        try:
            proc, base = start_console(stack, users.path, tmpdir / "console.log")
            results = []
            # A short warm-up: the producer connects on the first decision.
            warm = f"warm-{uuid.uuid4().hex[:6]}-"
            asyncio.run(enqueue(stack.redis_url, [f"{warm}{i}" for i in range(20)]))
            asyncio.run(reviewers(base, tokens[:2]))
            for k in rounds:
                prefix = f"bench-{uuid.uuid4().hex[:6]}-"
                post_ids = [f"{prefix}{i:05d}" for i in range(args.items)]
                asyncio.run(enqueue(stack.redis_url, post_ids))
                run = asyncio.run(reviewers(base, tokens[:k]))
                on_topic = asyncio.run(count_on_topic(stack.bootstrap, prefix, len(post_ids)))
                decided = run["decided"]
                ok = (
                    not run["errors"]
                    and sorted(decided) == post_ids
                    and sorted(on_topic) == post_ids
                    and set(on_topic.values()) == {1}
                )
                results.append(
                    {
                        "reviewers": k,
                        "items": len(post_ids),
                        "decided": len(decided),
                        "elapsed_s": round(run["elapsed_s"], 3),
                        "decisions_per_s": round(len(decided) / run["elapsed_s"], 1),
                        "claim_p50_ms": round(1000 * statistics.median(run["claim_s"]), 2),
                        "claim_p99_ms": round(1000 * pct(run["claim_s"], 0.99), 2),
                        "decide_p50_ms": round(1000 * statistics.median(run["decide_s"]), 2),
                        "decide_p99_ms": round(1000 * pct(run["decide_s"], 0.99), 2),
                        "exactly_once": ok,
                        "errors": run["errors"][:5],
                    }
                )
                print(f"  {k:>3} reviewers: {results[-1]['decisions_per_s']} decisions/s", file=sys.stderr)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
            stack.shutdown()

    print(f"{'reviewers':>9} {'items':>6} {'dec/s':>8} {'claim p50':>10} {'p99':>8} {'decide p50':>11} {'p99':>8}  ok")
    for r in results:
        print(
            f"{r['reviewers']:>9} {r['items']:>6} {r['decisions_per_s']:>8} {r['claim_p50_ms']:>8}ms "
            f"{r['claim_p99_ms']:>6}ms {r['decide_p50_ms']:>9}ms {r['decide_p99_ms']:>6}ms  {r['exactly_once']}"
        )
    out = {
        "benchmark": "review_api_throughput",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "note": "console, Kafka, Redis and the scripted reviewers share this machine",
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written: {path}", file=sys.stderr)
    if not all(r["exactly_once"] for r in results):
        raise SystemExit("some items were not decided exactly once (see errors)")


if __name__ == "__main__":
    main()
