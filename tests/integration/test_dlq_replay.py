"""`modstream dlq replay` against the real broker and a real worker: posts that dead-letter
because of a model bug come back with labels once a fixed model is deployed, and replaying
them again creates no duplicate labels.

The cause: model v0001 tokenises up to 200 tokens although its text encoder has 64
positions, so every post longer than 64 tokens fails in the forward pass and the worker
dead-letters it at stage `classify` (short texts, and the worker's warm-up, work). The fix:
v0002 truncates at 16 tokens; the worker is restarted on it (a deploy).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from models.card import ModelCard
from models.registry import ModelRegistry
from modstream.records import Post, encode
from tests.integration.sink_harness import commit_to_end, read_topic
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import REPO_ROOT, Worker, collect, produce
from tests.tiny import tiny_config, tiny_model

CARD = {
    "thresholds": {"hate": 0.5, "sarcasm": 0.5},
    "itm": {"trained": True, "auroc": 0.9, "routing_lift": {"hate": 1.5}, "threshold": 0.5},
}
N = 6


def register(registry: Path, max_text_length: int) -> str:
    model, tokenizer = tiny_model(tiny_config(max_text_length=max_text_length))
    return ModelRegistry(registry).save(model, tokenizer, ModelCard(config=model.config, **CARD))


def replay_cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "modstream.cli", "dlq", "replay", "--bootstrap", stack.bootstrap, *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def posts_end(stack: LocalStack) -> int:
    return len(asyncio.run(read_topic(stack.bootstrap, "posts")))


def test_replay_after_the_fix_labels_dead_letters_once(stack: LocalStack, tmp_path: Path) -> None:
    """ "No duplicate labels" means: the labels topic, read unique by its key (the post id, what
    a compacted topic keeps and what every label consumer keys on), holds exactly one label per
    replayed post, and every copy a repeated replay adds is the same label (same model version,
    same scores: the dedupe cache answers the second time), so no reader can see two verdicts."""
    prefix = f"dlq-{uuid.uuid4().hex[:8]}-"
    registry = tmp_path / "registry"
    assert register(registry, max_text_length=200) == "v0001"  # the bug
    app_id = f"it-dlq-{prefix}"
    asyncio.run(commit_to_end(stack.bootstrap, app_id, "posts"))  # earlier tests' posts are not ours
    worker = Worker(stack, registry, tmp_path, app_id=app_id)
    since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    worker.start()
    try:
        long_text = " ".join(["sarcasm"] * 120)
        posts = [Post(f"{prefix}{i}", f"{long_text} {i}") for i in range(N)]
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in posts], [p.id.encode() for p in posts]))

        def mine(record: dict) -> bool:
            return str(record.get("post_id") or "").startswith(prefix)

        dead = asyncio.run(collect(stack.bootstrap, "posts.dlq", lambda r: len(r) >= N, 120, mine))
        assert len(dead) == N, worker.log_tail()
        assert {d["stage"] for d in dead} == {"classify"}
        assert all("expanded size" in d["reason"] for d in dead), dead[0]["reason"]
        assert json.loads(dead[0]["raw"])["text"].startswith("sarcasm sarcasm")

        selection = ["--stage", "classify", "--reason", "expanded size", "--since", since]
        before = posts_end(stack)
        dry = replay_cli(stack, *selection, "--dry-run")
        listed = [line.split("\t")[1] for line in dry.stdout.splitlines()]
        assert sorted(listed) == sorted(p.id for p in posts)
        assert f"would send {N} posts" in dry.stderr
        assert posts_end(stack) == before, "a dry run sent something"
        # A selection that matches none of them sends nothing.
        none = replay_cli(stack, "--stage", "parse", "--reason", "expanded size", "--since", since)
        assert "sent 0 posts" in none.stderr

        # The fix: a model that truncates to its positions, deployed by restarting the worker.
        worker.stop()
        assert register(registry, max_text_length=16) == "v0002"
        worker.start()

        first = replay_cli(stack, *selection)
        assert f"sent {N} posts to posts" in first.stderr

        def labelled(records: list[dict]) -> bool:
            return len({r["post_id"] for r in records}) >= N

        labels = asyncio.run(collect(stack.bootstrap, "labels", labelled, 120, mine))
        assert sorted({r["post_id"] for r in labels}) == sorted(p.id for p in posts), worker.log_tail()
        assert Counter(r["post_id"] for r in labels).most_common(1)[0][1] == 1
        assert {r["model_version"] for r in labels} == {"v0002"}

        second = replay_cli(stack, *selection)  # the same dead letters are still on the DLQ
        assert f"sent {N} posts to posts" in second.stderr
        labels = asyncio.run(collect(stack.bootstrap, "labels", lambda r: len(r) >= 2 * N, 120, mine))
        assert len(labels) == 2 * N, worker.log_tail()
        by_id: dict[str, list[dict]] = defaultdict(list)
        for record in labels:
            by_id[record["post_id"]].append(record)
        assert len(by_id) == N  # unique by key: one label per post
        for copies in by_id.values():
            verdicts = {json.dumps([c["labels"], c["model_version"], c["route"]], sort_keys=True) for c in copies}
            assert len(verdicts) == 1, copies
            assert [c["dedupe_hit"] for c in copies] == [False, True]
        # Nothing dead-lettered again after the fix.
        dead_after = asyncio.run(collect(stack.bootstrap, "posts.dlq", lambda r: False, 5, mine))
        assert len(dead_after) == N
    finally:
        worker.stop()
