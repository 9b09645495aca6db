"""Redis side of the stream: the worker's dedupe label cache and the review stream.

Review entries are added once per post: one Lua script does `SET NX` on a per-post key and
`XADD` only when that succeeded, so a redelivered review record never queues a second
entry. The worker no longer writes review items here: it sends them to the `review` topic
(the source of truth) and the review sink (review/review_sink.py) copies that topic into
the stream, committing its offsets only after Redis accepted every item of a batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from modstream.records import ReviewItem, encode

ENQUEUE_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  return redis.call('XADD', KEYS[2], '*', 'post_id', ARGV[1], 'item', ARGV[2])
end
return false
"""


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "modstream",
        dedupe_ttl_s: int = 24 * 3600,
        review_key_ttl_s: int = 30 * 24 * 3600,
    ) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.dedupe_ttl_s = dedupe_ttl_s
        self.review_key_ttl_s = review_key_ttl_s
        self.review_stream = f"{prefix}:review"
        self._enqueue = self.client.register_script(ENQUEUE_ONCE)

    # -- dedupe cache (LabelCache protocol) ------------------------------------------------
    async def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        values = await self.client.mget([f"{self.prefix}:dedupe:{k}" for k in keys])
        return [None if v is None else json.loads(v) for v in values]

    async def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:  # reset even when execute fails
            for key, value in items:
                pipe.set(f"{self.prefix}:dedupe:{key}", json.dumps(value), ex=self.dedupe_ttl_s)
            await pipe.execute()

    # -- review stream ---------------------------------------------------------------------
    def _review_call(self, item: ReviewItem) -> tuple[list[str], list[Any]]:
        keys = [f"{self.prefix}:reviewed-once:{item.post_id}", self.review_stream]
        return keys, [item.post_id, encode(item), self.review_key_ttl_s]

    async def enqueue_review_many(self, items: Sequence[ReviewItem]) -> list[bool]:
        """Per item: True when added now, False when its post was already queued. One round
        trip (a non-transactional pipeline, in order). Each script call is atomic on its own,
        so a batch cut short by a failure is simply retried whole: the items already added
        answer False the second time. Raises RedisError (or OSError) while Redis is
        unreachable: the caller decides whether to retry."""
        if not items:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for item in items:
                keys, args = self._review_call(item)
                await self._enqueue(keys=keys, args=args, client=pipe)
            return [bool(result) for result in await pipe.execute()]

    async def close(self) -> None:
        await self.client.aclose()
