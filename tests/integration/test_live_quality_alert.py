"""Issue 21's end-to-end quality alert: swap the served model for a deliberately worse one and
ModstreamLiveF1BelowCard fires for it, on the series the real processes exported, while the
lag and error alerts stay silent.

The loop, every role a real process: posts -> worker (default backbones, the `make run` demo
model, `--audit-rate 1` so every post is a blind audit item) -> review sink -> console with an
oracle reviewer (each audit item answered with the post's true labels over the JSON API) ->
dataset sink (modstream_live_outcomes_total per kind, task, model version and outcome), plus
the lag exporter on the worker's and the review sink's groups.

Phase 1 serves the demo model (v0001). Phase 2 registers the same weights as v0002 with a card
whose thresholds are 0 (every post positive on every task: the negative class's F1 is 0, so
live macro-F1 is below 0.5 against a card of over 0.9), makes it CURRENT with
`modstream models --set-current --bootstrap` (which publishes the model update) and waits for
the worker's /ready to report it.

Promtool on recorded series, not a live Prometheus: the alert needs `for: 1h` over a 7-day
window, which a real server could only show after an hour of wall time (or with its clock and
TSDB faked). Instead a recorder thread scrapes every process's /metrics every STEP seconds
during the run, as Prometheus would (with `up` per target), and the test replays exactly those
samples as promtool input series, then one more hour (HOLD) of the stack standing idle and
healthy: counters flat, gauges at their last values, the lag exporter's success timestamp
moving with the clock. A labelled counter that first appears mid-run gets a 0 sample the step
before (what Prometheus's created-timestamp zero ingestion does; the processes are fresh, so
it was 0). The generated test loads deploy/prometheus/rules/modstream.rules.yml and asserts
that the quality alert fires for v0002's tasks and for nothing of v0001's, and that the lag
and error alerts stay silent at the end of the run, 5 and 10 minutes later, and at the end.

Numbers of a run (seed 21, 60 posts a phase): the demo card says macro-F1 1.0 for both tasks
and v0001 is flawless live (hate 25 tp / 35 tn, sarcasm 13 tp / 47 tn), so its upper bound is
1 and it must stay silent; v0002 says positive to all (hate and sarcasm 18 tp / 42 fp), live
macro-F1 0.23, upper bound about 0.33. This test found two bugs: a flawless sample's upper
bound came out 1 - 1e-16 < 1.0 for some n (the rule now adds 1e-9), and a version with no tn
or no tp series had no live F1 at all, so the alert could never fire on a model that says
positive to everything (the dataset sink now starts all four outcomes at 0).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.registry import ModelRegistry
from modstream.manifest import Example, read_manifest
from modstream.records import encode
from stream.demo import ensure_default_model
from stream.media_server import BackgroundMediaServer
from stream.producer import synthetic_posts
from tests.integration.conftest import copy_demo_model
from tests.integration.console_harness import Console, cli
from tests.integration.sink_harness import SinkProcess, commit_to_end
from tests.integration.stack import LocalStack, free_loopback_ports
from tests.integration.test_metric_catalogue import start, stop, wait_scrape
from tests.integration.worker_harness import Worker, collect, produce, stop_all
from tests.unit.test_prometheus_rules import RULES, promtool
from trainer.synthetic import write_synthetic

REDIS_DB = 14  # this test's review stream, apart from the other tests' databases
TASKS = ("hate", "sarcasm")
# Posts per phase. The alert needs pos_n + neg_n = 2 x verdicts >= 100 per task and version,
# so at least 50 audit verdicts each; 60 leaves room and keeps the run short.
PHASE_POSTS = 60
STEP = 5  # seconds between two scrapes: the promtool series' interval
EVALUATION = 15  # seconds between two rule evaluations, as deploy/prometheus/prometheus.yml
HOLD = 65 * 60  # seconds of idle, healthy stack replayed after the run: the alert's `for: 1h` and a margin
# The lag and error alerts (deploy/prometheus/rules/modstream.rules.yml, group modstream.stream)
# whose inputs this run records; each must stay silent. Left out: the latency alert (its
# threshold is about the posts' created_at, not an error) and the review/retrain/bank groups.
SILENT = (
    "ModstreamTargetDown",
    "ModstreamConsumerLagHigh",
    "ModstreamConsumerLagGrowing",
    "ModstreamConsumerStalled",
    "ModstreamLagUnmeasured",
    "ModstreamWorkerMetricsAbsent",
    "ModstreamNoPostsConsumed",
    "ModstreamWorkerSendBlocked",
    "ModstreamPostsLost",
    "ModstreamEvidenceWritesFailing",
    "ModstreamEvidenceMismatch",
    "ModstreamDeadLetterRateHigh",
    "ModstreamSinkDeadLetters",
    "ModstreamDependencyErrorsHigh",
    "ModstreamInferenceFailuresHigh",
    "ModstreamSinkBlocked",
    "ModstreamModelVersionsDiverge",
)

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


class Recorder:
    """Scrapes targets every STEP seconds in a thread, as Prometheus would: every counter and
    gauge sample (not histograms: no alert here reads them) with job and instance added, and
    `up` per target. `points[key][step] = value`."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}  # job -> host:port
        self.points: dict[SeriesKey, dict[int, float]] = {}
        self.started = time.time()
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.started = time.time()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape(self.steps)
            self.steps += 1
            self._stop.wait(max(0.0, self.started + self.steps * STEP - time.time()))

    def scrape(self, step: int) -> None:
        for job, address in list(self.targets.items()):
            base = (("instance", address), ("job", job))
            try:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=STEP / 2) as resp:
                    text = resp.read().decode()
            except OSError:
                self._put(("up", base), step, 0.0)
                continue
            self._put(("up", base), step, 1.0)
            for family in text_string_to_metric_families(text):
                if family.type not in ("counter", "gauge", "info"):
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    labels = tuple(sorted({**sample.labels, "job": job, "instance": address}.items()))
                    self._put((sample.name, labels), step, float(sample.value))

    def _put(self, key: SeriesKey, step: int, value: float) -> None:
        self.points.setdefault(key, {})[step] = value

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def input_series(self, hold_steps: int) -> list[dict[str, str]]:
        """promtool input series: the recorded steps, then `hold_steps` of the idle stack."""
        out = []
        last_step = self.steps - 1
        for (name, labels), points in sorted(self.points.items()):
            first = min(points)
            values: list[str] = []
            for step in range(last_step + 1):
                value = points.get(step)
                if value is None and name.endswith("_total") and step == first - 1:
                    value = 0.0  # a fresh process's labelled counter was 0 before it appeared
                if name == "modstream_lag_exporter_last_success_timestamp_seconds" and value is not None:
                    value -= self.started  # promtool's clock starts at 0 where the recording did
                values.append("_" if value is None else number(value))
            final = points.get(last_step)
            if final is not None:  # the target answered at the end: it stays up, idle
                if name == "modstream_lag_exporter_last_success_timestamp_seconds":
                    values.append(f"{number(final - self.started + STEP)}+{STEP}x{hold_steps - 1}")
                else:
                    values.append(f"{number(final)}+0x{hold_steps - 1}")
            rendered = ", ".join(f'{k}="{v}"' for k, v in labels)
            out.append({"series": f"{name}{{{rendered}}}", "values": " ".join(values)})
        return out


def number(value: float) -> str:
    """A sample value in promtool's series notation (no exponent: its `a+bxn` reads the sign)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6f}"


def live_counts(recorder: Recorder) -> dict[tuple[str, str, str], float]:
    """(model_version, task, outcome) -> audit verdicts at the last scrape."""
    out: dict[tuple[str, str, str], float] = {}
    for (name, labels), points in recorder.points.items():
        lab = dict(labels)
        if name == "modstream_live_outcomes_total" and lab.get("kind") == "audit" and recorder.steps - 1 in points:
            key = (lab["model_version"], lab["task"], lab["outcome"])
            out[key] = out.get(key, 0.0) + points[recorder.steps - 1]
    return out


def macro_f1(counts: dict[tuple[str, str, str], float], version: str, task: str) -> float:
    tp, fp, fn, tn = (counts.get((version, task, o), 0.0) for o in ("tp", "fp", "fn", "tn"))
    pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    neg = 2 * tn / (2 * tn + fp + fn) if tn + fp + fn else 1.0
    return (pos + neg) / 2


def worse_copy(registry: ModelRegistry, good: str) -> str:
    """The good version's weights (hard links) under the next version, with a card whose
    thresholds are 0: every task decided positive on every post."""
    root = registry.root
    version = f"v{int(registry.versions()[-1][1:]) + 1:04d}"
    staging = root / f".staging-{version}"
    shutil.copytree(root / good, staging, copy_function=os.link)
    card = json.loads((root / good / "card.json").read_text())
    card["version"] = version
    card["thresholds"] = {task: 0.0 for task in TASKS}
    (staging / "card.json").unlink()  # a hard link to the good card: never write through it
    (staging / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    os.replace(staging, root / version)
    return version


def run_phase(
    stack: LocalStack, console: Console, dataset_sink: SinkProcess, media_url: str, chunk: list[Example], prefix: str,
    version: str,
) -> None:  # fmt: skip
    """Posts labelled by `version`, every one an audit item decided with its true labels,
    every verdict counted by the dataset sink."""
    posts = list(synthetic_posts(chunk, media_url, len(chunk), prefix=prefix))
    truth = {p.id: chunk[i] for i, p in enumerate(posts)}
    asyncio.run(produce(stack.bootstrap, "posts", [encode(p) for p in posts]))
    labels = asyncio.run(
        collect(
            stack.bootstrap, "labels", lambda rs: len({r["post_id"] for r in rs}) >= len(posts), 300,
            lambda r: str(r.get("post_id", "")).startswith(prefix),
        )
    )  # fmt: skip
    assert {r["post_id"] for r in labels} == set(truth), "posts went unlabelled"
    assert {r["model_version"] for r in labels} == {version}
    decided: set[str] = set()
    deadline = time.monotonic() + 240
    while decided != set(truth) and time.monotonic() < deadline:
        status, claim = console.api("POST", "/api/v1/claim")
        assert status == 200, claim
        if claim.get("item") is None:
            time.sleep(0.3)  # the review sink may still be copying
            continue
        item = claim["item"]
        ex = truth.get(item["post_id"])
        if ex is None:  # not this phase's post
            body: dict[str, Any] = {"decisions": {t: {"action": "skip"} for t in TASKS}}
        else:
            assert item["kind"] == "audit", item  # --audit-rate 1: every model-labelled post
            body = {"decisions": {t: {"action": "label", "label": ex.labels[t]} for t in TASKS}}
        status, created = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body)
        assert status == 201, created
        if ex is not None:
            decided.add(item["post_id"])
    assert decided == set(truth), f"{len(set(truth) - decided)} audit items never reached the reviewer"
    want = len(truth) * len(TASKS)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if dataset_sink.metric("modstream_live_outcomes_total", kind="audit", model_version=version) >= want:
            break
        time.sleep(0.3)
    assert dataset_sink.metric("modstream_live_outcomes_total", kind="audit", model_version=version) == want


def test_a_worse_served_model_fires_the_live_quality_alert_and_nothing_else(
    stack: LocalStack, demo_model: Path, tmp_path: Path
) -> None:
    import redis

    run = uuid.uuid4().hex[:6]
    dirs = {n: tmp_path / n for n in ("registry", "reviewed", "logs", "cache", "base", "media")}
    for path in dirs.values():
        path.mkdir()
    redis_url = f"redis://127.0.0.1:{stack.redis_port}/{REDIS_DB}"
    redis.Redis(port=stack.redis_port, db=REDIS_DB).flushdb()
    registry = ModelRegistry(dirs["registry"])
    copy_demo_model(demo_model, dirs)  # trained once per session (conftest.demo_model)
    good = ensure_default_model(registry, dirs["cache"], dirs["base"])
    card_f1 = registry.card(good).metrics["macro_f1"]
    stream = read_manifest(write_synthetic(dirs["media"], n=2 * PHASE_POSTS, seed=21))
    server = BackgroundMediaServer(dirs["media"] / "images")

    logs, evidence = dirs["logs"], dirs["logs"] / "evidence"
    app_id, rs_group, ds_group = f"lq-worker-{run}", f"lq-rs-{run}", f"lq-ds-{run}"
    decisions_topic = f"reviewed-lq-{run}"
    for group, topic in ((app_id, "posts"), (rs_group, "review")):  # earlier tests' records are none of theirs
        asyncio.run(commit_to_end(stack.bootstrap, group, topic))
    worker = Worker(stack, registry.root, logs, app_id=app_id, evidence=evidence, extra_args=["--audit-rate", "1"])
    review_sink = SinkProcess(
        "review-sink", ["--bootstrap", stack.bootstrap, "--redis", redis_url, "--group", rs_group], logs, "review-sink"
    )
    dataset_sink = SinkProcess(
        "dataset-sink",
        ["--bootstrap", stack.bootstrap, "--topic", decisions_topic, "--group", ds_group,
         "--out", str(dirs["reviewed"]), "--evidence", str(evidence)],
        logs, "dataset-sink",
    )  # fmt: skip
    (exporter_port,) = free_loopback_ports(1)
    exporter = start(
        ["lag-exporter", "--bootstrap", stack.bootstrap, "--group", f"{app_id}=posts", "--group", f"{rs_group}=review",
         "--interval", "1", "--metrics-port", str(exporter_port)],
        logs / "lag-exporter.log",
    )  # fmt: skip
    recorder = Recorder()
    console: Console | None = None
    try:
        worker.start()
        review_sink.start()
        dataset_sink.start()
        wait_scrape(exporter_port, exporter, until="modstream_lag_exporter_last_success_timestamp_seconds")
        console = Console(
            ["--bootstrap", stack.bootstrap, "--redis", redis_url, "--topic", decisions_topic,
             "--evidence", str(evidence)],
            logs / "console.log", logs / "users.json",
        )  # fmt: skip
        recorder.targets = {
            "modstream-worker": f"127.0.0.1:{worker.web_port}",
            "modstream-review-sink": f"127.0.0.1:{review_sink.metrics_port}",
            "modstream-dataset-sink": f"127.0.0.1:{dataset_sink.metrics_port}",
            "modstream-lag-exporter": f"127.0.0.1:{exporter_port}",
        }
        recorder.start()

        run_phase(stack, console, dataset_sink, server.url, stream[:PHASE_POSTS], f"lq-{run}-good-", good)
        worse = worse_copy(registry, good)
        cli("models", "--registry", str(registry.root), "--set-current", worse, "--bootstrap", stack.bootstrap)
        worker.wait_model(worse)
        run_phase(stack, console, dataset_sink, server.url, stream[PHASE_POSTS:], f"lq-{run}-worse-", worse)
        time.sleep(3 * STEP)  # the last verdicts and the caught-up lag in a few scrapes
    finally:
        recorder.stop()
        stop_all(console, review_sink, dataset_sink, worker, server)
        stop(exporter)
    wall = time.time() - recorder.started

    counts = live_counts(recorder)
    live = {(v, t): macro_f1(counts, v, t) for v in (good, worse) for t in TASKS}
    summary = (
        f"recorded {recorder.steps} scrapes over {wall:.0f} s; card macro-F1 {card_f1}; live macro-F1 "
        + ", ".join(f"{v}/{t} {f:.3f}" for (v, t), f in live.items())
        + f"; audit verdicts {json.dumps({'/'.join(k): v for k, v in sorted(counts.items())})}"
    )
    print(summary)
    for task in TASKS:
        assert live[(worse, task)] < 0.5, summary  # the worse card really is worse
    cards = {dict(labels)["model_version"] for (name, labels), points in recorder.points.items()
             if name == "modstream_model_card_macro_f1" and recorder.steps - 1 in points}  # fmt: skip
    assert cards == {good, worse}, f"the worker's card gauges at the end: {cards}"

    hold_steps = HOLD // STEP
    end_of_run = (recorder.steps - 1) * STEP // EVALUATION * EVALUATION
    final = ((recorder.steps - 1) * STEP + hold_steps * STEP) // EVALUATION * EVALUATION
    silent_at = [end_of_run, end_of_run + 5 * 60, end_of_run + 10 * 60, final]
    test_file = tmp_path / "live_quality_recorded.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": f"{EVALUATION}s",
                "tests": [
                    {
                        "interval": f"{STEP}s",
                        "input_series": recorder.input_series(hold_steps),
                        "promql_expr_test": [
                            {
                                # Fires for each task of the worse version, for nothing of the good one.
                                "expr": 'ALERTS{alertname="ModstreamLiveF1BelowCard", alertstate="firing"}',
                                "eval_time": f"{final}s",
                                "exp_samples": [
                                    {
                                        "labels": (
                                            'ALERTS{alertname="ModstreamLiveF1BelowCard", alertstate="firing", '
                                            f'severity="warning", task="{task}", model_version="{worse}"}}'
                                        ),
                                        "value": 1,
                                    }
                                    for task in TASKS
                                ],
                            }
                        ],
                        "alert_rule_test": [
                            {"eval_time": f"{at}s", "alertname": name, "exp_alerts": []}
                            for at in silent_at
                            for name in SILENT
                        ],
                    }
                ],
            },
            sort_keys=False,
            width=1 << 20,
        )
    )
    promtool("test", "rules", str(test_file))
