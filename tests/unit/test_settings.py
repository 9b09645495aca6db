"""Settings from the environment, a secrets folder and a TOML config file (modstream/settings.py):
their precedence, flags still winning, secrets never shown, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modstream import settings
from modstream.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
VARS = ("MODSTREAM_KAFKA_BOOTSTRAP", "MODSTREAM_REDIS_URL", "MODSTREAM_CONFIG", "MODSTREAM_SECRETS_DIR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    settings.current.cache_clear()
    yield
    settings.current.cache_clear()


def worker_args(argv: list[str]) -> tuple[str, str]:
    settings.current.cache_clear()
    args = build_parser(["worker", *argv]).parse_args(["worker", *argv])
    return args.bootstrap, args.redis


def test_defaults_without_any_setting() -> None:
    assert worker_args([]) == ("127.0.0.1:19092", "redis://127.0.0.1:16379/0")


def test_precedence_flag_then_env_then_secrets_folder_then_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "modstream.toml"
    config.write_text('kafka_bootstrap = "from-file:9092"\nredis_url = "redis://from-file:6379/0"\n')
    monkeypatch.setenv("MODSTREAM_CONFIG", str(config))
    assert worker_args([]) == ("from-file:9092", "redis://from-file:6379/0")

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "MODSTREAM_REDIS_URL").write_text("redis://:from-secret@r:6379/0")
    monkeypatch.setenv("MODSTREAM_SECRETS_DIR", str(secrets))
    assert worker_args([]) == ("from-file:9092", "redis://:from-secret@r:6379/0")

    monkeypatch.setenv("MODSTREAM_KAFKA_BOOTSTRAP", "from-env:9092")
    monkeypatch.setenv("MODSTREAM_REDIS_URL", "redis://from-env:6379/0")
    assert worker_args([]) == ("from-env:9092", "redis://from-env:6379/0")

    assert worker_args(["--bootstrap", "flag:9092", "--redis", ""]) == ("flag:9092", "")


def test_every_role_takes_kafka_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODSTREAM_KAFKA_BOOTSTRAP", "k:1")
    for argv in (["review-sink"], ["dataset-sink"], ["lag-exporter"], ["dlq", "replay"], ["retrain"], ["produce"]):
        settings.current.cache_clear()
        assert build_parser(argv).parse_args(argv).bootstrap == "k:1", argv


def test_a_secret_is_not_shown_by_help_or_by_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODSTREAM_REDIS_URL", "redis://:hunter2-secret@r:6379/0")
    assert "hunter2" not in repr(settings.load())
    done = subprocess.run(
        [sys.executable, "-m", "modstream", "worker", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "--redis" in done.stdout
    assert "hunter2" not in done.stdout + done.stderr


def test_a_missing_config_file_or_secrets_folder_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODSTREAM_CONFIG", str(tmp_path / "nope.toml"))
    assert main(["worker", "--help"]) == 2
    err = capsys.readouterr().err
    assert "MODSTREAM_CONFIG" in err and "no such file" in err
    monkeypatch.delenv("MODSTREAM_CONFIG")
    monkeypatch.setenv("MODSTREAM_SECRETS_DIR", str(tmp_path / "missing"))
    settings.current.cache_clear()
    assert main(["worker", "--help"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_malformed_config_file_names_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("kafka_bootstrap = [unclosed\n")
    monkeypatch.setenv("MODSTREAM_CONFIG", str(bad))
    with pytest.raises(settings.SettingsError, match="settings"):
        settings.load()
