"""Server-side console sessions in Redis, and login rate limiting.

The cookie holds a random session id; Redis holds `sha256(id) -> {user, csrf, created}` with
an idle expiry (refreshed on use) under an absolute lifetime. Storing the hash means a read
of Redis does not hand out live sessions. Logout deletes the key, so a stolen cookie dies too.

Login attempts are counted per user name and per client address in fixed windows; past the
limit the login answers 429 until the window ends, whether or not the password is right.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from review.auth import new_csrf_token


@dataclass
class Session:
    sid_hash: str
    user: str
    csrf: str
    created: float
    fingerprint: str = ""  # the user's fingerprint at login (review.auth.User.fingerprint)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "modstream:review",
        idle_s: int = 8 * 3600,
        absolute_s: int = 12 * 3600,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.idle_s = idle_s
        self.absolute_s = absolute_s

    def _key(self, sid_hash: str) -> str:
        return f"{self.prefix}:session:{sid_hash}"

    async def create(self, user: str, fingerprint: str = "") -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(_hash(sid), user, new_csrf_token(), time.time(), fingerprint)
        await self.client.hset(
            self._key(session.sid_hash),
            mapping={"user": user, "csrf": session.csrf, "created": str(session.created), "fp": fingerprint},
        )
        await self.client.expire(self._key(session.sid_hash), self.idle_s)
        return sid, session

    async def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        sid_hash = _hash(sid)
        raw = await self.client.hgetall(self._key(sid_hash))
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        created = float(data.get("created", 0))
        if time.time() - created > self.absolute_s:
            await self.client.delete(self._key(sid_hash))
            return None
        await self.client.expire(self._key(sid_hash), self.idle_s)
        return Session(sid_hash, data["user"], data["csrf"], created, data.get("fp", ""))

    async def delete(self, session: Session) -> None:
        await self.client.delete(self._key(session.sid_hash))


class LoginLimiter:
    """Failed logins, limited per (name, client address), per address, and per name overall.

    At most `per_user_addr` failures for one name from one address, `per_addr` from one address
    for any names, and `per_user` for one name from all addresses together, in `window_s`. A
    stranger guessing from one address is stopped after `per_user_addr` tries but cannot lock
    the real reviewer out: their own address has its own count (a limit per name alone let five
    wrong passwords from anyone keep a whole team out). Only attempts an address was still
    allowed to make count toward the name's overall limit, so one address adds at most
    `per_addr` to it: locking a name out everywhere takes `per_user / per_addr` addresses.
    Behind a reverse proxy every client shares the proxy's address: size `per_addr` for that."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "modstream:review",
        per_user_addr: int = 5,
        per_addr: int = 20,
        per_user: int = 200,
        window_s: int = 900,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.per_user_addr = per_user_addr
        self.per_addr = per_addr
        self.per_user = per_user
        self.window_s = window_s

    def _keys(self, user: str, addr: str) -> tuple[str, str, str]:
        name = hashlib.sha256(user.encode()).hexdigest()[:32]
        return (
            f"{self.prefix}:login-fail:user-addr:{name}:{addr}",
            f"{self.prefix}:login-fail:addr:{addr}",
            f"{self.prefix}:login-fail:user:{name}",
        )

    async def attempt(self, user: str, addr: str) -> bool:
        """Counts this attempt before the password is checked, so parallel tries cannot all
        slip past a check made before any failure was recorded; False when over a limit."""
        pair_key, addr_key, user_key = self._keys(user, addr)
        pipe = self.client.pipeline(transaction=True)
        for key in (pair_key, addr_key):
            pipe.incr(key)
            pipe.expire(key, self.window_s, nx=True)
        by_pair, _, by_addr, _ = await pipe.execute()
        if int(by_pair) > self.per_user_addr or int(by_addr) > self.per_addr:
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(user_key)
        pipe.expire(user_key, self.window_s, nx=True)
        by_user, _ = await pipe.execute()
        return int(by_user) <= self.per_user

    async def succeeded(self, user: str, addr: str) -> None:
        """A good login clears the name's counts and takes its own attempt off the address's."""
        pair_key, addr_key, user_key = self._keys(user, addr)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(pair_key, user_key)
        pipe.decr(addr_key)
        await pipe.execute()
