"""Reviewer accounts: a JSON file of named users with argon2 password hashes, roles and API tokens.

- Passwords: argon2id via argon2-cffi (`PasswordHasher`), rehashed on login when the
  parameters change. An unknown user still costs one verification against a dummy hash, so
  response time does not tell which names exist.
- API tokens: `mst_<id>_<secret>`, 32 random bytes of secret. Only SHA-256 of the token is
  stored: a token is high-entropy, so a fast hash is safe, and the API must not spend an
  argon2 verification per request. The id picks the record; the hashes compare in constant time.
- The file is written atomically (temp file + rename) with mode 0600, and re-read when its
  mtime changes, so `modstream review add-user` takes effect on a running console.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from modstream.records import now_iso

ROLES = ("reviewer", "admin")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
TOKEN_PREFIX = "mst_"

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("not a real password, for timing only")

log = logging.getLogger(__name__)


class AuthError(ValueError):
    """Bad user input for an account operation (the message says what to fix)."""


@dataclass
class ApiToken:
    id: str
    sha256: str
    label: str
    created_at: str


@dataclass
class User:
    name: str
    role: str
    password_hash: str
    created_at: str = field(default_factory=now_iso)
    tokens: list[ApiToken] = field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def fingerprint(self) -> str:
        """Changes with the password, the role, or a remove + add under the same name, so a
        session made before any of them stops working (sessions store it at login)."""
        material = "\0".join((self.name, self.role, self.password_hash, self.created_at))
        return hashlib.sha256(material.encode()).hexdigest()[:32]


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise AuthError(f"user name {name!r}: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AuthError(f"password must have at most {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UserStore:
    """The users file. Mutations save at once; reads reload when the file changed on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._users: dict[str, User] = {}
        self._mtime: float | None = None
        self._reload(force=True)

    # -- persistence ------------------------------------------------------------------------

    def _reload(self, *, force: bool = False) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return
        if not force and mtime == self._mtime:
            return
        try:
            raw = json.loads(self.path.read_text())
            users = {}
            for name, obj in raw.get("users", {}).items():
                tokens = [ApiToken(**t) for t in obj.pop("tokens", [])]
                users[name] = User(name=name, tokens=tokens, **{k: v for k, v in obj.items() if k != "name"})
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise AuthError(f"{self.path}: not a valid users file ({exc})") from exc
        self._users, self._mtime = users, mtime

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"users": {name: {k: v for k, v in asdict(u).items() if k != "name"} for name, u in self._users.items()}}
        fd, tmp = tempfile.mkstemp(prefix=".users-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._mtime = self.path.stat().st_mtime_ns

    # -- queries ----------------------------------------------------------------------------

    def get(self, name: str) -> User | None:
        self._reload()
        return self._users.get(name)

    def names(self) -> list[str]:
        self._reload()
        return sorted(self._users)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password is right, else None (same cost for unknown names)."""
        user = self.get(name) if NAME_RE.match(name) else None
        stored = user.password_hash if user else _DUMMY_HASH
        try:
            _hasher.verify(stored, password[:MAX_PASSWORD])
        except (VerificationError, InvalidHashError):
            return None
        if user is None:
            return None
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
            try:
                self._save()
            except OSError as exc:  # a read-only users file (a mounted Secret) must not block logins
                log.warning("could not store a rehashed password for %s: %s", user.name, exc)
        return user

    def user_for_token(self, token: str) -> User | None:
        if not token.startswith(TOKEN_PREFIX) or token.count("_") < 2:
            return None
        token_id = token[len(TOKEN_PREFIX) :].split("_", 1)[0]
        digest = _token_digest(token)
        self._reload()
        for user in self._users.values():
            for record in user.tokens:
                if record.id == token_id and hmac.compare_digest(record.sha256, digest):
                    return user
        return None

    # -- mutations --------------------------------------------------------------------------

    def add(self, name: str, role: str, password: str) -> User:
        self._reload()
        check_name(name)
        if name in self._users:
            raise AuthError(f"user {name!r} exists already (use set-password to change the password)")
        user = User(name=name, role=check_role(role), password_hash=hash_password(password))
        self._users[name] = user
        self._save()
        return user

    def remove(self, name: str) -> None:
        self._reload()
        if self._users.pop(name, None) is None:
            raise AuthError(f"no user {name!r}")
        self._save()

    def set_password(self, name: str, password: str) -> int:
        """A new password ends everything the old one stood behind: sessions (their user
        fingerprint changes) and API tokens (revoked here; a leaked token must not outlive the
        password change it prompted). Returns the number of tokens revoked."""
        user = self._require(name)
        user.password_hash = hash_password(password)
        revoked = len(user.tokens)
        user.tokens = []
        self._save()
        return revoked

    def set_role(self, name: str, role: str) -> None:
        user = self._require(name)
        user.role = check_role(role)
        self._save()

    def issue_token(self, name: str, label: str = "") -> str:
        """A new API token for `name`; returned once, stored only as its hash."""
        user = self._require(name)
        token_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        user.tokens.append(ApiToken(token_id, _token_digest(token), label, now_iso()))
        self._save()
        return token

    def revoke_token(self, name: str, token_id: str) -> None:
        user = self._require(name)
        before = len(user.tokens)
        user.tokens = [t for t in user.tokens if t.id != token_id]
        if len(user.tokens) == before:
            raise AuthError(f"user {name!r} has no token {token_id!r}")
        self._save()

    def _require(self, name: str) -> User:
        self._reload()
        user = self._users.get(name)
        if user is None:
            raise AuthError(f"no user {name!r}")
        return user


# -- CSRF ------------------------------------------------------------------------------------


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: Any) -> bool:
    """Synchronizer-token check: the form's token must equal the session's, compared in constant time."""
    if not expected or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
