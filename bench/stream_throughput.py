"""End-to-end stream benchmark: posts through real Kafka, media from a loopback server,
the default backbones (MiniLM-L6 + EfficientNet-Lite0) on this machine's CPU.

Ratios are measured within one run of this script, on the same posts:
  (a) worker throughput / the bare model's batched forward (target >= 0.8)
  (b) worker / a naive consumer that fetches and classifies one post at a time, both with
      50 ms of simulated media latency (target >= 3)
  (c) produce-to-label latency p50 / p99 at half the worker's maximum rate
  (d) worker throughput with 50% reposted media / with none (target >= 1.7)
  (e) the worker's peak RSS

    .venv/bin/python bench/stream_throughput.py [--posts 600] [--out var/bench/stream_throughput.json]

Starts its own Kafka + Redis (deploy/local-stack.sh) on free loopback ports and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.card import ModelCard  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.inference import Predictor  # noqa: E402
from models.registry import ModelRegistry, build_model  # noqa: E402
from modstream.manifest import Example, read_manifest  # noqa: E402
from modstream.records import Post, encode  # noqa: E402
from stream.media_server import BackgroundMediaServer  # noqa: E402
from stream.producer import synthetic_posts  # noqa: E402
from trainer.images import load_image  # noqa: E402
from trainer.synthetic import write_synthetic  # noqa: E402

LATENCY_S = 0.05
WARM_POSTS = 200


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Stack:
    def __init__(self, state: Path) -> None:
        self.kafka, self.controller, self.redis = free_ports(3)
        self.env = {
            **os.environ,
            "MODSTREAM_STACK_DIR": str(state),
            "KAFKA_PORT": str(self.kafka),
            "KAFKA_CONTROLLER_PORT": str(self.controller),
            "REDIS_PORT": str(self.redis),
        }

    def __call__(self, command: str) -> None:
        subprocess.run(["bash", str(REPO / "deploy" / "local-stack.sh"), command], env=self.env, check=True)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka}"


async def produce_posts(bootstrap: str, posts: list[Post], rate: float = 0.0) -> dict[str, float]:
    """Sends the posts (stamping created_at at send time); returns each post's send time."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    started = time.time()
    sent: dict[str, float] = {}
    try:
        futures = []
        for i, post in enumerate(posts):
            if rate:
                delay = started + i / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent[post.id] = time.time()
            stamped = Post(post.id, post.text, post.image_urls, created_at=datetime.now(UTC).isoformat())
            futures.append(await producer.send("posts", encode(stamped), key=post.id.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


async def wait_labels(bootstrap: str, prefix: str, n: int, timeout: float) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer("labels", bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.time() + timeout
    try:
        while len(seen) < n and time.time() < deadline:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for m in messages:
                    record = json.loads(m.value)
                    if record["post_id"].startswith(prefix):
                        seen.setdefault(record["post_id"], record)
    finally:
        await consumer.stop()
    return list(seen.values())


def save_default_model(root: Path) -> tuple[Any, Any, ModelRegistry]:
    """The default backbones (untrained heads) saved as `root`'s first version, with a card whose
    ITM block reads as validated, so the card's routing applies as in production. The worker
    benchmarks (this one, bank_worker, feed_throughput) serve it."""
    config = ModelConfig()
    model, tokenizer = build_model(config)
    card = ModelCard(
        config=config, itm={"trained": True, "auroc": 0.9, "routing_lift": {"hate": 1.5}, "threshold": 0.2}
    )
    registry = ModelRegistry(root)
    registry.save(model, tokenizer, card)
    return model, tokenizer, registry


def stamp(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def e2e(stack: Stack, posts: list[Post], prefix: str, rate: float = 0.0) -> dict[str, Any]:
    async def run() -> tuple[dict[str, float], list[dict[str, Any]]]:
        waiter = asyncio.create_task(wait_labels(stack.bootstrap, prefix, len(posts), timeout=900))
        sent = await produce_posts(stack.bootstrap, posts, rate)
        return sent, await waiter

    sent, labels = asyncio.run(run())
    started = min(sent.values())
    if len(labels) < len(posts):
        raise RuntimeError(f"only {len(labels)}/{len(posts)} labels arrived")
    done = max(stamp(r["labelled_at"]) for r in labels)
    latency = [stamp(r["labelled_at"]) - sent[r["post_id"]] for r in labels]
    return {
        "posts": len(posts),
        "seconds": done - started,
        "posts_per_s": len(posts) / (done - started),
        "dedupe_hits": sum(r["dedupe_hit"] for r in labels),
        "latency_p50_s": float(np.percentile(latency, 50)) if latency else None,
        "latency_p99_s": float(np.percentile(latency, 99)) if latency else None,
    }


def naive_consumer(stack: Stack, posts: list[Post], predictor: Predictor) -> dict[str, Any]:
    """One post at a time: poll, fetch, decode, classify, produce, commit."""
    import aiohttp
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from trainer.images import decode_image

    async def run() -> float:
        await produce_posts(stack.bootstrap, posts)
        consumer = AIOKafkaConsumer(
            "posts", bootstrap_servers=stack.bootstrap, group_id=f"naive-{time.time()}", auto_offset_reset="earliest",
            enable_auto_commit=False, max_poll_records=1,
        )  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        await consumer.start()
        await producer.start()
        wanted = {p.id for p in posts}
        started = None
        try:
            async with aiohttp.ClientSession() as session:
                while wanted:
                    message = await consumer.getone()
                    post = Post.from_json(message.value)
                    if post.id not in wanted:
                        await consumer.commit()
                        continue
                    started = started or time.time()
                    image = None
                    if post.image_url:
                        async with session.get(post.image_url) as resp:
                            image = decode_image(await resp.read())
                    prediction = predictor.predict([post.text], [image])[0]
                    await producer.send_and_wait("naive-labels", json.dumps(prediction.to_dict()).encode())
                    await consumer.commit()
                    wanted.discard(post.id)
        finally:
            await consumer.stop()
            await producer.stop()
        assert started is not None
        return time.time() - started

    seconds = asyncio.run(run())
    return {"posts": len(posts), "seconds": seconds, "posts_per_s": len(posts) / seconds}


def bare_model(predictor: Predictor, examples: list[Example], n: int, batch: int = 8) -> dict[str, Any]:
    texts = [e.text for e in examples][:n]
    images = [load_image(e.image) if e.image else None for e in examples][:n]
    predictor.predict(texts[:batch], images[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(0, n, batch):
        predictor.predict(texts[i : i + batch], images[i : i + batch])
    seconds = time.perf_counter() - started
    return {"posts": n, "seconds": seconds, "posts_per_s": n / seconds, "batch": batch}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=600)
    parser.add_argument("--naive-posts", type=int, default=150)
    parser.add_argument("--out", default="var/bench/stream_throughput.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="modstream-bench-"))
    stack = Stack(tmp / "stack")
    stack("start")
    worker = None
    try:
        model, tokenizer, registry = save_default_model(tmp / "registry")
        predictor = Predictor(model.eval(), tokenizer, registry.card())
        media_dir = tmp / "media"
        examples = read_manifest(
            write_synthetic(media_dir, n=4 * args.posts + WARM_POSTS + args.naive_posts, seed=21, image_size=256)
        )
        media = BackgroundMediaServer(media_dir / "images")
        server = media.server

        def posts(tag: str, n: int, offset: int, repost: float = 0.0) -> list[Post]:
            chunk = examples[offset : offset + n]
            return list(synthetic_posts(chunk, server.url, n, repost_rate=repost, prefix=tag, seed=offset))

        web_port = free_ports(1)[0]
        worker = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "worker", "--bootstrap", stack.bootstrap,
             "--redis", f"redis://127.0.0.1:{stack.redis}/0", "--registry", str(tmp / "registry"),
             "--web-port", str(web_port), "--allow-loopback-media", "--app-id", "bench", "--device", "cpu",
             "--max-batch", "64"],
            cwd=REPO, stdout=(tmp / "worker.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/ready", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or worker.poll() is not None:
                    raise RuntimeError("worker did not start; see " + str(tmp / "worker.log")) from None
                time.sleep(0.5)

        n = args.posts
        results: dict[str, Any] = {}
        # Every measurement gets posts of its own, so the dedupe cache only helps where meant to.
        e2e(stack, posts("warm-", WARM_POSTS, 4 * n), "warm-")  # first batches pay lazy initialisation
        results["bare_model"] = bare_model(predictor, examples[:n], n)
        results["worker"] = e2e(stack, posts("w0-", n, 0), "w0-")
        results["worker_repost50"] = e2e(stack, posts("w50-", n, n, repost=0.5), "w50-")
        server.latency_s = LATENCY_S
        results["worker_latency50ms"] = e2e(stack, posts("wl-", n, 2 * n), "wl-")
        server.latency_s = 0.0
        half = results["worker"]["posts_per_s"] / 2
        results["worker_half_rate"] = e2e(stack, posts("wh-", n // 2, 3 * n), "wh-", rate=half)
        results["worker_peak_rss_mib"] = peak_rss_mib(worker.pid)
        server.latency_s = LATENCY_S
        results["naive_latency50ms"] = naive_consumer(
            stack, posts("nv-", args.naive_posts, 4 * n + WARM_POSTS), predictor
        )
        server.latency_s = 0.0
        ratios = {
            "worker_vs_bare_model": results["worker"]["posts_per_s"] / results["bare_model"]["posts_per_s"],
            "worker_vs_naive_50ms": results["worker_latency50ms"]["posts_per_s"]
            / results["naive_latency50ms"]["posts_per_s"],
            "repost50_gain": results["worker_repost50"]["posts_per_s"] / results["worker"]["posts_per_s"],
        }
        out = {
            "benchmark": "stream_throughput",
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "results": results,
            "ratios": ratios,
        }
        print(f"{'measurement':<34} {'posts/s':>9} {'posts':>6}")
        for key in ("bare_model", "worker", "worker_repost50", "worker_latency50ms", "naive_latency50ms"):
            print(f"{key:<34} {results[key]['posts_per_s']:>9.1f} {results[key]['posts']:>6}")
        h = results["worker_half_rate"]
        print(
            f"latency at {half:.1f} posts/s: p50 {h['latency_p50_s'] * 1000:.0f} ms, "
            f"p99 {h['latency_p99_s'] * 1000:.0f} ms"
        )
        print(f"worker peak RSS: {results['worker_peak_rss_mib']:.0f} MiB")
        for key, value in ratios.items():
            print(f"{key:<34} {value:>9.2f}x")
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"written: {path}")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        stack("stop")


if __name__ == "__main__":
    main()
