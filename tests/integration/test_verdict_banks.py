"""Decide once, apply everywhere (issue 20), on a real broker, redis-server and the real roles:
a reviewer decides an image hateful in the console; its reposts (JPEG quality 60, resized to
80%, cropped 5%, a caption bar added, each with another post text) come out of the worker as
`bank_match` without reaching the review queue; unrelated images match nothing; a worker
started later loads the bank and matches too; after an admin removes the entry, the next
repost goes to the model. An imported ThreatExchange PDQ list matches its images, and an
export re-imports to the same entries. The admin API refuses reviewers and hostile input.

The test has its own bank topic and Redis database, so other tests' consoles (which bank their
decisions on the real `bank-updates`) never decide its posts, nor its bank theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from models.images import content_hash
from modstream.records import Post, encode
from stream.media_server import BackgroundMediaServer
from tests.integration.console_harness import PASSWORD, Console, cli, json_api
from tests.integration.sink_harness import SinkProcess, commit_to_end
from tests.integration.stack import LocalStack
from tests.integration.worker_harness import Worker, collect, produce, stop_all
from tests.reposts import REPOSTS, captioned, photo_like, worker_pdq
from tests.reposts import encode as encode_image
from trainer.synthetic import write_synthetic

REDIS_DB = 12


async def _create_topic(stack: LocalStack, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap, **stack.client_options())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()


def _labels(stack: LocalStack, ids: set[str], timeout: float = 180) -> dict[str, dict]:
    records = asyncio.run(
        collect(stack.bootstrap, "labels", lambda rs: {r["post_id"] for r in rs} >= ids, timeout,
                lambda r: r.get("post_id") in ids)
    )  # fmt: skip
    got = {r["post_id"]: r for r in records}
    assert set(got) == ids, f"{len(ids - set(got))} labels missing"
    return got


def _reviewed_ids(stack: LocalStack, ids: set[str]) -> set[str]:
    """Post ids of `ids` that reached the review topic (read once to its current end)."""
    records = asyncio.run(collect(stack.bootstrap, "review", lambda rs: False, 5, lambda r: r.get("post_id") in ids))
    return {r["post_id"] for r in records}


def _posts(prefix: str, url_of: dict[str, str]) -> list[Post]:
    return [Post(f"{prefix}{i:04d}", f"repost text {i} {name}", (url,)) for i, (name, url) in enumerate(url_of.items())]


def _metric(worker: Worker, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in worker.metrics().splitlines():
        if line.startswith(f"{name}{{{wanted}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _admin_token(users: Path, bootstrap: str) -> str:
    cli("review", "add-user", "boss", "--role", "admin", "--password-stdin", "--users", str(users),
        "--bootstrap", bootstrap, stdin=PASSWORD + "\n")  # fmt: skip
    return cli("review", "token", "boss", "--users", str(users), "--bootstrap", bootstrap).strip()


def _raw_api(port: int, token: str, method: str, path: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "text/csv")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_decided_image_decides_its_reposts_everywhere_until_removed(
    stack: LocalStack, registry: Path, tmp_path: Path
) -> None:
    import redis

    run = uuid.uuid4().hex[:6]
    bank_topic = f"bank-updates-{run}"
    asyncio.run(_create_topic(stack, bank_topic))
    redis_url = f"redis://127.0.0.1:{stack.redis_port}/{REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    logs, media = tmp_path / "logs", tmp_path / "media"
    logs.mkdir()
    media.mkdir()

    # The decided image, 50 reposts of it (the four edits, several of each, other texts and captions),
    # a listed image for the import, and 500 unrelated images (synthetic scenes and photos).
    original = photo_like(9001)
    (media / "original.png").write_bytes(encode_image(original))
    names = []
    for i in range(50):
        edit = list(REPOSTS)[i % 4]
        data = captioned(original, f"caption number {i}") if edit == "caption_bar" else REPOSTS[edit](original)
        (media / f"repost-{i}.img").write_bytes(data)
        names.append(f"repost-{i}.img")
    listed = photo_like(9002)
    (media / "listed.jpg").write_bytes(encode_image(listed.convert("RGB"), "JPEG", quality=80))
    synthetic = write_synthetic(tmp_path / "synthetic", n=250, seed=17, image_size=128).parent / "images"
    for path in sorted(synthetic.iterdir())[:250]:
        (media / f"unrelated-s-{path.name}").write_bytes(path.read_bytes())
    for seed in range(250):
        (media / f"unrelated-p-{seed}.png").write_bytes(encode_image(photo_like(20_000 + seed, (320, 240))))
    unrelated = sorted(p.name for p in media.iterdir() if p.name.startswith("unrelated-"))
    assert len(unrelated) == 500

    server = BackgroundMediaServer(media)
    url = lambda name: f"{server.url}/{name}"  # noqa: E731
    # Every image post the model labels goes to review (threshold above any ITM score), so
    # "not in the queue" below means the bank took it, not the model's confidence.
    args = ["--bank-topic", bank_topic, "--itm-threshold", "1.01"]
    evidence = logs / "evidence"
    first = Worker(
        stack, registry, logs, f"modstream-worker-banks-{run}", banks=True, extra_args=args, evidence=evidence
    )
    # The second decodes its JPEGs "on the device" (the CPU here: the same tensor code as on a
    # GPU) and takes their banks' PDQ there (stream/banks/device_pdq.py).
    second = Worker(
        stack,
        registry,
        logs,
        f"modstream-worker-banks-{run}",
        banks=True,
        extra_args=[*args, "--device-decode", "on"],
        evidence=evidence,
    )
    group = f"modstream-review-sink-banks-{run}"
    sink = SinkProcess(
        "review-sink", ["--bootstrap", stack.bootstrap, "--redis", redis_url, "--group", group], logs, "review-sink"
    )
    console: Console | None = None
    # Earlier tests' posts and review items are not this test's: both groups start at the end.
    asyncio.run(commit_to_end(stack.bootstrap, first.app_id, "posts"))
    asyncio.run(commit_to_end(stack.bootstrap, group, "review"))
    try:
        first.start()
        sink.start()
        console = Console(["--bootstrap", stack.bootstrap, "--redis", redis_url, "--topic", f"reviewed-banks-{run}",
                           "--bank-topic", bank_topic, "--evidence", str(evidence)],
                          logs / "console.log", logs / "users.json")  # fmt: skip
        admin = _admin_token(logs / "users.json", stack.bootstrap)

        # 1. The original is routed; the reviewer decides it hateful, having seen it.
        asyncio.run(
            produce(
                stack.bootstrap, "posts", [encode(Post(f"bank-{run}-orig", "look at this", (url("original.png"),)))]
            )
        )
        assert _labels(stack, {f"bank-{run}-orig"})[f"bank-{run}-orig"]["route"] == "review"
        claim: dict = {}
        _wait(lambda: claim.update(console.api("POST", "/api/v1/claim")[1]) or bool(claim.get("item")), 60, "the item")
        assert claim["item"]["post_id"] == f"bank-{run}-orig"
        status, item = console.api("GET", f"/api/v1/items/{claim['entry_id']}")
        assert status == 200 and item["precedent"] == []  # nothing decided before
        body = {"decisions": {"hate": {"action": "correct", "label": "hateful"}, "sarcasm": "not_violating"}}
        status, created = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body)
        assert status == 201, created
        digest = content_hash((media / "original.png").read_bytes())
        entry_id = f"review:{digest}"
        banked = asyncio.run(collect(stack.bootstrap, bank_topic, lambda rs: len(rs) >= 1, 30))
        assert [b["entry"]["entry_id"] for b in banked] == [entry_id]
        assert banked[0]["entry"]["verdicts"] == {"hate": 1, "sarcasm": 0}
        assert banked[0]["entry"]["decided_by"] == "scripted" and banked[0]["entry"]["pdq"]
        _wait(lambda: _metric(first, "modstream_bank_entries", bank="violating") == 1, 30, "the worker's bank")

        # 2. 50 reposts, each edited and with its own text: the banked verdict, no model, no queue.
        reposts = _posts(f"bank-{run}-r-", {n: url(n) for n in names})
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in reposts]))
        labels = _labels(stack, {p.id for p in reposts})
        missed = {pid: names[int(pid[-4:])] for pid, r in labels.items() if r["route"] != "bank_match"}
        assert not missed, f"reposts not matched: {sorted(set(missed.values()))}"
        for record in labels.values():
            assert record["bank"]["entry_id"] == entry_id and record["bank"]["bank"] == "violating"
            assert record["labels"]["hate"]["label"] == "hateful" and record["labels"]["hate"]["source"] == "bank"
            assert record["bank"]["decision_id"] == created["decision"]["decision_id"]
        assert _reviewed_ids(stack, set(labels)) == set(), "a banked repost reached the review queue"

        # 3. 500 unrelated images: none matches.
        others = _posts(f"bank-{run}-u-", {n: url(n) for n in unrelated})
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in others]))
        unrelated_labels = _labels(stack, {p.id for p in others}, timeout=400)
        matched = [r["post_id"] for r in unrelated_labels.values() if r["bank"]]
        assert matched == [], f"{len(matched)} unrelated images matched the bank"

        # 4. A worker started later (the first one stopped) loads the bank and matches too.
        second.start()
        first.stop()
        assert _metric(second, "modstream_bank_entries", bank="violating") == 1
        assert _metric(second, "modstream_bank_loaded") == 1
        later = _posts(f"bank-{run}-l-", {n: url(n) for n in names[:12]})
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in later]))
        assert {r["route"] for r in _labels(stack, {p.id for p in later}).values()} == {"bank_match"}
        assert (
            sum(_metric(second, "modstream_bank_matches_total", bank="violating", kind=k) for k in ("pdq", "exact"))
            == 12
        )
        # The JPEG reposts among them (every fourth) were decoded and hashed on the "device".
        assert _metric(second, "modstream_media_device_decoded_total", result="ok") == 3
        # Posts the first worker labelled, posted again (same text, same bytes): the second worker
        # labels them from Redis without decoding them, the cache entry carrying the decode's PDQ.
        again = [Post(f"{p.id}-again", p.text, p.image_urls) for p in others[:10]]
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in again]))
        relabelled = _labels(stack, {p.id for p in again})
        for p in others[:10]:
            record, before = relabelled[f"{p.id}-again"], unrelated_labels[p.id]
            assert record["dedupe_hit"] and record["labels"] == before["labels"]
            assert record["media"]["pdq"] == before["media"]["pdq"] and record["media"]["pdq"]
        assert _metric(second, "modstream_media_decode_skipped_total") == 10

        # 5. The admin API: reviewers are refused; an imported list matches; an export re-imports.
        assert console.api("GET", "/api/v1/admin/banks")[0] == 403
        assert console.api("DELETE", f"/api/v1/admin/banks/{urllib.parse.quote(entry_id)}")[0] == 403
        status, listing = json_api(console.port, admin, "GET", "/api/v1/admin/banks?bank=violating")
        assert status == 200 and [e["entry_id"] for e in listing["entries"]] == [entry_id]
        listed_pdq = worker_pdq((media / "listed.jpg").read_bytes())
        header = "signal_type,signal_str,collab,category,tags\r\n"
        csv_text = header + f"pdq,{listed_pdq.hex},partner,POSITIVE_CLASS,hate=1 sarcasm=0\r\n"
        bad = csv_text + "pdq,not-a-hash,partner,POSITIVE_CLASS,\r\n"
        status, reply = _raw_api(console.port, admin, "POST", "/api/v1/admin/banks/import?source=partner", bad.encode())
        assert status == 400 and b"line 3" in reply  # nothing of a malformed list is imported
        status, reply = _raw_api(
            console.port, admin, "POST", "/api/v1/admin/banks/import?source=partner", csv_text.encode()
        )
        assert status == 202 and json.loads(reply) == {"imported": 1}
        _wait(lambda: _metric(second, "modstream_bank_entries", bank="violating") == 2, 30, "the import on the worker")
        post = Post(f"bank-{run}-listed", "from the list", (url("listed.jpg"),))
        asyncio.run(produce(stack.bootstrap, "posts", [encode(post)]))
        record = _labels(stack, {post.id})[post.id]
        assert record["route"] == "bank_match" and record["bank"]["source"] == "partner"
        req = urllib.request.Request(f"http://127.0.0.1:{console.port}/api/v1/admin/banks/export?source=partner")
        req.add_header("Authorization", f"Bearer {admin}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            exported = resp.read()
        assert listed_pdq.hex.encode() in exported
        status, reply = _raw_api(console.port, admin, "POST", "/api/v1/admin/banks/import?source=partner", exported)
        assert status == 202 and json.loads(reply) == {"imported": 1}
        time.sleep(2)
        status, listing = json_api(console.port, admin, "GET", "/api/v1/admin/banks?source=partner")
        assert [e["pdq"] for e in listing["entries"]] == [listed_pdq.hex]  # the same entry, not a second one
        # The same from a shell: export, re-import, list (lists too large for the console's upload).
        kafka = ["--bootstrap", stack.bootstrap, "--topic", bank_topic]
        cli("banks", "export", "--source", "partner", "--out", str(tmp_path / "partner.csv"), *kafka)
        assert listed_pdq.hex in (tmp_path / "partner.csv").read_text()
        cli("banks", "import", str(tmp_path / "partner.csv"), "--source", "partner", *kafka)
        time.sleep(2)
        lines = cli("banks", "list", "--source", "partner", *kafka).splitlines()
        assert [json.loads(line)["entry_id"] for line in lines] == [f"partner:{listed_pdq.hex}"]

        # 6. The admin removes the decided image's entry: the next repost goes to the model.
        status, reply = json_api(console.port, admin, "DELETE", f"/api/v1/admin/banks/{urllib.parse.quote(entry_id)}")
        assert status == 202, reply
        assert json_api(console.port, admin, "DELETE", "/api/v1/admin/banks/review:nope")[0] == 404
        _wait(lambda: _metric(second, "modstream_bank_entries", bank="violating") == 1, 30, "the removal on the worker")
        after = Post(f"bank-{run}-after", "again", (url(names[0]),))
        asyncio.run(produce(stack.bootstrap, "posts", [encode(after)]))
        record = _labels(stack, {after.id})[after.id]
        assert record["route"] == "review" and record["bank"] is None
        audit = asyncio.run(
            collect(stack.bootstrap, "audit", lambda rs: False, 5, lambda r: r.get("subject") == entry_id)
        )
        assert [(a["action"], a["actor"]) for a in audit] == [("bank_entry_removed", "boss")]
    finally:
        stop_all(console, sink, second, first, server)


@pytest.mark.parametrize("hostile", ["nested", "oversized", "forged_key"])
def test_hostile_bank_records_are_refused_by_a_running_worker(
    stack: LocalStack, registry: Path, tmp_path: Path, hostile: str
) -> None:
    """A record on the bank topic that is not a well-formed update (deeply nested JSON, one over
    the size limit, an add whose key is another entry's id) is refused and counted; the worker
    keeps running and applies the good record after it."""
    run = uuid.uuid4().hex[:6]
    bank_topic = f"bank-updates-hostile-{run}"
    asyncio.run(_create_topic(stack, bank_topic))
    good = {"v": 1, "op": "add", "entry": {"entry_id": "good", "bank": "violating", "source": "t",
            "content_hash": hashlib.sha256(b"x").hexdigest(), "pdq": None, "pdq_quality": None,
            "verdicts": {"hate": 1}}}  # fmt: skip
    bad = {
        "nested": b'{"op": "add", "entry": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        "oversized": json.dumps({**good, "padding": "x" * 40_000}).encode(),
        "forged_key": json.dumps({**good, "entry": {**good["entry"], "entry_id": "victim"}}).encode(),
    }[hostile]
    asyncio.run(produce(stack.bootstrap, bank_topic, [bad, json.dumps(good).encode()], keys=[b"good", b"good"]))
    worker = Worker(stack, registry, tmp_path, f"modstream-worker-hostile-{run}", banks=True,
                    extra_args=["--bank-topic", bank_topic])  # fmt: skip
    asyncio.run(commit_to_end(stack.bootstrap, worker.app_id, "posts"))  # earlier tests' posts are not ours
    try:
        worker.start()
        assert _metric(worker, "modstream_bank_updates_total", outcome="refused") == 1
        assert _metric(worker, "modstream_bank_entries", bank="violating") == 1
        assert worker.alive
    finally:
        worker.stop()
