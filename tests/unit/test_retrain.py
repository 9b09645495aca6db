"""The retraining job end to end on tiny random backbones (frozen, features cached).

The current model v0001 is trained for 2 epochs on 400 synthetic posts, so it is mediocre;
reviewed posts are 600 more synthetic posts with reviewer labels. A candidate fine-tuned on
correct labels beats it; one fine-tuned on flipped labels gets worse on the base holdout
(its true labels) even though it does well on the (equally flipped) reviewed holdout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from models.registry import ModelRegistry
from modstream.manifest import Example, read_manifest
from tests.tiny import tiny_config, tiny_model
from trainer.fit import fit
from trainer.holdout import ids_digest, in_base_holdout, in_reviewed_holdout, resolvable_drop
from trainer.synthetic import generate
from trainer.train import TrainConfig

BASE_SOURCE = {"preset": "synthetic", "n": 400, "seed": 5, "image_size": 32}
FLIP = {"hateful": "not_hateful", "not_hateful": "hateful", "sarcastic": "not_sarcastic", "not_sarcastic": "sarcastic"}
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


def write_reviewed(
    folder: Path,
    n: int,
    seed: int,
    *,
    flip: bool = False,
    first: int = 0,
    image_size: int = 32,
    audit_every: int = 0,
) -> list[Example]:
    """A reviewed dataset as the dataset sink writes it: media/<sha256>.png, one line per post,
    meta.decision_id and meta.decided_at (one minute apart, in order); with `audit_every`, every
    such line is a blind audit verdict (meta.kind audit). Appends to an existing one."""
    generated = generate(first + n, seed, folder / ".generated", image_size=image_size)[first:]
    (folder / "media").mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()] if manifest.exists() else []
    for i, ex in enumerate(generated, start=first):
        assert ex.image is not None
        data = ex.image.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (folder / "media" / f"{digest}.png").write_bytes(data)
        labels = {t: (FLIP[v] if flip and v else v) for t, v in ex.labels.items()}
        meta = {
            "decision_id": f"dec-{seed}-{i}",
            "decided_at": (T0 + timedelta(minutes=i)).isoformat(timespec="milliseconds"),
            "reviewer": "alice",
            "model_version": "v0001",
            "kind": "audit" if audit_every and i % audit_every == 0 else "routed",
        }
        lines.append(
            {"id": f"post-{seed}-{i}", "text": ex.text, "image": f"media/{digest}.png", "labels": labels, "meta": meta}
        )
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_manifest(manifest)


def make_registry(root: Path, work: Path, cache: Path, *, record_source: bool = True) -> None:
    """v0001: tiny backbones, 2 epochs on the base data (all of it, as a first model is)."""
    from trainer.retrain import load_base

    examples = load_base(BASE_SOURCE, work)
    cfg = tiny_config()
    fitted = fit(
        examples,
        cfg,
        TrainConfig(epochs=2),
        cache_dir=cache,
        model_and_tokenizer=tiny_model(cfg),
        probe_blend=False,  # v0001 must stay the weak 2-epoch head the gate tests improve on
    )
    if record_source:
        fitted.card.training["data_source"] = dict(BASE_SOURCE)
    ModelRegistry(root).save(fitted.model, fitted.tokenizer, fitted.card)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A registry with v0001, base data and the feature cache, built once and copied per test."""
    home = tmp_path_factory.mktemp("retrain-home")
    make_registry(home / "registry", home / "work", home / "cache")
    return home


@pytest.fixture
def home(seeded: Path, tmp_path: Path) -> Path:
    shutil.copytree(seeded, tmp_path / "home")
    return tmp_path / "home"


def options(home: Path, publisher: Any = None, **overrides: Any) -> Any:
    from trainer.retrain import RetrainOptions

    kwargs: dict[str, Any] = dict(
        registry=home / "registry",
        reviewed=home / "reviewed",
        work_dir=home / "work",
        cache_dir=home / "cache",
        device="cpu",
        min_new=50,
        epochs=20,
        publisher=publisher,
    )
    kwargs.update(overrides)
    return RetrainOptions(**kwargs)


class Recorder:
    """A publisher that records messages and what CURRENT said when each was sent."""

    def __init__(self, registry: Path) -> None:
        self.registry = ModelRegistry(registry)
        self.sent: list[tuple[dict[str, Any], str | None]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        self.sent.append((message, self.registry.current()))


def test_too_few_new_decisions_skips_without_training(home):
    from trainer.retrain import run_retrain

    write_reviewed(home / "reviewed", 30, seed=11)
    outcome = run_retrain(options(home))
    assert outcome.status == "skipped" and outcome.new_decisions == 30
    assert "30 new labelled decision(s)" in outcome.message and "needs 50" in outcome.message
    assert ModelRegistry(home / "registry").versions() == ["v0001"]


def test_a_card_without_a_data_source_asks_for_base_data(tmp_path, seeded):
    from trainer.retrain import RetrainError, run_retrain

    home = tmp_path / "home"
    make_registry(home / "registry", seeded / "work", seeded / "cache", record_source=False)
    with pytest.raises(RetrainError, match=r"--base-manifest FILE or --base-preset synthetic"):
        run_retrain(options(home, force=True))


def test_promoted_candidate_becomes_current_then_is_published_and_its_card_explains(home, monkeypatch):
    """Also the acceptance claim's second half: correct review labels give a promoted candidate."""
    import trainer.retrain as retrain

    reviewed = write_reviewed(home / "reviewed", 600, seed=11, audit_every=10)
    audited = {e.id for e in reviewed if e.meta["kind"] == "audit"}
    trained: list[str] = []

    def spy_fit(examples, *args, **kwargs):
        trained.extend(ex.id for ex in examples)
        return fit(examples, *args, **kwargs)

    monkeypatch.setattr(retrain, "fit", spy_fit)
    recorder = Recorder(home / "registry")
    outcome = retrain.run_retrain(options(home, recorder))

    assert outcome.status == "promoted", retrain.describe(outcome)
    registry = ModelRegistry(home / "registry")
    assert registry.current() == "v0002" == outcome.version
    # Published once, after CURRENT already named the new version.
    assert recorder.sent == [({"v": 1, "version": "v0002", "parent": "v0001", "reason": "retrain"}, "v0002")]

    card = registry.card("v0002")
    training, promotion = card.training, card.metrics["promotion"]
    assert training["parent_version"] == "v0001" and training["data_source"] == BASE_SOURCE
    assert len(training["data_digest"]) == 64
    # Holdouts: a fifth of the reviewed posts and a tenth of the base data, each by a hash of the id.
    held = [e for e in reviewed if in_reviewed_holdout(e.id) and e.id not in audited]
    assert training["holdouts"]["reviewed"]["ids"] == sorted(e.id for e in held)
    assert training["reviewed"]["holdout_digest"] == ids_digest(e.id for e in held)
    assert training["reviewed"]["n_used"] == 540 - len(held) and training["reviewed"]["new_decisions"] == 600
    # The blind audit verdicts are a holdout of their own, never trained on.
    assert training["holdouts"]["audit"]["n"] == len(audited) == 60 and not audited & set(trained)
    assert training["holdouts"]["reviewed"]["resolvable_drop"] == resolvable_drop(len(held))
    base_holdout = training["holdouts"]["base"]
    assert 20 <= base_holdout["n"] <= 60
    assert base_holdout["current_may_have_seen"] and "v0001" in base_holdout["note"]
    # Nothing held out was trained on.
    assert len(trained) == 400 - base_holdout["n"] + 540 - len(held)
    assert not set(trained) & set(training["holdouts"]["reviewed"]["ids"])
    assert not any(in_base_holdout(i) for i in trained if i.startswith("syn-"))

    # Cards stay comparable: validation reported per source, and the ITM interval kept.
    by_source = card.metrics["by_source"]
    assert by_source["base"]["n"] > 0 and by_source["reviewed"]["n"] > 0
    assert set(by_source["reviewed"]["macro_f1"]) == {"hate", "sarcasm"}
    assert all(isinstance(v, float) and v == v for v in card.itm["auroc_ci"]), card.itm["auroc_ci"]

    evaluation = card.metrics["evaluation"]
    for holdout in ("base", "reviewed", "audit"):
        for model in ("current", "candidate"):
            assert set(evaluation[holdout][model]["macro_f1"]) == {"hate", "sarcasm"}
        assert evaluation[holdout]["current_version"] == "v0001"
        for task in ("hate", "sarcasm"):
            assert evaluation[holdout]["candidate"]["macro_f1"][task] > evaluation[holdout]["current"]["macro_f1"][task]
    assert promotion["promoted"] is True and promotion["margin"] == 0.02
    assert promotion["why"].startswith("Promoted") and "holdout" in promotion["why"]

    gate = json.loads((registry.root / "v0002" / "gate.json").read_text())
    assert gate["promoted"] and gate["version"] == "v0002" and len(gate["checks"]) == 12  # 3 x (2 F1, ITM, lift)
    assert {c["verdict"] for c in gate["checks"] if c["holdout"] == "audit" and c["metric"] == "macro_f1"} == {"pass"}
    itm = [c for c in gate["checks"] if c["metric"] == "itm_auroc"]
    assert [c["holdout"] for c in itm] == ["base", "reviewed", "audit"] and itm[0]["drop_ci"] is not None
    # Reviewed pairs carry no image-text answer here: no known pairs, so not gated on them.
    assert itm[1]["n"] == 0 and itm[1]["verdict"] == "not enough evidence"
    assert "_itm_pairs" not in json.dumps(gate), "raw scores stay out of the report"
    assert (registry.root / "v0002" / "gate.png").stat().st_size > 5000
    # The summary table shows both models on both holdouts.
    table = retrain.describe(outcome)
    assert "current v0001" in table and "candidate v0002" in table and "PROMOTED" in table
    assert table.count("reviewed ") >= 2 and "v0002 is now CURRENT" in table


def test_candidate_trained_on_flipped_labels_is_refused_kept_and_says_why(home):
    """The acceptance claim: a deliberately worse candidate is refused, and its card says why."""
    from trainer.retrain import describe, run_retrain

    write_reviewed(home / "reviewed", 600, seed=11, flip=True)
    recorder = Recorder(home / "registry")
    outcome = run_retrain(options(home, recorder))

    assert outcome.status == "refused", describe(outcome)
    registry = ModelRegistry(home / "registry")
    assert registry.versions() == ["v0001", "v0002"] and registry.current() == "v0001"
    assert recorder.sent == []
    card = registry.card("v0002")
    promotion = card.metrics["promotion"]
    assert promotion["promoted"] is False
    # The flipped reviewed holdout agrees with the candidate; the base holdout's true labels do not.
    assert "on the base holdout" in promotion["why"] and "margin 0.020" in promotion["why"]
    base = card.metrics["evaluation"]["base"]
    worst = max(("hate", "sarcasm"), key=lambda t: base["current"]["macro_f1"][t] - base["candidate"]["macro_f1"][t])
    assert f"{worst} on the base holdout: candidate {base['candidate']['macro_f1'][worst]:.3f}" in promotion["why"]
    assert (registry.root / "v0002" / "gate.png").is_file()

    # The refused candidate counts as trained: the same decisions do not trigger another run.
    again = run_retrain(options(home, recorder))
    assert again.status == "skipped" and again.new_decisions == 0
    assert "since v0002" in again.message


def test_new_decisions_after_a_run_are_counted_from_that_run(home):
    from trainer.retrain import run_retrain

    write_reviewed(home / "reviewed", 60, seed=11)
    first = run_retrain(options(home, epochs=1, min_holdout=5))
    assert first.status in ("promoted", "refused") and first.new_decisions == 60
    write_reviewed(home / "reviewed", 20, seed=11, first=60)
    second = run_retrain(options(home, epochs=1))
    assert second.status == "skipped" and second.new_decisions == 20


def test_watch_counts_failed_runs_and_keeps_going(tmp_path):
    from trainer.retrain import watch

    def failed() -> float:
        return REGISTRY.get_sample_value("modstream_retrain_runs_total", {"outcome": "failed"}) or 0.0

    before = failed()
    stop, seen = threading.Event(), []

    def on_outcome(outcome):
        seen.append(outcome)
        if len(seen) == 3:
            stop.set()

    # An empty registry: every run fails (no current model), the loop carries on.
    watch(options(tmp_path), interval_s=0.01, stop=stop, on_outcome=on_outcome)
    assert seen == [None, None, None]
    assert failed() == before + 3
    assert (REGISTRY.get_sample_value("modstream_retrain_last_run_timestamp_seconds") or 0) > 0


def test_cli_skips_and_reports_errors(home, capsys):
    from modstream.cli import main

    write_reviewed(home / "reviewed", 10, seed=11)
    common = ["retrain", "--registry", str(home / "registry"), "--cache", str(home / "cache"), "--device", "cpu"]
    common += ["--reviewed", str(home / "reviewed"), "--work", str(home / "work"), "--no-publish", "--quiet"]
    assert main(common) == 0
    assert "10 new labelled decision(s)" in capsys.readouterr().out
    assert main([*common, "--force", "--base-manifest", str(home / "missing.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "retrain failed: base manifest" in err and "missing.jsonl does not exist" in err
    with pytest.raises(SystemExit):
        main([*common, "--margin", "-1"])


def test_a_failed_publish_leaves_the_promotion_in_place_and_is_counted(home):
    from trainer.retrain import describe, record, run_retrain

    def broken(message):
        raise ConnectionError("broker unreachable")

    write_reviewed(home / "reviewed", 600, seed=11)
    outcome = run_retrain(options(home, broken))
    assert outcome.status == "promoted" and not outcome.published
    assert ModelRegistry(home / "registry").current() == "v0002"  # CURRENT moved before the send
    assert "broker unreachable" in (outcome.publish_error or "")
    assert "NOT published" in describe(outcome)

    def count() -> float:
        return REGISTRY.get_sample_value("modstream_retrain_runs_total", {"outcome": "publish_failed"}) or 0.0

    before = count()
    record(outcome)
    assert count() == before + 1
    evaluation = ModelRegistry(home / "registry").card("v0002").metrics["evaluation"]
    gauge = REGISTRY.get_sample_value("modstream_retrain_candidate_macro_f1", {"task": "hate", "holdout": "reviewed"})
    assert gauge == pytest.approx(evaluation["reviewed"]["candidate"]["macro_f1"]["hate"])


def test_kafka_publisher_raises_when_no_broker_answers():
    from aiokafka.errors import KafkaConnectionError

    from modstream.updates import kafka_publisher
    from tests.integration.stack import free_loopback_ports

    (port,) = free_loopback_ports(1)
    with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
        kafka_publisher(f"127.0.0.1:{port}", timeout_s=5)({"version": "v0002", "parent": "v0001", "reason": "retrain"})


def test_a_second_run_on_the_same_registry_is_refused_while_one_runs(tmp_path):
    import fcntl

    from trainer.retrain import RetrainError, run_retrain

    root = tmp_path / "registry"
    root.mkdir()
    with (root / ".retrain.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RetrainError, match="another retraining run is using"):
            run_retrain(options(tmp_path))
    # Released: the next run gets past the lock (and fails for its own reason, no model yet).
    with pytest.raises(RetrainError, match="no current model"):
        run_retrain(options(tmp_path))


def test_cli_publish_current_reports_a_broker_it_cannot_reach(home, capsys):
    from modstream.cli import main
    from tests.integration.stack import free_loopback_ports

    (port,) = free_loopback_ports(1)
    args = ["retrain", "--registry", str(home / "registry"), "--publish-current", "--bootstrap", f"127.0.0.1:{port}"]
    assert main(args) == 1
    assert "could not publish the current model" in capsys.readouterr().err
    assert main(["retrain", "--registry", str(home / "nothing"), "--publish-current"]) == 1
    assert "no current model" in capsys.readouterr().err


def test_cli_watch_serves_metrics_and_survives_failed_runs(tmp_path):
    """The operator's view of --watch: failing runs (no model yet) are counted on /metrics and
    the loop goes on."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.integration.stack import free_loopback_ports

    (port,) = free_loopback_ports(1)
    cmd = [sys.executable, "-m", "modstream.cli", "retrain", "--registry", str(tmp_path / "empty"), "--watch"]
    cmd += ["--interval", "0.2", "--metrics-port", str(port), "--reviewed", str(tmp_path / "reviewed"), "--quiet"]
    env = {**os.environ, "MODSTREAM_HOME": str(tmp_path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed, deadline = 0.0, time.monotonic() + 60
    try:
        while failed < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith('modstream_retrain_runs_total{outcome="failed"}'):
                    failed = float(line.split()[-1])
        assert proc.poll() is None, "the watch loop exited"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert failed >= 2, out
    assert "retraining run failed" in out and "no current model" in out


def test_a_rollback_during_the_run_is_not_overridden_by_the_candidate(home, monkeypatch):
    """An operator moves CURRENT while the candidate trains: the candidate was gated against a
    model that no longer serves, so it is kept but not promoted, and nothing is published."""
    import trainer.retrain as retrain

    write_reviewed(home / "reviewed", 600, seed=11)
    registry = ModelRegistry(home / "registry")

    def fit_while_the_operator_rolls(examples, *args, **kwargs):
        shutil.copytree(registry.root / "v0001", registry.root / "v0002")  # "another version"
        registry.set_current("v0002")
        return fit(examples, *args, **kwargs)

    monkeypatch.setattr(retrain, "fit", fit_while_the_operator_rolls)
    recorder = Recorder(home / "registry")
    outcome = retrain.run_retrain(options(home, recorder))

    assert outcome.status == "refused" and outcome.version == "v0003"
    assert registry.current() == "v0002" and recorder.sent == []
    promotion = registry.card("v0003").metrics["promotion"]
    assert not promotion["promoted"] and "CURRENT moved from v0001 to v0002" in promotion["why"]


def test_a_rollback_while_the_candidate_is_saved_is_not_overridden(home, monkeypatch):
    """The narrower race: CURRENT moves after the run's last check, while the promoted
    candidate is being written. The promotion is a compare and set, so the operator's choice
    stands and the candidate's card and gate report say it was not promoted."""
    import trainer.retrain as retrain

    write_reviewed(home / "reviewed", 600, seed=11)
    registry = ModelRegistry(home / "registry")
    save = ModelRegistry.save

    def save_while_the_operator_rolls(self, *args, **kwargs):
        version = save(self, *args, **kwargs)
        shutil.copytree(self.root / "v0001", self.root / "v0003")  # "another version"
        self.set_current("v0003")
        return version

    monkeypatch.setattr(ModelRegistry, "save", save_while_the_operator_rolls)
    recorder = Recorder(home / "registry")
    outcome = retrain.run_retrain(options(home, recorder))

    assert outcome.status == "refused" and outcome.version == "v0002", outcome.message
    assert "passed its gate" in outcome.message  # the gate promoted it; only the race stopped it
    assert registry.current() == "v0003" and recorder.sent == []
    promotion = registry.card("v0002").metrics["promotion"]
    assert not promotion["promoted"] and "CURRENT moved from v0001 to v0003" in promotion["why"]
    gate = json.loads((registry.root / "v0002" / "gate.json").read_text())
    assert gate["promoted"] is False


def test_set_current_with_expect_is_a_compare_and_set(home):
    from models.registry import CurrentMoved

    registry = ModelRegistry(home / "registry")
    shutil.copytree(registry.root / "v0001", registry.root / "v0002")
    with pytest.raises(CurrentMoved) as moved:
        registry.set_current("v0002", expect="v0002")
    assert moved.value.now == "v0001" and registry.current() == "v0001"  # nothing changed
    registry.set_current("v0002", expect="v0001")
    assert registry.current() == "v0002"
