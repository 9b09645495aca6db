"""Blind audit sampling: a fixed share of every post the model labels goes to review blind,
so that reviewers' verdicts on them measure the live model (review/live_quality.py).

Routed items are the model's hardest posts and cannot estimate live precision or recall; a
random sample of all the posts the model labels can. The sample is drawn before routing
(stream/pipeline.py): a routed post it picks is reviewed once, as an audit item that records
`routed_by_policy`. (Sampling only the `auto` labels left routing's hardest posts out, so it
estimated the F1 of the easier rest: BENCHMARKS.md, "Live quality from a blind audit".)
Violating-bank matches are not sampled: their labels are banked human verdicts.

A post is picked when a keyed hash of its id (HMAC-SHA256 under MODSTREAM_AUDIT_KEY) falls
below the rate: a replay of the same post picks it again, every worker agrees, and a poster
who does not hold the key cannot tell which posts are audited. Without a key a built-in
development key is used, and the worker says so.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

log = logging.getLogger(__name__)

DEFAULT_RATE = 0.01
DEV_KEY = b"modstream-development-audit-key (set MODSTREAM_AUDIT_KEY in production)"


class AuditSampler:
    def __init__(self, rate: float, key: str | bytes | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the audit rate is a share between 0 and 1, not {rate}")
        if key is None:
            log.warning(
                "MODSTREAM_AUDIT_KEY is unset: audit sampling uses the development key, which anyone can compute"
            )
        self.rate = rate
        self.key = DEV_KEY if key is None else (key.encode() if isinstance(key, str) else key)

    def picks(self, post_id: str) -> bool:
        if self.rate <= 0.0:
            return False
        digest = hmac.new(self.key, post_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") < self.rate * 2**64
