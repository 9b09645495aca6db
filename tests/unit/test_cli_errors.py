"""The CLI as a new user meets it: each user error is one line on stderr naming the input and
what to do, exit 1 (2 for usage), no traceback unless -v. Run as real subprocesses, because
what matters is what the terminal shows (warnings at exit included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.stack import free_loopback_ports

REPO = Path(__file__).resolve().parents[2]


def modstream(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "modstream.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_classify_a_missing_file(tmp_path):
    result = modstream("classify", str(tmp_path / "missing.jsonl"), "--registry", str(tmp_path / "reg"))
    assert result.returncode == 1
    line = one_error_line(result)
    assert str(tmp_path / "missing.jsonl") in line and "check the path" in line


def test_train_on_a_bad_manifest(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x", "labels": {}}\n{not json\n')
    result = modstream("train", "--manifest", str(bad), "--registry", str(tmp_path / "reg"))
    assert result.returncode == 1
    line = one_error_line(result)
    assert f"{bad}:2" in line and "invalid JSON" in line and "fix that line" in line


def test_classify_with_an_unknown_model_version(tmp_path):
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": "a", "text": "hello"}\n')
    registry = tmp_path / "reg"
    registry.mkdir()
    result = modstream("classify", str(posts), "--model", "v0099", "--registry", str(registry))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "'v0099'" in line and f"modstream models --registry {registry}" in line


def test_produce_to_an_unreachable_broker_closes_its_producer(tmp_path):
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": "a", "text": "hello"}\n')
    (port,) = free_loopback_ports(1)  # nothing listens there
    result = modstream("produce", "--bootstrap", f"127.0.0.1:{port}", "--input", str(posts))
    assert result.returncode == 1
    line = one_error_line(result)  # also: no "Unclosed AIOKafkaProducer" warning after it
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in line and "--bootstrap" in line


def test_verbose_shows_the_traceback_too(tmp_path):
    result = modstream("-v", "classify", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr
    assert "check the path" in result.stderr.splitlines()[-1]
    after = modstream("classify", "-v", str(tmp_path / "missing.jsonl"))  # -v after the command works too
    assert after.returncode == 1 and "Traceback" in after.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("train",), "--manifest"),  # neither --manifest nor --preset
        (("produce", "-n", "3"), "--media-url"),
        (("classify",), "the following arguments are required: input"),  # argparse's own
        (("dlq", "replay", "--since", "yesterday"), "not an ISO 8601 time"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, needle):
    result = modstream(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_role_and_no_promises():
    result = modstream("--help")
    assert result.returncode == 0
    for role in ("worker", "review-sink", "dataset-sink", "review", "retrain", "dlq", "schemas"):
        assert role in result.stdout
    assert "join" not in result.stdout and "later" not in result.stdout
