"""Redis side of the worker: the dedupe label cache and the review stream.

Review entries are added once per post: one Lua script does `SET NX` on a per-post key and
`XADD` only when that succeeded, so a redelivered post never queues a second review item.
When Redis is unreachable, review items wait in a bounded in-memory buffer and are retried
in the background; the `review` Kafka topic stays the source of truth either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from stream import metrics
from stream.records import ReviewItem, encode

log = logging.getLogger(__name__)

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
        max_pending: int = 100_000,
    ) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.dedupe_ttl_s = dedupe_ttl_s
        self.review_key_ttl_s = review_key_ttl_s
        self.review_stream = f"{prefix}:review"
        self._enqueue = self.client.register_script(ENQUEUE_ONCE)
        self._pending: deque[ReviewItem] = deque(maxlen=max_pending)
        self._retry_task: asyncio.Task[None] | None = None

    # -- dedupe cache (LabelCache protocol) ------------------------------------------------
    async def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        values = await self.client.mget([f"{self.prefix}:dedupe:{k}" for k in keys])
        return [None if v is None else json.loads(v) for v in values]

    async def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(f"{self.prefix}:dedupe:{key}", json.dumps(value), ex=self.dedupe_ttl_s)
        await pipe.execute()

    # -- review stream ---------------------------------------------------------------------
    async def enqueue_review(self, item: ReviewItem) -> bool:
        """True when added now, False when this post was already queued."""
        result = await self._enqueue(
            keys=[f"{self.prefix}:reviewed-once:{item.post_id}", self.review_stream],
            args=[item.post_id, encode(item), self.review_key_ttl_s],
        )
        return bool(result)

    async def enqueue_reviews(self, items: Sequence[ReviewItem]) -> None:
        """Queue now, or keep for the background retry when Redis is down. Never raises."""
        for index, item in enumerate(items):
            try:
                await self.enqueue_review(item)
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable for review items (%r); %d kept for retry", exc, len(items) - index)
                metrics.DEPENDENCY_ERRORS.labels("redis", "review_xadd").inc()
                self._pending.extend(items[index:])
                break
        metrics.REVIEW_PENDING.set(len(self._pending))

    async def flush_pending(self) -> int:
        flushed = 0
        while self._pending:
            item = self._pending[0]
            await self.enqueue_review(item)  # raises while Redis is still down
            self._pending.popleft()
            flushed += 1
        metrics.REVIEW_PENDING.set(0)
        return flushed

    def start_retrying(self, interval_s: float = 1.0) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                if self._pending:
                    try:
                        flushed = await self.flush_pending()
                        log.info("redis back: %d pending review items written", flushed)
                    except (RedisError, OSError):
                        metrics.REVIEW_PENDING.set(len(self._pending))

        self._retry_task = asyncio.create_task(loop(), name="review-retry")

    async def close(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
        await self.client.aclose()
