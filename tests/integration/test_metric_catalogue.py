"""Each role, started for real, exports exactly the metrics docs/metrics.md lists for it: every
catalogued metric present (with its type and labels), nothing undocumented. The standard
process_* / python_* collector metrics are ignored (the catalogue says so); metrics marked
*CUDA only* may be absent."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from modstream.records import Post, encode
from tests.integration.sink_harness import SinkProcess, commit_to_end
from tests.integration.stack import LocalStack, free_loopback_ports
from tests.integration.worker_harness import REPO_ROOT, Worker, produce, register_tiny_model
from tests.metric_catalogue import read_catalogue

IGNORED_PREFIXES = ("process_", "python_")


def exported(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """Exposed family name (counters with `_total`) -> (type, the label sets of its samples)."""
    families = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(IGNORED_PREFIXES):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        label_sets = {frozenset(k for k in s.labels if k not in ("le", "quantile")) for s in family.samples}
        families[name] = (family.type, label_sets)
    return families


def check_role(role: str, text: str) -> None:
    catalogue = read_catalogue()[role]
    got = exported(text)
    for name in [n for n in got if n.endswith("_created")]:
        # The client's creation timestamps of counters and histograms, one per catalogued metric.
        base = name.removesuffix("_created")
        if base + "_total" in catalogue or catalogue.get(base, None) is not None:
            del got[name]
    required = {name for name, entry in catalogue.items() if not entry.cuda_only}
    assert required - set(got) == set(), f"{role}: catalogued metrics not exported"
    assert set(got) - set(catalogue) == set(), f"{role}: exported metrics missing from docs/metrics.md"
    for name, (kind, label_sets) in got.items():
        entry = catalogue[name]
        assert kind == entry.type, f"{role}: {name} is a {kind}, catalogued as {entry.type}"
        for labels in label_sets:
            assert labels == entry.labels, f"{role}: {name} has labels {sorted(labels)}, not {sorted(entry.labels)}"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def wait_scrape(port: int, proc: subprocess.Popen[bytes], until: str = "", timeout: float = 120) -> str:
    """/metrics once it answers (and contains `until`); fails early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        try:
            text = scrape(port)
            if until in text:
                return text
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"/metrics on {port} did not show {until!r} within {timeout} s")


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "modstream.cli", *args], cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=full_env)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_worker_exports_its_catalogue(stack: LocalStack, tmp_path: Path) -> None:
    register_tiny_model(tmp_path / "registry")
    app_id = "it-catalogue-worker"
    asyncio.run(commit_to_end(stack.bootstrap, app_id, "posts"))
    worker = Worker(stack, tmp_path / "registry", tmp_path, app_id=app_id)
    worker.start()
    try:
        # A few labelled posts (one with created_at) so the labelled series carry samples to check.
        posts = [Post(id=f"catalogue-{i}", text=f"post {i}", created_at="2026-01-01T00:00:00+00:00") for i in range(3)]
        asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in posts]))
        deadline = time.monotonic() + 90
        text = worker.metrics()
        while time.monotonic() < deadline and not (
            "modstream_labels_total{" in text and "modstream_consumer_topic_lag{" in text
        ):
            time.sleep(0.5)
            text = worker.metrics()
        assert "modstream_labels_total{" in text, worker.log_tail()
        assert "modstream_consumer_topic_lag{" in text, worker.log_tail()
        check_role("worker", text)
    finally:
        worker.stop()


def test_sinks_export_their_catalogue(stack: LocalStack, tmp_path: Path) -> None:
    common = ["--bootstrap", stack.bootstrap]
    review = SinkProcess(
        "review-sink", [*common, "--redis", stack.redis_url, "--group", "it-catalogue-review"], tmp_path, "review"
    )
    dataset = SinkProcess(
        "dataset-sink",
        [*common, "--group", "it-catalogue-dataset", "--out", str(tmp_path / "reviewed")],
        tmp_path,
        "ds",
    )
    for sink, role in ((review, "review-sink"), (dataset, "dataset-sink")):
        sink.start()
        try:
            deadline = time.monotonic() + 60  # the lag monitor's first reading
            while "modstream_consumer_topic_lag{" not in sink.metrics() and time.monotonic() < deadline:
                time.sleep(0.3)
            check_role(role, sink.metrics())
        finally:
            sink.stop()


def test_review_console_exports_its_catalogue_on_the_ops_port(stack: LocalStack, tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    subprocess.run(
        [sys.executable, "-m", "modstream.cli", "review", "add-user", "ops", "--password-stdin", "--users", str(users),
         "--bootstrap", stack.bootstrap],
        input=b"a long enough password\n", cwd=REPO_ROOT, check=True, capture_output=True,
    )  # fmt: skip
    port, ops_port = free_loopback_ports(2)
    args = ["review", "serve", "--port", str(port), "--ops-port", str(ops_port), "--users", str(users)]
    args += ["--bootstrap", stack.bootstrap, "--redis", stack.redis_url, "--insecure-cookies"]
    proc = start(args, tmp_path / "console.log")
    try:
        check_role("review-console", wait_scrape(ops_port, proc, until="modstream_review_queue_depth"))
    finally:
        stop(proc)


def test_retrain_watch_exports_its_catalogue(tmp_path: Path) -> None:
    register_tiny_model(tmp_path / "registry")
    (tmp_path / "reviewed").mkdir()
    (port,) = free_loopback_ports(1)
    args = ["retrain", "--registry", str(tmp_path / "registry"), "--reviewed", str(tmp_path / "reviewed")]
    args += [
        "--work",
        str(tmp_path / "work"),
        "--watch",
        "--interval",
        "0.5",
        "--metrics-port",
        str(port),
        "--no-publish",
        "--quiet",
    ]
    proc = start(args, tmp_path / "retrain.log", env={"MODSTREAM_HOME": str(tmp_path)})
    try:
        # After a first run has ended (skipped: no new decisions), its gauges carry samples too.
        check_role("retrain", wait_scrape(port, proc, until="modstream_retrain_last_run_timestamp_seconds "))
    finally:
        stop(proc)


def test_lag_exporter_exports_its_catalogue(stack: LocalStack, tmp_path: Path) -> None:
    (port,) = free_loopback_ports(1)
    asyncio.run(commit_to_end(stack.bootstrap, "it-catalogue-exporter", "posts"))
    args = ["lag-exporter", "--bootstrap", stack.bootstrap, "--group", "it-catalogue-exporter=posts"]
    proc = start([*args, "--interval", "0.5", "--metrics-port", str(port)], tmp_path / "lag-exporter.log")
    try:
        check_role(
            "lag-exporter", wait_scrape(port, proc, until="modstream_lag_exporter_last_success_timestamp_seconds{")
        )
    finally:
        stop(proc)
