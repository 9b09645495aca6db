"""`modstream labels` against the real broker: filters by route, version and post id, stops at
the end of the topic, `--json` gives the records back unchanged, and hostile records (not
JSON, not objects) are passed over."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

from modstream.records import Label, MediaInfo, encode
from tests.integration.stack import REPO_ROOT, LocalStack
from tests.integration.worker_harness import produce


def _label(post_id: str, route: str, version: str) -> Label:
    labels = {"hate": {"label": "hateful", "score": 0.81, "decision": True, "threshold": 0.5}}
    return Label(post_id, labels, 0.12, route, ["weak_image_text_match"] if route == "review" else [],
                 MediaInfo("ok"), version)  # fmt: skip


def test_labels_reader_filters_and_stops_at_the_end(stack: LocalStack) -> None:
    topic = f"labels-reader-{uuid.uuid4().hex[:8]}"
    run = uuid.uuid4().hex[:6]
    records = [
        encode(_label(f"{run}-a", "auto", "v0001")),
        encode(_label(f"{run}-b", "review", "v0001")),
        b"not json at all",
        b"[1, 2, 3]",
        encode(_label(f"{run}-c", "review", "v0002")),
    ]
    asyncio.run(produce(stack.bootstrap, topic, records))

    def labels(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "modstream.cli", "labels", "--bootstrap", stack.bootstrap, "--topic", topic, *args],
            cwd=REPO_ROOT, text=True, capture_output=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    everything = labels()
    assert sorted(line.split()[0] for line in everything) == [f"{run}-a", f"{run}-b", f"{run}-c"]
    review = labels("--route", "review")
    assert sorted(line.split()[0] for line in review) == [f"{run}-b", f"{run}-c"]
    assert "reasons=weak_image_text_match" in review[0] and "hate+0.81" in review[0]
    assert [line.split()[0] for line in labels("--route", "review", "--version", "v0002")] == [f"{run}-c"]
    assert len(labels("--post-prefix", f"{run}-a")) == 1 and len(labels("-n", "1")) == 1
    raw = [json.loads(line) for line in labels("--json", "--version", "v0001", "--route", "auto")]
    assert raw == [json.loads(records[0])], "--json gives the record back unchanged"
    missing = subprocess.run(
        [sys.executable, "-m", "modstream.cli", "labels", "--bootstrap", stack.bootstrap, "--topic", "no-such-topic-x"],
        cwd=REPO_ROOT, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode in (0, 2)  # auto-created empty (local stack) or refused with a message
