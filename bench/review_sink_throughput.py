"""Review sink throughput: review items per second from a Kafka topic into the Redis stream.

For each batch size (`--max-records`), N review items (about 1 KiB each, like the worker's)
are produced to a fresh topic with 4 partitions, then `modstream review-sink` is started as
a real process on it and timed until XLEN has grown by N. Catch-up rate is N over the time
between the first and the last stream entry (Redis entry ids are millisecond timestamps),
so process start and group join are left out; the wall time with them is shown as well.
The last row is the floor the sink sits on: the same idempotent script calls made directly
(`RedisStore.enqueue_review_many` in batches of 500, no Kafka).

    .venv/bin/python bench/review_sink_throughput.py [--items 20000] [--batches 100,500,2000]
        [--bootstrap HOST:PORT --redis-port PORT]   # reuse a running stack (else one is started)
        [--out var/bench/review_sink_throughput.json]

Items carry run-unique post ids and go to run-unique topics, so a reused stack's data is
never touched (the stream `modstream:review` of Redis db `--redis-db` grows by the items).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modstream.records import ReviewItem, encode  # noqa: E402
from stream.redis_store import RedisStore  # noqa: E402
from tests.integration.stack import LocalStack, free_loopback_ports  # noqa: E402

STREAM = "modstream:review"


def review_items(prefix: str, n: int) -> list[ReviewItem]:
    """`n` review items like the worker's (about 1 KiB), post ids `<prefix>-<i>`."""
    label = {
        "v": 1,
        "post_id": "",
        "labels": {
            "hate": {"label": "hateful", "score": 0.5731, "decision": True, "threshold": 0.5},
            "sarcasm": {"label": "not_sarcastic", "score": 0.2213, "decision": False, "threshold": 0.5},
        },
        "itm_match": 0.0931,
        "route": "review",
        "reasons": ["itm_low"],
        "media": {"status": "ok", "url": "https://cdn.example.com/img/0000.png", "content_hash": "ab" * 32},
        "model_version": "v0001",
        "timings": {"fetch_s": 0.0123, "classify_s": 0.0456},
    }
    items = []
    for i in range(n):
        post_id = f"{prefix}-{i:07d}"
        items.append(
            ReviewItem(
                post_id,
                f"post {i}: a caption of about the length memes have, with a few words more " * 2,
                f"https://cdn.example.com/img/{i:07d}.png",
                ["itm_low"],
                {**label, "post_id": post_id},
                {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]},
            )
        )
    return items


async def produce(bootstrap: str, topic: str, items: list[ReviewItem]) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=encode(item), key=item.post_id.encode()) for item in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def time_sink(bootstrap: str, redis_port: int, db: int, run: str, n: int, max_records: int, logs: Path) -> dict:
    import redis

    topic = f"bench-review-{run}-{max_records}"
    items = review_items(f"bench-{run}-{max_records}", n)
    asyncio.run(produce(bootstrap, topic, items))
    client = redis.Redis(port=redis_port, db=db)
    before = client.xlen(STREAM)
    last_before = client.xrevrange(STREAM, count=1)
    floor_id = last_before[0][0] if last_before else b"0-0"
    cmd = [sys.executable, "-m", "modstream.cli", "review-sink", "--bootstrap", bootstrap, "--topic", topic,
           "--group", f"bench-{run}-{max_records}", "--redis", f"redis://127.0.0.1:{redis_port}/{db}",
           "--max-records", str(max_records), "--metrics-port", str(free_loopback_ports(1)[0])]  # fmt: skip
    log = (logs / f"sink-{max_records}.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + max(120, n / 200)
        while client.xlen(STREAM) < before + n:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sink stopped or stalled at {client.xlen(STREAM) - before}/{n}; see {log.name}")
            time.sleep(0.05)
        wall = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    first = client.xrange(STREAM, min=f"({floor_id.decode()}", count=1)[0][0]
    last = client.xrevrange(STREAM, count=1)[0][0]
    span = max(1, entry_ms(last) - entry_ms(first)) / 1000
    client.close()
    return {"max_records": max_records, "items": n, "seconds": span, "items_per_s": n / span, "wall_s": wall}


async def direct_floor(redis_port: int, db: int, run: str, n: int, batch: int = 500) -> dict:
    store = RedisStore(f"redis://127.0.0.1:{redis_port}/{db}")
    items = review_items(f"bench-{run}-direct", n)
    started = time.perf_counter()
    try:
        for i in range(0, n, batch):
            await store.enqueue_review_many(items[i : i + batch])
    finally:
        await store.close()
    seconds = time.perf_counter() - started
    return {"max_records": batch, "items": n, "seconds": seconds, "items_per_s": n / seconds, "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batches", default="100,500,2000", help="--max-records values to time")
    parser.add_argument("--bootstrap", help="reuse this running broker (with --redis-port)")
    parser.add_argument("--redis-port", type=int)
    parser.add_argument("--redis-db", type=int, default=0)
    parser.add_argument("--out", default="var/bench/review_sink_throughput.json")
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory(prefix="review-sink-bench-") as tmp:
        stack = None
        if args.bootstrap:
            if not args.redis_port:
                parser.error("--bootstrap needs --redis-port")
            bootstrap, redis_port = args.bootstrap, args.redis_port
        else:
            stack = LocalStack.with_free_ports(Path(tmp) / "stack")
            print(f"starting Kafka + Redis on {stack.bootstrap} / {stack.redis_port} ...", flush=True)
            stack.start()
            bootstrap, redis_port = stack.bootstrap, stack.redis_port
        try:
            rows = []
            for max_records in batches:
                rows.append(time_sink(bootstrap, redis_port, args.redis_db, run, args.items, max_records, Path(tmp)))
                print(f"  --max-records {max_records}: {rows[-1]['items_per_s']:.0f} items/s", flush=True)
            floor = asyncio.run(direct_floor(redis_port, args.redis_db, run, args.items))
        finally:
            if stack is not None:
                stack.shutdown()

    print(f"\n{'what':<34} {'items':>7} {'seconds':>8} {'items/s':>9} {'wall s':>7}")
    for row in rows:
        name = f"review-sink --max-records {row['max_records']}"
        print(f"{name:<34} {row['items']:>7} {row['seconds']:>8.2f} {row['items_per_s']:>9.0f} {row['wall_s']:>7.1f}")
    name = "Redis script only (batch 500)"
    print(
        f"{name:<34} {floor['items']:>7} {floor['seconds']:>8.2f} {floor['items_per_s']:>9.0f} {floor['wall_s']:>7.1f}"
    )
    out: dict[str, Any] = {
        "benchmark": "review_sink_throughput",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "item_bytes": len(encode(review_items(f"bench-{run}", 1)[0])),
        "sink": rows,
        "redis_script_only": floor,
    }
    path = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
