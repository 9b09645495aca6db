"""faust's "has not sent fetch request since start" after a rebalance is a WARNING for its first
minute per partition, an ERROR when it persists; other records pass untouched."""

from __future__ import annotations

import logging

import pytest
from faust.transport.drivers.aiokafka import SLOW_PROCESSING_NO_FETCH_SINCE_START

from stream.first_fetch_grace import LOGGER, FirstFetchGrace, install

PARTITION = "TP(topic='posts', partition=0)"


def _record(partition: str = PARTITION, level: int = logging.ERROR, msg: str | None = None) -> logging.LogRecord:
    # As faust logs it through mode's CompositeLogger: the component prefix before the template.
    text = msg if msg is not None else "[^---AIOKafkaConsumerThread]: " + SLOW_PROCESSING_NO_FETCH_SINCE_START
    return logging.LogRecord(LOGGER, level, "aiokafka.py", 933, text, (partition, "5.00 minutes ago"), None)


def test_a_rebalance_sighting_is_a_warning_and_a_persisting_one_an_error_again():
    now = [0.0]
    grace = FirstFetchGrace(grace_s=60, gap_s=15, clock=lambda: now[0])
    for t in range(0, 60, 3):
        now[0] = float(t)
        record = _record()
        assert grace.filter(record) and record.levelname == "WARNING" and record.levelno == logging.WARNING
    now[0] = 61.0
    record = _record()
    assert grace.filter(record) and record.levelname == "ERROR", "a partition still unfetched after a minute"
    # Another partition keeps its own clock.
    other = _record("TP(topic='posts', partition=3)")
    grace.filter(other)
    assert other.levelname == "WARNING"


def test_the_next_rebalance_after_a_quiet_gap_starts_a_new_grace():
    now = [0.0]
    grace = FirstFetchGrace(clock=lambda: now[0])
    grace.filter(_record())
    now[0] = 500.0
    record = _record()
    grace.filter(record)
    assert record.levelname == "WARNING"


@pytest.mark.parametrize(
    "record",
    [
        _record(msg="[^---AIOKafkaConsumerThread]: Stream has not started processing %r (started %s)"),
        _record(level=logging.WARNING),
    ],
)
def test_other_records_of_the_logger_pass_unchanged(record):
    level = record.levelname
    assert FirstFetchGrace().filter(record) and record.levelname == level


def test_installed_on_the_named_logger_it_downgrades_a_real_log_call(caplog):
    grace = install()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            logging.getLogger(LOGGER).error(
                "[^---AIOKafkaConsumerThread]: " + SLOW_PROCESSING_NO_FETCH_SINCE_START, PARTITION, "1.0 minutes ago"
            )
        assert [r.levelname for r in caplog.records] == ["WARNING"]
    finally:
        logging.getLogger(LOGGER).removeFilter(grace)
