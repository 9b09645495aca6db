"""What does SASL_SSL cost the stream? Items per second of the worker and both sinks on a
secured broker (SASL_SSL, SCRAM-SHA-512, an ACL per role) over the same on plaintext
(issue 19: goal >= 0.9x).

Two stacks are started in the same run (deploy/local-stack.sh: one plain, one with
MODSTREAM_STACK_SECURE=1), and each component is measured on them in turn: plain, secure,
plain, secure, ... (`--pairs`); the ratio is mean SASL_SSL / mean plaintext, with each pair's
own ratio beside it. Every process runs as its role's principal on the secured stack
(the stack's role_env) and the bench's own clients as its admin; consumer groups carry each
role's ACL prefix and the topics are the real ones (`review`, `reviewed`, `posts`, `labels`).
Each measurement has a fresh consumer group committed to the end of its topic, run-unique
ids and Redis db 0 flushed (a secured stack's ACL users may not SELECT another), so what
earlier measurements left on a topic or in Redis is never read.

- review sink: `--items` review items (about 1 KiB) on `review`, then `modstream review-sink`
  started; rate = items over the span between the first and last Redis stream entry ids;
- dataset sink: `--decisions` text-only decisions on `reviewed`, then `modstream dataset-sink`
  started; rate = lines written after the first batch over the time from the first batch on
  disk to the last (the manifest polled every 10 ms);
- worker: `modstream worker` (tiny random model, CPU, media from a loopback server) takes a
  warm-up batch, then `--posts` posts at once; rate = labels over the span between the first
  and last `labels` record of the batch (Kafka record timestamps).

    .venv/bin/python bench/secure_transport.py [--items 20000] [--decisions 30000] [--posts 2000]
        [--pairs 3] [--out var/bench/secure_transport.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.review_sink_throughput import review_items  # noqa: E402
from modstream.manifest import read_manifest  # noqa: E402
from modstream.records import ReviewDecision, TaskDecision, encode  # noqa: E402
from stream.media_server import BackgroundMediaServer  # noqa: E402
from stream.producer import synthetic_posts  # noqa: E402
from tests.integration.sink_harness import SinkProcess  # noqa: E402
from tests.integration.sink_harness import commit_to_end as harness_commit_to_end  # noqa: E402
from tests.integration.stack import LocalStack  # noqa: E402
from tests.integration.worker_harness import Worker, produce, register_tiny_model  # noqa: E402
from trainer.synthetic import write_synthetic  # noqa: E402

STREAM = "modstream:review"
WARM_POSTS = 64
COMPONENTS = ("review sink", "dataset sink", "worker")


def decisions(prefix: str, n: int) -> list[ReviewDecision]:
    return [
        ReviewDecision(
            decision_id=f"{prefix}-d{i:07d}",
            post_id=f"{prefix}-p{i:07d}",
            reviewer="bench",
            decisions={
                "hate": TaskDecision("correct", "not_hateful"),
                "sarcasm": TaskDecision("confirm", "not_sarcastic"),
            },
            model_version="v0001",
            model_labels={"hate": {"label": "hateful", "score": 0.71, "decision": True, "threshold": 0.5}},
            text=f"post {i}: a caption of about the length memes have, with a few words more " * 2,
            reasons=["itm_low"],
            decided_at=f"2026-12-01T08:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
        )
        for i in range(n)
    ]


def commit_to_end(stack: LocalStack, group: str, topic: str) -> None:
    asyncio.run(harness_commit_to_end(stack.bootstrap, group, topic, **stack.client_options()))


def _produce(stack: LocalStack, topic: str, values: list[bytes], keys: list[bytes]) -> None:
    asyncio.run(produce(stack.bootstrap, topic, values, keys, **stack.client_options(), max_batch_size=256 * 1024))


def _wait(what: str, done: Callable[[], bool], proc: Any, timeout: float, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if not proc.alive or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: stopped or stalled\n{tail()}")
        time.sleep(0.01)


class Bench:
    def __init__(self, stacks: dict[str, LocalStack], tmp: Path, args: argparse.Namespace) -> None:
        self.stacks, self.tmp, self.args = stacks, tmp, args
        self.run = uuid.uuid4().hex[:6]
        self.count = 0
        self.registry = tmp / "registry"
        register_tiny_model(self.registry)
        examples = read_manifest(write_synthetic(tmp / "media", n=120, seed=3, image_size=32))
        self.media = BackgroundMediaServer(tmp / "media" / "images")
        self.examples = examples

    def close(self) -> None:
        self.media.stop()

    def _fresh(self, which: str) -> tuple[str, Any, Path]:
        """A tag, an operator's Redis client on the stack's db 0 (flushed), a log folder."""
        import redis

        self.count += 1
        tag = f"{self.run}-{self.count}"
        logs = self.tmp / "logs" / f"{self.count}-{which}"
        logs.mkdir(parents=True)
        client = redis.Redis.from_url(self.stacks[which].redis_url_for("admin"))
        client.flushdb()
        return tag, client, logs

    def review_sink(self, which: str) -> dict[str, Any]:
        stack = self.stacks[which]
        tag, client, logs = self._fresh(which)
        n = self.args.items
        group = f"modstream-review-sink-bench-{tag}"
        commit_to_end(stack, group, "review")
        items = review_items(f"bench-{tag}", n)
        _produce(stack, "review", [encode(i) for i in items], [i.post_id.encode() for i in items])
        sink = SinkProcess(
            "review-sink",
            ["--bootstrap", stack.bootstrap, *stack.redis_flags(stack.redis_url), "--group", group],
            logs, "review-sink", env=stack.role_env("review-sink"),
        )  # fmt: skip
        started = time.perf_counter()
        sink.start()
        try:
            _wait(f"review sink on {which}", lambda: client.xlen(STREAM) >= n, sink, max(120, n / 100), sink.log_tail)
            wall = time.perf_counter() - started
        finally:
            sink.stop()
        first = int(client.xrange(STREAM, count=1)[0][0].split(b"-")[0])
        last = int(client.xrevrange(STREAM, count=1)[0][0].split(b"-")[0])
        got = client.xlen(STREAM)
        client.flushdb()
        client.close()
        span = max(1, last - first) / 1000
        return {"items": got, "seconds": span, "items_per_s": got / span, "wall_s": wall}

    def dataset_sink(self, which: str) -> dict[str, Any]:
        stack = self.stacks[which]
        tag, client, logs = self._fresh(which)
        client.close()
        n = self.args.decisions
        group = f"modstream-dataset-sink-bench-{tag}"
        commit_to_end(stack, group, "reviewed")
        made = decisions(f"bench-{tag}", n)
        _produce(stack, "reviewed", [encode(d) for d in made], [d.post_id.encode() for d in made])
        out = logs / "reviewed"
        manifest = out / "manifest.jsonl"
        sink = SinkProcess(
            "dataset-sink",
            ["--bootstrap", stack.bootstrap, "--topic", "reviewed", "--group", group, "--out", str(out),
             "--evidence", str(logs / "evidence")],
            logs, "dataset-sink", env=stack.role_env("dataset-sink"),
        )  # fmt: skip
        state = {"offset": 0, "lines": 0, "first": 0.0, "first_lines": 0, "last": 0.0}

        def poll() -> bool:
            try:
                with manifest.open("rb") as fh:
                    fh.seek(state["offset"])
                    chunk = fh.read()
            except FileNotFoundError:
                return False
            now = time.perf_counter()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # whole lines only
            state["offset"] += len(complete)
            state["lines"] += complete.count(b"\n")
            if state["lines"] and not state["first"]:
                state["first"], state["first_lines"] = now, state["lines"]
            if state["lines"] >= n:
                state["last"] = now
                return True
            return False

        started = time.perf_counter()
        sink.start()
        try:
            _wait(f"dataset sink on {which}", poll, sink, max(120, n / 50), sink.log_tail)
            wall = time.perf_counter() - started
        finally:
            sink.stop()
        after_first = state["lines"] - state["first_lines"]
        span = max(1e-3, state["last"] - state["first"])
        return {
            "items": state["lines"],
            "first_batch": state["first_lines"],
            "seconds": span,
            "items_per_s": after_first / span,
            "wall_s": wall,
        }

    def worker(self, which: str) -> dict[str, Any]:
        stack = self.stacks[which]
        tag, client, logs = self._fresh(which)  # db 0 flushed: no label comes from the dedupe cache
        client.close()
        app_id = f"modstream-worker-bench-{tag}"
        commit_to_end(stack, app_id, "posts")
        worker = Worker(
            stack, self.registry, logs, app_id=app_id, max_batch=self.args.max_batch,
        )  # fmt: skip
        started = time.perf_counter()
        worker.start()
        try:
            warm = list(synthetic_posts(self.examples, self.media.url, WARM_POSTS, prefix=f"bench-{tag}-warm"))
            _produce(stack, "posts", [encode(p) for p in warm], [p.id.encode() for p in warm])
            self._labels(stack, f"bench-{tag}-warm-", WARM_POSTS, worker)
            prefix = f"bench-{tag}-run"
            posts = list(synthetic_posts(self.examples, self.media.url, self.args.posts, prefix=prefix))
            _produce(stack, "posts", [encode(p) for p in posts], [p.id.encode() for p in posts])
            stamps = self._labels(stack, f"{prefix}-", len(posts), worker)
            wall = time.perf_counter() - started
        finally:
            worker.stop()
        span = max(1, max(stamps) - min(stamps)) / 1000
        return {"items": len(stamps), "seconds": span, "items_per_s": len(stamps) / span, "wall_s": wall}

    def _labels(self, stack: LocalStack, prefix: str, n: int, worker: Worker) -> list[int]:
        """The Kafka timestamps (ms) of the first label of each post of `prefix`."""

        async def read() -> list[int]:
            from aiokafka import AIOKafkaConsumer

            consumer = AIOKafkaConsumer(
                "labels", bootstrap_servers=stack.bootstrap, group_id=None, auto_offset_reset="earliest",
                **stack.client_options(),
            )  # fmt: skip
            await consumer.start()
            seen: dict[str, int] = {}
            deadline = time.monotonic() + max(180, n / 5)
            try:
                while len(seen) < n:
                    if not worker.alive or time.monotonic() > deadline:
                        raise RuntimeError(f"worker: {len(seen)}/{n} labels of {prefix}\n{worker.log_tail()}")
                    for messages in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                        for m in messages:
                            post_id = json.loads(m.value).get("post_id", "")
                            if post_id.startswith(prefix):
                                seen.setdefault(post_id, m.timestamp)
            finally:
                await consumer.stop()
            return list(seen.values())

        return asyncio.run(read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000, help="review items per review-sink measurement")
    parser.add_argument("--decisions", type=int, default=30_000, help="decisions per dataset-sink measurement")
    parser.add_argument("--posts", type=int, default=2000, help="posts per worker measurement (after a warm-up)")
    parser.add_argument("--max-batch", type=int, default=64, help="the worker's --max-batch")
    parser.add_argument("--pairs", type=int, default=3, help="plain/secure pairs per component")
    parser.add_argument("--only", default=",".join(COMPONENTS), help="components to measure")
    parser.add_argument("--out", default="var/bench/secure_transport.json")
    args = parser.parse_args()
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    t0 = time.perf_counter()
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"plain": [], "secure": []} for c in only}

    with tempfile.TemporaryDirectory(prefix="secure-transport-bench-") as tmp_name:
        tmp = Path(tmp_name)
        stacks = {
            "plain": LocalStack.with_free_ports(tmp / "plain-stack"),
            "secure": LocalStack.with_free_ports(tmp / "secure-stack", secure=True),
        }
        started: list[LocalStack] = []
        bench: Bench | None = None
        try:
            for which, stack in stacks.items():
                print(f"starting the {which} stack on {stack.bootstrap} / redis {stack.redis_port} ...", flush=True)
                t = time.perf_counter()
                started.append(stack)
                stack.start()
                print(f"  up in {time.perf_counter() - t:.0f} s", flush=True)
            bench = Bench(stacks, tmp, args)
            measure = {"review sink": bench.review_sink, "dataset sink": bench.dataset_sink, "worker": bench.worker}
            for pair in range(args.pairs):
                for component in only:
                    for which in ("plain", "secure"):
                        row = measure[component](which)
                        rows[component][which].append(row)
                        took = f"{row['items']} in {row['seconds']:.2f} s; wall {row['wall_s']:.1f} s"
                        rate = f"{row['items_per_s']:8.0f} items/s"
                        print(f"  pair {pair + 1} {component:<12} {which:<6}: {rate} ({took})", flush=True)
        finally:
            if bench is not None:
                bench.close()
            errors = []
            for stack in started:
                try:
                    stack.shutdown()
                except Exception as exc:  # stop the other stack too
                    errors.append(exc)
            if errors:
                raise errors[0]

    summary = []
    print(f"\n{'component':<14} {'plaintext items/s':>18} {'SASL_SSL items/s':>17} {'ratio':>7}   per pair")
    for component, by in rows.items():
        plain = statistics.mean(r["items_per_s"] for r in by["plain"])
        secure = statistics.mean(r["items_per_s"] for r in by["secure"])
        pairs = [s["items_per_s"] / p["items_per_s"] for p, s in zip(by["plain"], by["secure"], strict=True)]
        summary.append({"component": component, "plain_items_per_s": plain, "secure_items_per_s": secure,
                        "ratio": secure / plain, "pair_ratios": pairs,
                        "median_pair_ratio": statistics.median(pairs)})  # fmt: skip
        per_pair = ", ".join(f"{r:.2f}" for r in pairs)
        median = f"median {statistics.median(pairs):.2f}"
        print(f"{component:<14} {plain:>18.0f} {secure:>17.0f} {secure / plain:>6.2f}x   {per_pair} ({median})")
    elapsed = time.perf_counter() - t0
    print(f"(goal: ratio >= 0.9x; ratio = mean SASL_SSL / mean plaintext over {args.pairs} pair(s); {elapsed:.0f} s)")
    out: dict[str, Any] = {
        "benchmark": "secure_transport",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": vars(args),
        "seconds": round(elapsed, 1),
        "summary": summary,
        "runs": rows,
    }
    path = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
