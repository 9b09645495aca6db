"""A log filter for one false alarm of faust's: "Aiokafka has not sent fetch request for TP
since start".

faust's livelock check (faust/transport/drivers/aiokafka.py, `_verify_aiokafka_event_path`)
compares the time of a partition's last fetch response with the time the *consumer* started,
and aiokafka forgets that time whenever partitions are assigned. So once a worker has run
longer than `stream_processing_timeout` (300 s), every rebalance logs this ERROR once per newly
assigned partition until its first fetch returns, a few hundred milliseconds later, while the
worker is healthy. A busy host makes it likely: a retrain slows the worker, lag grows, the
autoscaler adds a worker, the group rebalances. Reproduced on a real broker with CPU hogs and
workers joining; it never fired without a rebalance.

The first sightings of a partition are logged as WARNING; if the same partition keeps being
reported for longer than `grace_s` (the leader is gone, an offset reset keeps failing) it is
an ERROR again. Nothing is hidden, and other records of the logger are left as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from faust.transport.drivers.aiokafka import SLOW_PROCESSING_NO_FETCH_SINCE_START

LOGGER = "faust.transport.drivers.aiokafka"


class FirstFetchGrace(logging.Filter):
    def __init__(self, grace_s: float = 60.0, gap_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.grace_s, self.gap_s, self.clock = grace_s, gap_s, clock
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR or SLOW_PROCESSING_NO_FETCH_SINCE_START not in str(record.msg):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        partition = repr(args[0]) if args else ""
        now = self.clock()
        if now - self._last.get(partition, -float("inf")) > self.gap_s:
            self._first[partition] = now  # quiet for a while: a new episode (the next rebalance)
        self._last[partition] = now
        if now - self._first[partition] < self.grace_s:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install() -> FirstFetchGrace:
    """On the named logger: mode's logging set-up replaces the root handlers (and their
    filters) when the worker starts, but keeps named loggers."""
    grace = FirstFetchGrace()
    logging.getLogger(LOGGER).addFilter(grace)
    return grace
