"""`modstream review ...` argument parsing and the account commands (no services)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from modstream.cli import build_parser, main


def test_serve_defaults_match_the_documented_ones() -> None:
    args = build_parser().parse_args(["review", "serve"])
    assert (args.host, args.port, args.bootstrap, args.redis) == (
        "127.0.0.1",
        8080,
        "127.0.0.1:19092",
        "redis://127.0.0.1:16379/0",
    )
    assert (args.users, args.claim_timeout, args.max_deliveries) == ("var/review-users.json", 300.0, 5)
    assert args.evidence == "var/evidence" and not args.insecure_cookies


def test_review_needs_an_action() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["review"])


def test_add_user_token_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    users = str(tmp_path / "users.json")
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    add = ["review", "add-user", "dana", "--role", "admin", "--password-stdin", "--users", users, "--no-audit"]
    assert main(add) == 0
    assert "leaves no record on the audit topic" in capsys.readouterr().err
    record = json.loads(Path(users).read_text())["users"]["dana"]
    assert record["role"] == "admin" and record["password_hash"].startswith("$argon2id$")
    capsys.readouterr()
    assert main(["review", "token", "dana", "--users", users, "--no-audit"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("mst_") and token not in Path(users).read_text()
    assert main(["review", "remove-user", "dana", "--users", users, "--no-audit"]) == 0
    assert main(["review", "remove-user", "dana", "--users", users, "--no-audit"]) == 2
    assert "no user 'dana'" in capsys.readouterr().err


def test_a_user_change_that_cannot_be_audited_is_not_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tests.integration.stack import free_loopback_ports

    users = str(tmp_path / "users.json")
    (dead,) = free_loopback_ports(1)  # no broker listens there
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    args = ["review", "add-user", "mallory", "--password-stdin", "--users", users]
    assert main([*args, "--bootstrap", f"127.0.0.1:{dead}", "--audit-timeout", "2"]) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert not Path(users).exists(), "a user was added without an audit record"


def test_bad_input_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    users = str(tmp_path / "users.json")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["review", "add-user", "eve", "--password-stdin", "--users", users]) == 2
    assert "at least" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["review", "add-user", "bad name", "--password-stdin", "--users", users]) == 2
    assert "user name" in capsys.readouterr().err
    assert not Path(users).exists(), "nothing is written when the input is refused"
    assert main(["review", "import-label-studio", str(tmp_path / "missing.json"), "--reviewer", "x"]) == 2


def test_serve_refuses_bad_settings_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["review", "serve", "--claim-timeout", "0"]) == 2
    assert "--claim-timeout must be positive" in capsys.readouterr().err
    assert main(["review", "serve", "--max-deliveries", "0"]) == 2
    assert "--max-deliveries must be at least 1" in capsys.readouterr().err
    broken = tmp_path / "users.json"
    broken.write_text("[1, 2")
    assert main(["review", "serve", "--users", str(broken)]) == 2
    assert "not a valid users file" in capsys.readouterr().err
