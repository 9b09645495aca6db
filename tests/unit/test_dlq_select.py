"""Which dead letters `modstream dlq replay` selects (no broker: the selection is pure)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from modstream.records import DeadLetter, encode
from stream.dlq import Selection, _candidate, parse_time, select


def record(post_id: str | None, stage: str, reason: str, failed_at: str, offset: int) -> tuple:
    letter = DeadLetter.from_raw(json.dumps({"id": post_id, "text": "t"}), stage, reason, post_id)
    letter.failed_at = failed_at
    value = encode(letter)
    return _candidate(0, offset, value), value


RECORDS = [
    record("a", "classify", "RuntimeError('The expanded size of the tensor')", "2026-11-28T08:00:00+00:00", 0),
    record("b", "parse", "id: must be a string, not int", "2026-11-28T08:05:00+00:00", 1),
    record("c", "classify", "InferenceTimeout('no answer in 30 s')", "2026-11-28T09:00:00+00:00", 2),
    record("a", "classify", "RuntimeError('The expanded size of the tensor')", "2026-11-28T09:30:00+00:00", 3),
    (None, b"not json"),
]


def ids(selection: Selection) -> list[str | None]:
    return [c.post_id for c in select(RECORDS, selection).selected]


def test_no_criteria_selects_each_post_once_at_its_latest_dead_letter():
    report = select(RECORDS, Selection())
    assert [c.post_id for c in report.selected] == ["b", "c", "a"]
    assert [c.offset for c in report.selected if c.post_id == "a"] == [3]
    assert report.superseded == 1 and report.unreadable == 1 and report.scanned == 5


def test_stage_reason_and_time_combine():
    assert ids(Selection(stages=frozenset({"parse"}))) == ["b"]
    assert ids(Selection(reason_contains="EXPANDED size")) == ["a"]  # case-insensitive substring
    assert ids(Selection(reason_regex=re.compile(r"Timeout\("))) == ["c"]
    since, until = parse_time("2026-11-28T08:01:00Z"), parse_time("2026-11-28T09:00:00")
    assert ids(Selection(since=since, until=until)) == ["b"]  # until is exclusive; no zone means UTC
    assert ids(Selection(stages=frozenset({"classify"}), since=since)) == ["c", "a"]
    report = select(RECORDS, Selection(stages=frozenset({"classify"}), reason_contains="timeout"))
    assert report.skipped == {"stage": 1, "reason": 2}


def test_bad_times_and_patterns_are_usage_errors():
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601"):
        parse_time("yesterday")
    from stream.dlq import parse_regex

    with pytest.raises(argparse.ArgumentTypeError, match="regular expression"):
        parse_regex("(unclosed")


def test_the_sinks_dead_letters_are_never_replayed_as_posts():
    """review_sink / dataset_sink letters hold a review item or a decision, not a post: sent to
    `posts` they would only fail parsing again (and could shadow the post's own dead letter)."""
    sink_letter = record("b", "review_sink", "review_item: missing field", "2026-11-28T10:00:00+00:00", 9)
    records = [*RECORDS, sink_letter]
    assert "review_sink" not in {c.stage for c in select(records, Selection()).selected}
    assert [c.offset for c in select(records, Selection()).selected if c.post_id == "b"] == [1]
    assert select(records, Selection(stages=frozenset({"parse"}))).selected[0].offset == 1


def test_a_dead_letter_that_kept_only_a_prefix_is_never_replayed():
    raw = json.dumps({"id": "big", "text": "a" * 600_000}).encode()
    letter = DeadLetter.from_raw(raw, "parse", "record: too large", "big")
    assert letter.raw_truncated
    value = encode(letter)
    whole = record("small", "parse", "record: too large", "2026-11-28T08:00:00+00:00", 1)
    report = select([(_candidate(0, 0, value), value), whole], Selection())
    assert [c.post_id for c in report.selected] == ["small"]
    assert report.skipped == {"truncated": 1}
