"""Signed, expiring links to the scored media, for tools outside the console (Label Studio).

Label Studio's browser loads a task's `data.image` itself, by XHR: from the post's own host
that is the hot-linking (and cloaking) the console avoids, and most hosts answer without CORS
headers anyway. Instead the export points at the console's `/ls-media/<sha256>?expires=&sig=`,
which serves the evidence store's verified, re-encoded bytes with CORS headers to anyone
holding a valid link: the HMAC-SHA256 of the hash and the expiry time under a key that the
exporting command and the console share (`MODSTREAM_MEDIA_LINK_KEY`, a secret). A link names
one image, cannot be widened to another, and stops working at its expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import urlencode

from stream.evidence import DIGEST

_EXPIRES = re.compile(r"[0-9]{1,12}")  # ASCII digits only (str.isdigit also takes "²")
MAX_TTL_S = 30 * 86400  # a link older than this is refused whatever its expiry says
MIN_KEY_BYTES = 16


class LinkError(ValueError):
    """A link that must not be served (the message says why, for logs; clients get 403)."""


def check_key(key: str | bytes) -> None:
    """Raise ValueError for a key too short to sign with (checked when the console starts)."""
    _key(key)


def _key(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"the media link key needs at least {MIN_KEY_BYTES} bytes")
    return raw


def signature(key: str | bytes, digest: str, expires: int) -> str:
    return hmac.new(_key(key), f"ls-media:{digest}:{expires}".encode(), hashlib.sha256).hexdigest()


def sign(key: str | bytes, base_url: str, digest: str, ttl_s: float, *, now: float | None = None) -> str:
    """The link to `digest`'s image on the console at `base_url`, valid for `ttl_s`."""
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {digest[:80]!r}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"a link lives between 1 s and {MAX_TTL_S // 86400} days, not {ttl_s} s")
    expires = int((time.time() if now is None else now) + ttl_s)
    query = urlencode({"expires": expires, "sig": signature(key, digest, expires)})
    return f"{base_url.rstrip('/')}/ls-media/{digest}?{query}"


def verify(key: str | bytes, digest: str, expires: str | None, sig: str | None, *, now: float | None = None) -> None:
    """Raise LinkError unless the link is well formed, signed with `key`, and not expired."""
    if not DIGEST.fullmatch(digest):
        raise LinkError("not a media hash")
    if not expires or not _EXPIRES.fullmatch(expires) or not sig or not DIGEST.fullmatch(sig):
        raise LinkError("malformed link")
    when = int(expires)
    current = time.time() if now is None else now
    if when < current:
        raise LinkError("expired link")
    if when > current + MAX_TTL_S:
        raise LinkError("expiry beyond the longest a link may live")
    if not hmac.compare_digest(signature(key, digest, when), sig):
        raise LinkError("bad signature")
