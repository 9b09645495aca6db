"""`modstream worker --processes 2` on the real broker: two processes in one consumer group behind
one /metrics and /ready, every post labelled, a child killed with SIGKILL restarted without losing
a post, and SIGTERM stopping them all."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from modstream.records import Post, encode
from stream.producer import synthetic_posts
from tests.integration.sink_harness import commit_to_end
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import Worker, collect, produce


def _children(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _posts_by_process(worker: Worker) -> dict[str, float]:
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(worker.metrics()):
        if family.name == "modstream_posts":
            for s in family.samples:
                if s.name == "modstream_posts_total":
                    out[s.labels["worker_process"]] += s.value
    return dict(out)


def _send_and_collect(stack: LocalStack, posts: list[Post], timeout: float) -> Counter[str]:
    asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in posts], keys=[p.id.encode() for p in posts]))
    prefix = posts[0].id.rsplit("-", 1)[0] + "-"
    want = {p.id for p in posts}

    def done(records: list[dict]) -> bool:
        return want <= {r["post_id"] for r in records}

    labels = asyncio.run(collect(stack.bootstrap, "labels", done, timeout, lambda r: r["post_id"].startswith(prefix)))
    return Counter(r["post_id"] for r in labels)


def test_two_processes_label_every_post_survive_a_killed_child_and_stop_together(
    stack: LocalStack, registry: Path, media: tuple[str, list], tmp_path: Path
) -> None:
    url, examples = media
    app_id = f"it-procs-{uuid.uuid4().hex[:8]}"
    asyncio.run(commit_to_end(stack.bootstrap, app_id, "posts"))
    worker = Worker(stack, registry, tmp_path, app_id=app_id, extra_args=["--processes", "2"])
    worker.start()  # the parent's /ready: 200 only once both children are ready
    try:
        assert worker.process is not None
        children = _children(worker.process.pid)
        assert len(children) == 2, worker.log_tail()

        first = list(synthetic_posts(examples, url, 120, prefix="procs-a", seed=1))
        ids = _send_and_collect(stack, first, timeout=180)
        assert len(ids) == 120 and max(ids.values()) == 1, worker.log_tail()
        by_process = _posts_by_process(worker)
        # Both processes consumed (4 partitions, keyed posts), and the host page counts every post.
        assert set(by_process) == {"0", "1"} and min(by_process.values()) > 0, by_process
        assert sum(by_process.values()) == 120

        # A child dies without any chance to clean up: the supervisor starts it again and the
        # group's rebalance gives its partitions on; no post is lost (at-least-once).
        subprocess.run(["kill", "-9", str(children[0])], check=True)
        second = list(synthetic_posts(examples, url, 80, prefix="procs-b", seed=2))
        ids = _send_and_collect(stack, second, timeout=240)
        assert len(ids) == 80, f"{80 - len(ids)} posts lost:\n{worker.log_tail()}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/ready", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"not ready again after the restart:\n{worker.log_tail()}")
        own = {
            (s.name, s.labels.get("state")): s.value
            for f in text_string_to_metric_families(worker.metrics())
            for s in f.samples
            if s.name.startswith("modstream_worker_process")
        }
        assert own[("modstream_worker_process_restarts_total", None)] == 1, own
        assert own[("modstream_worker_processes", "answering")] == 2, own
        children = _children(worker.process.pid)
        assert len(children) == 2

        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=90) == 0, worker.log_tail()
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        worker.stop()
