"""Verdict banks in the stream worker (issue 20): throughput with the banks on / off (goal >= 0.95x).

With banks on, the worker PDQ-hashes every decoded image on its decode pool (a second hash when the
image has caption bars, stream/banks/variants.py) and looks it up in the in-memory banks before the
model; `--no-banks` does neither. This measures that cost in the worst case, a miss on every post:

- the bank topic holds `--bank-entries` (default 100,000) violating entries with uniformly random
  256-bit PDQ hashes. The distance from any image's hash to a random one is Binomial(256, 1/2):
  about 128 bits (sd 8), <= 31 bits (the match distance) with probability 8e-38 per pair, so
  nothing matches, and every lookup does a miss's full search (checked: the ON worker's
  modstream_bank_matches_total must stay 0);
- every measurement uses posts (and images) of its own, none repeated, so neither the dedupe cache
  nor the banks short-cut anything (checked: no dedupe hits).

Pairs in ABBA order (OFF, ON, then ON, OFF, ...), each worker a fresh `modstream worker` process
with its own consumer group (committed to the end of `posts` before it starts, so it reads only its
own posts): OFF (`--no-banks`) and ON (`--bank-topic <the filled topic>`), each warmed with WARM_POSTS posts,
then `--posts` measured end to end (bench/stream_throughput.py's e2e). Also reported: the time
from process start to /ready of each worker (the ON worker's includes reading the N entries), and
the ON worker's /metrics modstream_bank_entries{bank="violating"} and modstream_bank_loaded, which
must be N and 1.

    .venv/bin/python bench/bank_worker.py [--posts 400] [--pairs 2] [--bank-entries 100000]
        [--out var/bench/bank_worker.json]

Starts its own Kafka + Redis (deploy/local-stack.sh) on free loopback ports and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.stream_throughput import WARM_POSTS, Stack, e2e, free_ports, peak_rss_mib, save_default_model  # noqa: E402
from modstream.manifest import read_manifest  # noqa: E402
from modstream.records import Post  # noqa: E402
from stream.bank_topic import publish  # noqa: E402
from stream.banks.bank import BankEntry, BankUpdate  # noqa: E402
from stream.media_server import BackgroundMediaServer  # noqa: E402
from stream.producer import synthetic_posts  # noqa: E402
from trainer.synthetic import write_synthetic  # noqa: E402

BANK_TOPIC = "bench-bank-updates"
PUBLISH_CHUNK = 10_000


def fill_bank_topic(bootstrap: str, topic: str, n: int, seed: int = 20) -> dict[str, Any]:
    """Creates `topic` (1 partition, compacted like bank-updates) and writes `n` random violating entries."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    rng = random.Random(seed)
    updates = [
        BankUpdate.add(
            BankEntry(
                entry_id=f"bench:{i}",
                bank="violating",
                source="bench",
                content_hash=None,
                pdq=rng.randbytes(32).hex(),
                pdq_quality=100,
                verdicts={"hate": 1, "sarcasm": 0},
            )
        )
        for i in range(n)
    ]

    async def run() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(topic, num_partitions=1, replication_factor=1, topic_configs={"cleanup.policy": "compact"})]
            )
        finally:
            await admin.close()
        for i in range(0, n, PUBLISH_CHUNK):
            await publish(bootstrap, updates[i : i + PUBLISH_CHUNK], topic, timeout_s=300)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            return (await consumer.end_offsets([tp]))[tp]
        finally:
            await consumer.stop()

    started = time.perf_counter()
    records = asyncio.run(run())
    if records != n:
        raise RuntimeError(f"the bank topic holds {records} records, not {n}")
    return {"entries": n, "topic": topic, "publish_s": time.perf_counter() - started}


def commit_to_end(bootstrap: str, group: str, topic: str = "posts") -> None:
    """Commits `group`'s offsets to the end of every partition of `topic`, so a worker of that group
    starts after every post already there (earlier measurements' posts)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            for _ in range(50):  # as stream/bank_topic.py: aiokafka has no public metadata refresh
                found = consumer.partitions_for_topic(topic)
                if found:
                    break
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"topic {topic!r} has no partitions")
            partitions = [TopicPartition(topic, p) for p in sorted(found)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            await consumer.commit({tp: await consumer.position(tp) for tp in partitions})
        finally:
            await consumer.stop()

    asyncio.run(run())


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_metrics(port: int) -> dict[str, float]:
    """Sample name + labels -> value, from the worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Worker:
    """One `modstream worker` process (CPU, loopback media, max batch 64) with its own consumer
    group, committed to the end of `posts` first; `args`: its further arguments. From `repo`'s code
    (another checkout runs with this venv); ready once /ready answers. bench/feed_throughput.py
    starts its workers with this too."""

    def __init__(self, stack: Stack, tmp: Path, app_id: str, args: list[str], repo: Path = REPO) -> None:
        self.app_id = app_id
        self.port = free_ports(1)[0]
        commit_to_end(stack.bootstrap, app_id)
        self.log = tmp / f"{app_id}.log"
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "worker", "--bootstrap", stack.bootstrap,
             "--redis", f"redis://127.0.0.1:{stack.redis}/0", "--registry", str(tmp / "registry"),
             "--web-port", str(self.port), "--allow-loopback-media", "--app-id", app_id, "--device", "cpu",
             "--max-batch", "64", *args],
            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = started + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"worker {app_id} did not start; see {self.log}") from None
                time.sleep(0.25)
        self.ready_s = time.monotonic() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(worker: Worker, stack: Stack, warm: list[Post], posts: list[Post], tag: str) -> dict[str, Any]:
    load_before = os.getloadavg()
    e2e(stack, warm, f"{tag}w-")
    cpu_before = process_cpu_s(worker.proc.pid)
    result = e2e(stack, posts, f"{tag}m-")
    # CPU-seconds per post: steadier than posts/s on a shared machine (another process's burst
    # delays a worker's wall clock, not its CPU time). Read before the metrics polling below.
    result["cpu_ms_per_post"] = 1000 * (process_cpu_s(worker.proc.pid) - cpu_before) / len(posts)
    expected = len(warm) + len(posts)
    deadline = time.monotonic() + 10  # the counter may trail the last label by a moment
    while True:
        metrics = read_metrics(worker.port)
        processed = sum(v for k, v in metrics.items() if k.startswith("modstream_posts_total{"))
        if processed >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    loaded = metrics.get("modstream_bank_loaded", math.nan)
    result.update(
        ready_s=worker.ready_s,
        peak_rss_mib=peak_rss_mib(worker.proc.pid),
        bank_entries_violating=metrics.get('modstream_bank_entries{bank="violating"}'),
        bank_loaded=None if math.isnan(loaded) else loaded,  # NaN: banks off
        posts_processed=processed,
        bank_matches=sum(v for k, v in metrics.items() if k.startswith("modstream_bank_matches_total")),
        loadavg_1m_before=load_before[0],
        loadavg_1m_after=os.getloadavg()[0],
    )
    if processed != expected:
        # Its group was committed to the end of `posts` before it started: it sees its own posts only.
        raise RuntimeError(f"{tag}: the worker labelled {processed} posts, not {expected}")
    if result["dedupe_hits"]:
        raise RuntimeError(f"{tag}: {result['dedupe_hits']} dedupe hits; the posts were meant to be new")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=400, help="posts measured per worker")
    parser.add_argument("--pairs", type=int, default=2, help="OFF/ON worker pairs, alternating")
    parser.add_argument("--bank-entries", type=int, default=100_000)
    parser.add_argument("--out", default="var/bench/bank_worker.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="modstream-bank-worker-"))
    stack = Stack(tmp / "stack")
    stack("start")
    worker: Worker | None = None
    media = None
    try:
        save_default_model(tmp / "registry")
        per_worker = WARM_POSTS + args.posts
        media_dir = tmp / "media"
        examples = read_manifest(write_synthetic(media_dir, n=2 * args.pairs * per_worker, seed=23, image_size=256))
        media = BackgroundMediaServer(media_dir / "images")
        bank = fill_bank_topic(stack.bootstrap, BANK_TOPIC, args.bank_entries)
        print(f"bank topic {BANK_TOPIC}: {args.bank_entries} random entries written in {bank['publish_s']:.1f} s")

        def posts(tag: str, n: int, offset: int) -> list[Post]:
            return list(synthetic_posts(examples[offset : offset + n], media.server.url, n, prefix=tag, seed=offset))

        runs: list[dict[str, Any]] = []
        for pair in range(args.pairs):
            row: dict[str, Any] = {"pair": pair}
            # ABBA: odd pairs run ON first, so neither side always gets the later, warmer (or busier) slot.
            sides = (("off", None), ("on", BANK_TOPIC))
            for side, topic in sides if pair % 2 == 0 else sides[::-1]:
                offset = (2 * pair + (side == "on")) * per_worker
                tag = f"bw{pair}{side}"
                banks = ["--bank-topic", topic] if topic else ["--no-banks"]
                worker = Worker(stack, tmp, f"bank-bench-{pair}-{side}", banks)
                result = measure(
                    worker,
                    stack,
                    posts(f"{tag}w", WARM_POSTS, offset),
                    posts(f"{tag}m", args.posts, offset + WARM_POSTS),
                    tag,
                )
                worker.stop()
                worker = None
                if side == "on":
                    if result["bank_entries_violating"] != args.bank_entries or result["bank_loaded"] != 1:
                        raise RuntimeError(
                            f"the ON worker's banks are not loaded: modstream_bank_entries{{violating}} "
                            f"{result['bank_entries_violating']} (want {args.bank_entries}), "
                            f"modstream_bank_loaded {result['bank_loaded']} (want 1)"
                        )
                    if result["bank_matches"]:
                        raise RuntimeError(f"{result['bank_matches']} bank matches; random entries match nothing")
                row[side] = result
                print(f"pair {pair} {side:>3}: {result['posts_per_s']:.1f} posts/s, ready in {result['ready_s']:.1f} s")
            row["ratio_on_off"] = row["on"]["posts_per_s"] / row["off"]["posts_per_s"]
            row["cpu_ratio_on_off"] = row["on"]["cpu_ms_per_post"] / row["off"]["cpu_ms_per_post"]
            runs.append(row)

        off_mean = statistics.fmean(r["off"]["posts_per_s"] for r in runs)
        on_mean = statistics.fmean(r["on"]["posts_per_s"] for r in runs)
        summary = {
            "off_posts_per_s_mean": off_mean,
            "on_posts_per_s_mean": on_mean,
            "ratio_of_means": on_mean / off_mean,
            "ratio_median": statistics.median(r["ratio_on_off"] for r in runs),
            "off_cpu_ms_per_post_mean": statistics.fmean(r["off"]["cpu_ms_per_post"] for r in runs),
            "on_cpu_ms_per_post_mean": statistics.fmean(r["on"]["cpu_ms_per_post"] for r in runs),
            "cpu_ratio_median": statistics.median(r["cpu_ratio_on_off"] for r in runs),
            "ratio_goal": 0.95,
            "off_ready_s_mean": statistics.fmean(r["off"]["ready_s"] for r in runs),
            "on_ready_s_mean": statistics.fmean(r["on"]["ready_s"] for r in runs),
        }
        print()
        print(
            f"{'pair':<6} {'OFF posts/s':>11} {'ON posts/s':>11} {'ON/OFF':>7} {'OFF cpu ms':>10} {'ON cpu ms':>9} "
            f"{'ON/OFF cpu':>10} {'OFF ready':>10} {'ON ready':>9}"
        )
        for r in runs:
            print(
                f"{r['pair']:<6} {r['off']['posts_per_s']:>11.1f} {r['on']['posts_per_s']:>11.1f} "
                f"{r['ratio_on_off']:>6.3f}x {r['off']['cpu_ms_per_post']:>10.1f} {r['on']['cpu_ms_per_post']:>9.1f} "
                f"{r['cpu_ratio_on_off']:>9.3f}x {r['off']['ready_s']:>9.1f}s {r['on']['ready_s']:>8.1f}s"
            )
        print(
            f"{'mean':<6} {off_mean:>11.1f} {on_mean:>11.1f} {summary['ratio_of_means']:>6.3f}x "
            f"{summary['off_cpu_ms_per_post_mean']:>10.1f} {summary['on_cpu_ms_per_post_mean']:>9.1f} "
            f"{'':>10} {summary['off_ready_s_mean']:>9.1f}s {summary['on_ready_s_mean']:>8.1f}s"
        )
        print(f"median ON/OFF: posts/s {summary['ratio_median']:.3f}x, CPU per post {summary['cpu_ratio_median']:.3f}x")
        print(
            f"ON workers: {args.bank_entries} violating entries loaded before /ready; "
            f"goal ON/OFF >= {summary['ratio_goal']}: {'met' if summary['ratio_of_means'] >= 0.95 else 'NOT met'}"
        )
        out = {
            "benchmark": "bank_worker",
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "params": {"posts": args.posts, "warm_posts": WARM_POSTS, "pairs": args.pairs, "image_size": 256},
            "bank": bank,
            "runs": runs,
            "summary": summary,
        }
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"written: {path}")
    finally:
        if worker is not None:
            worker.stop()
        if media is not None:
            media.stop()
        stack("stop")


if __name__ == "__main__":
    main()
