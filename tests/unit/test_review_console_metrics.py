"""The console's queue gauges while Redis does not answer: NaN (unknown), never the last value or
0, which read as "all reviewed" during an outage."""

from __future__ import annotations

import asyncio
import math

from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ConnectionError as RedisConnectionError

from review.console import Handlers, Metrics
from review.queue import QueueStats


class StubConsole:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.redis_up = True

    async def stats(self) -> None:
        if not self.redis_up:
            raise RedisConnectionError("Connection refused")
        self.metrics.set_stats(
            QueueStats(depth=7, undelivered=5, pending=2, oldest_age_s=30.0, decisions_last_hour=0, dead_letters=1)
        )


def gauges(body: bytes) -> dict[str, float]:
    names = {"modstream_review_queue_depth", "modstream_review_oldest_item_age_seconds"}
    return {
        s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples if s.name in names
    }


def test_queue_gauges_are_nan_while_redis_is_down_and_recover_after() -> None:
    console = StubConsole()
    handlers = Handlers(console)  # type: ignore[arg-type]

    def scrape() -> dict[str, float]:
        response = asyncio.run(handlers.metrics(None))  # type: ignore[arg-type]
        return gauges(response.body)

    assert scrape() == {"modstream_review_queue_depth": 7, "modstream_review_oldest_item_age_seconds": 30}
    console.redis_up = False
    down = scrape()
    assert all(math.isnan(v) for v in down.values()) and len(down) == 2
    console.redis_up = True
    assert scrape()["modstream_review_queue_depth"] == 7
