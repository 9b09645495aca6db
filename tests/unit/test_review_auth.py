"""Reviewer accounts: argon2 hashes, roles, bearer tokens stored hashed, CSRF checks."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from review.auth import AuthError, UserStore, csrf_ok, new_csrf_token

PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    return UserStore(tmp_path / "users.json")


def test_password_is_stored_as_argon2_hash_only(store: UserStore) -> None:
    store.add("alice", "reviewer", PASSWORD)
    raw = store.path.read_text()
    assert PASSWORD not in raw
    record = json.loads(raw)["users"]["alice"]
    assert record["password_hash"].startswith("$argon2id$")
    assert record["role"] == "reviewer"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_authenticate_accepts_right_password_only(store: UserStore) -> None:
    store.add("alice", "reviewer", PASSWORD)
    user = store.authenticate("alice", PASSWORD)
    assert user is not None and user.name == "alice" and not user.is_admin
    assert store.authenticate("alice", PASSWORD + "x") is None
    assert store.authenticate("mallory", PASSWORD) is None
    assert store.authenticate("../etc", PASSWORD) is None


def test_roles(store: UserStore) -> None:
    store.add("root", "admin", PASSWORD)
    store.add("rev", "reviewer", PASSWORD)
    assert store.get("root").is_admin  # type: ignore[union-attr]
    assert not store.get("rev").is_admin  # type: ignore[union-attr]
    with pytest.raises(AuthError, match="role must be one of"):
        store.add("bad", "superuser", PASSWORD)
    store.set_role("rev", "admin")
    assert UserStore(store.path).get("rev").is_admin  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "-lead", "semi;colon", "new\nline"])
def test_bad_names_are_refused(store: UserStore, name: str) -> None:
    with pytest.raises(AuthError, match="user name"):
        store.add(name, "reviewer", PASSWORD)


def test_short_password_and_duplicate_user_are_refused(store: UserStore) -> None:
    with pytest.raises(AuthError, match="at least"):
        store.add("alice", "reviewer", "short")
    store.add("alice", "reviewer", PASSWORD)
    with pytest.raises(AuthError, match="exists already"):
        store.add("alice", "reviewer", PASSWORD)


def test_set_password_and_remove(store: UserStore) -> None:
    store.add("alice", "reviewer", PASSWORD)
    token = store.issue_token("alice")
    assert store.user_for_token(token) is not None
    assert store.set_password("alice", "another long password") == 1
    assert store.user_for_token(token) is None  # a token must not outlive the password change
    assert store.authenticate("alice", PASSWORD) is None
    assert store.authenticate("alice", "another long password") is not None
    store.remove("alice")
    assert store.get("alice") is None
    with pytest.raises(AuthError, match="no user"):
        store.remove("alice")


def test_api_token_is_stored_hashed_and_resolves_to_its_user(store: UserStore) -> None:
    store.add("bot", "reviewer", PASSWORD)
    store.add("other", "admin", PASSWORD)
    token = store.issue_token("bot", "bench")
    assert token.startswith("mst_")
    assert token not in store.path.read_text()
    found = store.user_for_token(token)
    assert found is not None and found.name == "bot"
    assert store.user_for_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.user_for_token("Bearer " + token) is None
    assert store.user_for_token("") is None
    token_id = token.split("_")[1]
    store.revoke_token("bot", token_id)
    assert store.user_for_token(token) is None


def test_changes_on_disk_are_picked_up_by_a_running_store(tmp_path: Path) -> None:
    running = UserStore(tmp_path / "users.json")
    cli = UserStore(tmp_path / "users.json")
    cli.add("late", "reviewer", PASSWORD)
    assert running.get("late") is not None
    token = cli.issue_token("late")
    assert running.user_for_token(token) is not None
    cli.remove("late")
    assert running.user_for_token(token) is None


def test_corrupt_users_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text("{not json")
    with pytest.raises(AuthError, match="not a valid users file"):
        UserStore(path)


def test_csrf_token_check() -> None:
    token = new_csrf_token()
    assert len(token) >= 40
    assert csrf_ok(token, token)
    assert not csrf_ok(token, token[:-1])
    assert not csrf_ok(token, "")
    assert not csrf_ok(token, None)
    assert not csrf_ok(None, token)
    assert not csrf_ok("", "")
    assert new_csrf_token() != token
