"""Who may do what on the review Redis: one ACL user per role, with only the commands and keys
its code sends (inventoried on Redis 7.0 with MONITOR, commands inside Lua scripts included:
Redis checks those against the caller's ACL too).

    worker       reads and writes its dedupe cache (MGET, SET on modstream:dedupe:*), nothing else
    review-sink  adds items to the review stream once per post (its script: SET NX + XADD); it
                 cannot acknowledge, delete or trim anything
    console      claims, renews, acknowledges, skips (re-adds), escalates; deletes only from the
                 escalation and dead-letter streams and its own session, login-limit,
                 submit-lock and double-review pair keys and gold definitions (also the Label
                 Studio import and export)
    default      the operator (retention, purge, the stack's own tooling): everything

So a compromised worker cannot touch the queue, and the sink cannot acknowledge or delete
items. Not expressible in ACLs: `XADD ... MAXLEN 0` trims, so a principal allowed to XADD to
the review stream (the sink, the console) could still shorten it.

`aclfile_lines` writes a Redis ACL file (`redis-server --aclfile`): passwords only as SHA-256
hashes, so neither the file nor the process table holds one. `modstream redis-acls` writes it
from the per-role credentials folders.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REVIEW = "modstream:review"  # review/queue.py's default stream and its key families below
# Every user: the connection handshake (RESP3 HELLO) and PING; nothing on pub/sub channels.
BASE = "resetchannels +hello +ping"

RULES: dict[str, str] = {
    "worker": "~modstream:dedupe:* +mget +set",
    "review-sink": (
        "+script|load +script|exists "
        f"(~modstream:reviewed-once:* ~{REVIEW} +evalsha) "
        "(~modstream:reviewed-once:* +set) "
        f"(~{REVIEW} +xadd)"
    ),
    "console": (
        "+multi +exec +discard +script|load "
        f"(~{REVIEW} ~{REVIEW}:escalated ~{REVIEW}:decided:* ~{REVIEW}:decisions ~{REVIEW}:pair:* ~{REVIEW}:pairs "
        f"~{REVIEW}:gold:results +evalsha) "
        f"(~{REVIEW} +xgroup|create +xinfo|groups +xreadgroup +xpending +xautoclaim +xclaim +xack +xrange +xlen +xadd) "
        f"(~{REVIEW}:dead ~{REVIEW}:escalated +xadd +xrange +xrevrange +xlen +xdel) "
        f"(~{REVIEW}:decided:* +set +get +mget +exists) "
        f"(~{REVIEW}:decisions +zadd +zremrangebyscore +zrangebyscore) "
        f"(~{REVIEW}:pair:* +hset +hget +hmget +hgetall +del +expire +exists) "
        f"(~{REVIEW}:pairs ~{REVIEW}:gold:results +xadd +xrevrange) "
        f"(~{REVIEW}:gold +hset +hget +hgetall +hdel) "
        f"(~{REVIEW}:submitting:* +set +get +del) "
        f"(~{REVIEW}:session:* +hset +hgetall +expire +del) "
        f"(~{REVIEW}:login-fail:* +incrby +decrby +expire +del) "
        f"(~{REVIEW}:label-studio:* +sismember +sadd +expire)"
    ),
}
OPERATOR = "~* &* +@all"


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def aclfile_lines(passwords: Mapping[str, str], operator_password: str) -> list[str]:
    """The ACL file: `default` (the operator) and one user per role in `passwords`; roles
    without a rule are refused (a typo must not become an open user)."""
    unknown = sorted(set(passwords) - set(RULES))
    if unknown:
        raise ValueError(f"no Redis ACL rule for role(s) {unknown}; known: {sorted(RULES)}")
    lines = [f"user default on #{password_hash(operator_password)} {OPERATOR}"]
    for role, password in sorted(passwords.items()):
        lines.append(f"user {role} on #{password_hash(password)} {BASE} {RULES[role]}")
    return lines


def credentials_from_url(url: str) -> tuple[str, str]:
    """(user, password) of a `redis://user:password@host:port/db` URL."""
    parts = urlsplit(url)
    if not parts.password:
        raise ValueError("the Redis URL has no password")
    return parts.username or "default", parts.password


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("redis-acls", help="write the review Redis's ACL file from the roles' credentials folders")
    p.add_argument("--credentials", required=True, help="folder of <role>/MODSTREAM_REDIS_URL files")
    p.add_argument("--aclfile", required=True, help="the ACL file to write (redis-server --aclfile)")
    p.set_defaults(func=cmd_redis_acls)


def cmd_redis_acls(args: argparse.Namespace) -> int:
    """Reads `<credentials>/<role>/MODSTREAM_REDIS_URL` for every role with a rule, and the
    operator's from `<credentials>/admin/`; writes the file with mode 600."""
    folder = Path(args.credentials)
    passwords: dict[str, str] = {}
    for role in RULES:
        url_file = folder / role / "MODSTREAM_REDIS_URL"
        if url_file.is_file():
            user, password = credentials_from_url(url_file.read_text().strip())
            if user != role:
                raise ValueError(f"{url_file} names user {user!r}, expected {role!r}")
            passwords[role] = password
    _, operator = credentials_from_url((folder / "admin" / "MODSTREAM_REDIS_URL").read_text().strip())
    path = Path(args.aclfile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("\n".join(aclfile_lines(passwords, operator)) + "\n")
    print(f"wrote {path}: users default, {', '.join(sorted(passwords))}", file=sys.stderr)
    return 0
