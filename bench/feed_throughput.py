"""The feed with the model taken out (issue 22): what the host spends per post around the model.

A real `modstream worker` on real Kafka and Redis serves `--stand-in-model` (models/stand_in.py:
every stage runs, tokenising and the resize to the model's input included, but the forward answers at once
with a fixed confident label), media from a loopback HTTP server:

- photo-like 1000 x 700 JPEGs (smooth shapes plus grain, quality 90, ~150-250 KB: pure noise
  would make decoding several times dearer), each post's its own;
- `--png-share` of them PNGs instead (same pixels);
- `--repost-share` of posts repeat an earlier post's text and image under a new id (the dedupe
  cache's hits).

Measured after WARM_POSTS warm-up posts, over `--posts` posts: posts/s end to end (first send to
last label), the worker's CPU-seconds per post (all its threads, /proc; steadier than posts/s on
a shared machine), peak RSS, and where that CPU goes: py-spy samples every thread of the worker
that is not idle (`--rate` Hz) and each sample is put under a stage by its frames (`stage_of`:
banks, tokenise, resize, decode, hash + dedupe, fetch, parse, serialise, produce, consume,
metrics; "other" is the event loop and faust's own bookkeeping). A stage's
ms/post is its share of samples times the CPU per post. Samples inside C code count under the
Python frame that called it.

    .venv/bin/python bench/feed_throughput.py [--posts 800] [--processes 1 2] [--no-profile]
        [--old-repo DIR] [--new-worker-arg=ARG ...] [--out var/bench/feed_throughput.json]

`--old-repo DIR` also runs the worker from another checkout (a `git worktree` of an older commit,
which must know `--stand-in-model`) with this venv, old then new for each `--processes` value, on
the same stack and machine, each with posts and media of its own. Starts its own Kafka + Redis
(deploy/local-stack.sh) on free loopback ports and stops them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bank_worker import Worker, process_cpu_s, read_metrics  # noqa: E402
from bench.stream_throughput import WARM_POSTS, Stack, e2e, peak_rss_mib, save_default_model  # noqa: E402
from modstream.records import Post  # noqa: E402
from stream.media_server import BackgroundMediaServer  # noqa: E402

# (stage, regex over one py-spy frame "function (path:line)"). A sample with a frame anywhere in
# its stack that matches a WHOLE_STACK rule is that stage's (the PIL and numpy calls PDQ makes are
# the banks' cost, not decoding); otherwise its frames are tried from the innermost out against
# STAGES, and the first frame that matches names the stage (a resize inside decode_image is resize).
WHOLE_STACK: list[tuple[str, str]] = [
    ("model (stand-in)", r"models/stand_in\.py"),
    ("banks (PDQ, lookup)", r"stream/banks/|stream/bank_stage\.py"),
    ("tokenise", r"tokenizers|transformers/tokenization|TextPreprocessor|\(\S*models/text"),
]
STAGES: list[tuple[str, str]] = [
    ("resize", r"^(resize|reduce|thumbnail|_resize\w*|to_uint8\w*|bounded_rgb|_fit\w*) \(|ImagePreprocessor"),
    ("decode", r"PIL/|decode_image|decode_and_read|_decode_sync"),
    ("hash + dedupe", r"content_hash|hashlib|redis_store\.py|redis/|dedupe_key|_cached|_remember"),
    ("fetch", r"aiohttp/|stream/media\.py|yarl/|multidict"),
    ("parse", r"^parse \(.*stream/pipeline\.py|modstream/records\.py.*(from_dict|decode|parse)|decode_json"),
    ("serialise", r"orjson|json/|modstream/records\.py|to_dict|encode"),
    ("produce", r"aiokafka/producer|faust/topics|producer\.py|send_soon|_send"),
    ("consume", r"aiokafka/consumer|aiokafka/conn|faust/transport|faust/streams"),
    ("metrics", r"prometheus_client"),
]
# A thread py-spy still sampled while it waited: the event loop in epoll, a pool thread on its
# queue, a lock. Not CPU: left out of the shares.
IDLE = re.compile(
    r"^(select|poll) \(.*selectors\.py|^_worker \(.*concurrent/futures/thread\.py|^wait \(.*threading\.py"
)
_WHOLE = [(stage, re.compile(rx)) for stage, rx in WHOLE_STACK]
_INNERMOST = [(stage, re.compile(rx)) for stage, rx in STAGES]


def stage_of(frames: list[str]) -> str:
    """`frames` innermost last (py-spy's collapsed order); "idle" for a thread that was waiting."""
    if frames and IDLE.search(frames[-1]):
        return "idle"
    for stage, rx in _WHOLE:
        if any(rx.search(frame) for frame in frames):
            return stage
    for frame in reversed(frames):
        for stage, rx in _INNERMOST:
            if rx.search(frame):
                return stage
    return "other"


def breakdown(raw: str) -> Counter[str]:
    """Samples per stage from py-spy's `--format raw` output (one 'f1;f2;...;fn COUNT' line per stack)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        counts[stage_of(frames)] += int(count)
    return counts


def write_media(folder: Path, n: int, png_share: float, seed: int = 22) -> list[str]:
    """n distinct photo-like 1000 x 700 images; about `png_share` of them PNG. Returns file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)).resize((1000, 700), Image.BICUBIC)
    grain = rng.integers(-8, 9, (700, 1000, 3))
    base = np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    names = []
    png_every = round(1 / png_share) if png_share > 0 else 0
    for i in range(n):
        png = png_every and i % png_every == png_every - 1
        name = f"photo-{i:05d}.{'png' if png else 'jpg'}"
        path = folder / name
        if not path.exists():
            buf = io.BytesIO()
            pixels = Image.fromarray(np.roll(np.roll(base, i * 7, axis=1), i * 3, axis=0))
            pixels.save(buf, "PNG" if png else "JPEG", **({} if png else {"quality": 90}))
            path.write_bytes(buf.getvalue())
        names.append(name)
    return names


def feed_posts(names: list[str], media_url: str, n: int, repost_share: float, prefix: str, seed: int) -> list[Post]:
    """n posts over fresh images from `names` (consumed in order); `repost_share` of them repeat an
    earlier post of this list (same text and image: a dedupe hit)."""
    rng = np.random.default_rng(seed)
    posts: list[Post] = []
    fresh: list[Post] = []
    for i in range(n):
        if fresh and rng.random() < repost_share:
            earlier = fresh[int(rng.integers(len(fresh)))]
            posts.append(Post(id=f"{prefix}-{i:06d}", text=earlier.text, image_urls=earlier.image_urls))
            continue
        name = names.pop(0)
        post = Post(id=f"{prefix}-{i:06d}", text=f"a caption about picture {name}", image_urls=(f"{media_url}/{name}",))
        fresh.append(post)
        posts.append(post)
    return posts


class FeedWorker(Worker):
    """`modstream worker --stand-in-model`, from `repo`, with its own consumer group."""

    def __init__(self, stack: Stack, tmp: Path, repo: Path, app_id: str, extra: list[str]) -> None:
        super().__init__(stack, tmp, app_id, ["--stand-in-model", *extra], repo)

    def pids(self) -> list[int]:
        """The worker and its child processes (a `--processes N` worker's children)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [self.proc.pid, *(int(p) for p in out.split())]


def start_profilers(pids: list[int], rate: int, tmp: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy, or run with --no-profile)")
    out = []
    for pid in pids:
        path = tmp / f"spy-{pid}.txt"
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(path),
             "--nonblocking", "--threads", "--full-filenames"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        out.append((proc, path))
    time.sleep(1.0)  # attached before the measured posts go out
    return out


def stop_profilers(profilers: list[tuple[subprocess.Popen[bytes], Path]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for proc, path in profilers:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        proc.wait(timeout=60)
        if path.exists():
            counts += breakdown(path.read_text())
    return counts


def measure(
    args: argparse.Namespace,
    code: str,
    repo: Path,
    processes: int,
    stack: Stack,
    tmp: Path,
    names: list[str],
    media_url: str,
) -> dict[str, Any]:
    extra = [*(["--processes", str(processes)] if processes != 1 else []), *args.worker_arg]
    if code == "new":
        extra += args.new_worker_arg
    tag = f"{code}p{processes}"
    worker = FeedWorker(stack, tmp, repo, f"feed-bench-{tag}-{time.time_ns()}", extra)
    try:
        warm = feed_posts(names, media_url, WARM_POSTS, args.repost_share, f"fw{tag}", seed=1)
        e2e(stack, warm, f"fw{tag}-")
        posts = feed_posts(names, media_url, args.posts, args.repost_share, f"fm{tag}", seed=2)
        pids = worker.pids()
        profilers = start_profilers(pids, args.rate, tmp) if args.profile else []
        cpu_before = sum(process_cpu_s(p) for p in pids)
        result = e2e(stack, posts, f"fm{tag}-")
        cpu = sum(process_cpu_s(p) for p in pids) - cpu_before
        stages = stop_profilers(profilers) if profilers else Counter()
        metrics = read_metrics(worker.port)
        result.update(
            code=code,
            repo=str(repo),
            processes=processes,
            worker_args=extra,
            cpu_s=cpu,
            cpu_ms_per_post=1000 * cpu / len(posts),
            peak_rss_mib=sum(peak_rss_mib(p) for p in pids),
            routes={k: v for k, v in metrics.items() if k.startswith("modstream_posts_total{")},
            # warm-up included (the same repost share); absent from code older than these counters
            images_ok=metrics.get('modstream_media_fetch_total{status="ok"}'),
            decode_memo_hits=metrics.get("modstream_media_decode_memo_hits_total"),
            decode_skipped=metrics.get("modstream_media_decode_skipped_total"),
        )
        idle = stages.pop("idle", 0)
        total = sum(stages.values())
        result["idle_samples"] = idle
        result["stages"] = {
            stage: {"samples": n, "share": n / total, "ms_per_post": n / total * result["cpu_ms_per_post"]}
            for stage, n in stages.most_common()
        }
        return result
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=800, help="posts measured (after the warm-up)")
    parser.add_argument("--png-share", type=float, default=0.1)
    parser.add_argument("--repost-share", type=float, default=0.2)
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1], help="the worker's --processes; several: measured in turn"
    )
    parser.add_argument("--worker-arg", action="append", default=[], help="one more worker argument (repeatable)")
    parser.add_argument(
        "--new-worker-arg",
        action="append",
        default=[],
        help="one more argument for this checkout's worker only, e.g. an option the old code lacks (repeatable)",
    )
    parser.add_argument(
        "--old-repo",
        help="also measure the worker from this checkout (a git worktree of older code), ABAB with this one",
    )
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True, help="py-spy breakdown")
    parser.add_argument("--rate", type=int, default=97, help="py-spy samples per second")
    parser.add_argument("--out", default="var/bench/feed_throughput.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="modstream-feed-"))
    stack = Stack(tmp / "stack")
    stack("start")
    media = None
    try:
        save_default_model(tmp / "registry")
        codes = [("new", REPO)]
        if args.old_repo:
            codes.insert(0, ("old", Path(args.old_repo).resolve()))
        runs = [(code, repo, n) for n in args.processes for code, repo in codes]
        names = write_media(tmp / "media", len(runs) * (WARM_POSTS + args.posts), args.png_share)
        media = BackgroundMediaServer(tmp / "media")
        results = [measure(args, code, repo, n, stack, tmp, names, media.server.url) for code, repo, n in runs]
    finally:
        if media is not None:
            media.stop()
        stack("stop")

    for result in results:
        print(
            f"\n{result['code']} code, {result['processes']} process(es): {result['posts']} posts, "
            f"{result['posts_per_s']:.1f} posts/s, {result['cpu_ms_per_post']:.1f} ms of worker CPU per post, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['dedupe_hits']} dedupe hits"
        )
        if result.get("images_ok") and result.get("decode_memo_hits") is not None:
            print(
                f"images not decoded again (warm-up included): {result['decode_memo_hits']:.0f} from the decode memo, "
                f"{result['decode_skipped'] or 0:.0f} from the dedupe cache's facts, of {result['images_ok']:.0f}"
            )
        if result["stages"]:
            print(f"{'stage':<22} {'share':>7} {'ms/post':>8}")
            for stage, row in result["stages"].items():
                print(f"{stage:<22} {row['share']:>6.1%} {row['ms_per_post']:>8.2f}")
    base = {r["code"]: r for r in results if r["processes"] == results[0]["processes"]}
    print()
    for result in results:
        ref = base[result["code"]]
        if result is not ref:
            print(
                f"{result['code']}: {result['processes']} processes vs {ref['processes']}: posts/s "
                f"{result['posts_per_s'] / ref['posts_per_s']:.2f}x, CPU per post "
                f"{result['cpu_ms_per_post'] / ref['cpu_ms_per_post']:.2f}x"
            )
        if result["code"] == "new" and "old" in base:
            old = next(r for r in results if r["code"] == "old" and r["processes"] == result["processes"])
            print(
                f"new vs old, {result['processes']} process(es): "
                f"posts/s {result['posts_per_s'] / old['posts_per_s']:.2f}x, "
                f"CPU per post {result['cpu_ms_per_post'] / old['cpu_ms_per_post']:.2f}x"
            )
    out = {
        "benchmark": "feed_throughput",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "params": {k: v for k, v in vars(args).items() if k != "out"} | {"warm_posts": WARM_POSTS},
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
