"""The dataset sink as a real subprocess against the real broker: reviewers' decisions on the
`reviewed` topic become one manifest line per post with the latest labels and the image
the reviewer saw, read from the evidence store by hash (the post's URL is never fetched);
replays change nothing; malformed decisions are dead-lettered.

The `reviewed` topic is shared by the session, so the sink may also see other tests'
decisions: assertions look at this test's post ids (`dsink-`), and the manifest as a whole
must stay readable by the trainer (one line per id)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from modstream.manifest import read_manifest
from modstream.records import ReviewDecision, TaskDecision, encode
from review.dataset import count_decisions, load_reviewed
from stream.evidence import LocalBackend
from stream.media_server import BackgroundMediaServer
from tests.integration.sink_harness import SinkProcess, wait_caught_up
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import collect, produce
from trainer.synthetic import write_synthetic

GROUP = "it-dsink"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundMediaServer, list[Path]]]:
    root = tmp_path_factory.mktemp("dsink-media")
    examples = read_manifest(write_synthetic(root, n=6, seed=9, image_size=40))
    server = BackgroundMediaServer(root / "images")  # the posts' host: the sink must never ask it
    try:
        yield server, [ex.image for ex in examples if ex.image is not None]
    finally:
        server.stop()


def _decision(
    decision_id: str,
    post_id: str,
    hate: tuple[str, str | None],
    image: tuple[str, Path] | None,
    decided_at: str,
    with_hash: bool = True,
    seen: bool = True,
) -> ReviewDecision:
    url = f"{image[0]}/{image[1].name}" if image else None
    media_hash = hashlib.sha256(image[1].read_bytes()).hexdigest() if image and with_hash else None
    return ReviewDecision(
        decision_id=decision_id,
        post_id=post_id,
        reviewer="it-reviewer",
        decisions={
            "hate": TaskDecision(*hate),
            # skip / escalate apply to the whole item, so such a decision labels nothing
            "sarcasm": TaskDecision(hate[0]) if hate[1] is None else TaskDecision("not_violating", "not_sarcastic"),
        },
        model_version="v0001",
        model_labels={"hate": {"label": "hateful", "score": 0.71, "decision": True, "threshold": 0.5}},
        text=f"the text of {post_id}",
        image_url=url,
        media_hash=media_hash,
        seen_media_hash=media_hash if seen else None,
        reasons=["itm_low"],
        decided_at=decided_at,
    )


def test_decisions_become_one_line_per_post_with_the_latest_labels_and_replays_are_no_ops(
    stack: LocalStack, images: tuple[BackgroundMediaServer, list[Path]], tmp_path: Path
) -> None:
    server, files = images
    url = server.url
    out, evidence = tmp_path / "reviewed", tmp_path / "evidence"
    kept = LocalBackend(evidence)  # what the worker kept of p1's and p2's images; p4's was not kept
    for source in files[:3]:
        kept.put(hashlib.sha256(source.read_bytes()).hexdigest(), source.read_bytes())
    t = "2026-11-28T08:{:02d}:00+00:00".format
    d1 = _decision("dsink-d1", "dsink-p1", ("confirm", "hateful"), (url, files[0]), t(1))
    d2 = _decision("dsink-d2", "dsink-p2", ("not_violating", "not_hateful"), (url, files[1]), t(2))
    d3 = _decision("dsink-d3", "dsink-p3", ("skip", None), (url, files[2]), t(3))  # labels nothing
    d4 = _decision("dsink-d4", "dsink-p4", ("confirm", "hateful"), (url, files[3]), t(4))
    d5 = _decision("dsink-d5", "dsink-p1", ("correct", "not_hateful"), (url, files[0]), t(5))  # re-decided
    d6 = _decision("dsink-d6", "dsink-p2", ("escalate", None), (url, files[1]), t(6))  # leaves p2 alone
    # the reviewer of p7 was shown no image (media unavailable at the time): no training image
    d7 = _decision("dsink-d7", "dsink-p7", ("confirm", "hateful"), (url, files[2]), t(7), seen=False)
    first = [d1, d2, d3, d1, d4, d5, d2, d6, d7]  # d1 and d2 replayed
    values = [encode(d) for d in first] + [b'{"v": 1, "decision_id": "dsink-bad", "post_id": "dsink-p9"}']
    keys = [d.post_id.encode() for d in first] + [b"dsink-p9"]
    sink = SinkProcess("dataset-sink", ["--bootstrap", stack.bootstrap, "--group", GROUP, "--out", str(out),
                                        "--evidence", str(evidence)], tmp_path, GROUP)  # fmt: skip
    sink.start()
    try:
        asyncio.run(produce(stack.bootstrap, "reviewed", values, keys))
        wait_caught_up(stack.bootstrap, GROUP, "reviewed", timeout=120, sink=sink)
        manifest = out / "manifest.jsonl"
        before = manifest.read_bytes()
        examples = {ex.id: ex for ex in read_manifest(manifest, latest=True) if ex.id.startswith("dsink-")}

        # The whole history again (a console that re-sent everything): nothing changes.
        asyncio.run(produce(stack.bootstrap, "reviewed", values[:-1], keys[:-1]))
        wait_caught_up(stack.bootstrap, GROUP, "reviewed", timeout=120, sink=sink)
        after = manifest.read_bytes()
        replays = sink.metric("modstream_sink_records_total", sink="dataset", outcome="replayed")
        superseded = sink.metric("modstream_sink_records_total", sink="dataset", outcome="superseded")
    finally:
        exit_code = sink.stop()

    assert set(examples) == {"dsink-p1", "dsink-p2", "dsink-p4", "dsink-p7"}, sink.log_tail()
    p1, p2, p4, p7 = (examples[f"dsink-p{i}"] for i in (1, 2, 4, 7))
    assert p1.labels == {"hate": "not_hateful", "sarcasm": "not_sarcastic"} and p1.meta["decision_id"] == "dsink-d5"
    assert p1.meta["revision"] == 2
    assert p2.labels == {"hate": "not_hateful", "sarcasm": "not_sarcastic"} and p2.meta["decision_id"] == "dsink-d2"
    for ex, source in ((p1, files[0]), (p2, files[1])):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        assert ex.image == out / "media" / f"{digest}.png"
        with Image.open(ex.image) as saved, Image.open(source) as original:
            assert saved.format == "PNG" and saved.size == original.size
            assert saved.convert("RGB").tobytes() == original.convert("RGB").tobytes()
    assert p4.image is None and p4.meta["media_error"]["status"] == "missing"
    assert p4.labels["hate"] == "hateful"
    assert p7.image is None and p7.meta["media_error"]["status"] == "not_seen"
    assert server.server.hits == 0, "the dataset sink fetched a post's URL"
    for key in ("decision_id", "reviewer", "decided_at", "model_version", "model_labels", "reasons"):
        assert key in p1.meta

    assert after == before, "replayed decisions changed the manifest"
    # First run: d1 and d2 again; second run: d2, d4, d5, d2 again, d1 (twice) older than d5.
    assert replays >= 2 + 4 and superseded >= 2
    mine = [ex for ex in load_reviewed(out) if ex.id.startswith("dsink-")]
    assert len(mine) == 4 and count_decisions(out) >= 4
    assert exit_code == 0, sink.log_tail()

    def bad(record: dict) -> bool:
        return record.get("stage") == "dataset_sink" and record.get("post_id") == "dsink-p9"

    dead = asyncio.run(collect(stack.bootstrap, "posts.dlq", lambda r: len(r) >= 1, 60, bad))
    assert dead and dead[0]["reason"].startswith("review_decision:"), dead


def test_a_second_dataset_sink_on_the_same_folder_is_refused(stack: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "reviewed"
    args = ["--bootstrap", stack.bootstrap, "--group", "it-dsink-lock", "--out", str(out)]
    first = SinkProcess("dataset-sink", args, tmp_path, "dsink-lock-1")
    first.start()
    try:
        second = SinkProcess("dataset-sink", args, tmp_path, "dsink-lock-2")
        with pytest.raises(RuntimeError, match="exited with 2"):
            second.start()
        assert "another dataset sink" in second.log_tail()
    finally:
        assert first.stop() == 0
