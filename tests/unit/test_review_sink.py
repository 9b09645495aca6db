"""The review sink's stage without Kafka or Redis: parsing, dead letters, failures that
must make the loop retry instead of committing."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from modstream.records import DeadLetter, RecordError, ReviewItem, encode
from review.kafka_sink import SinkRecord, TransientError
from review.review_sink import ReviewSink, parse_review_item


def _item(post_id: str = "p1") -> ReviewItem:
    return ReviewItem(post_id, "text", "http://x/a.png", ["itm_low"], {"post_id": post_id}, {"hate": ["no", "yes"]})


def _record(value: bytes | None, offset: int = 0, key: bytes | None = b"p1") -> SinkRecord:
    return SinkRecord("review", 0, offset, key, value)


class FakeStore:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.queued: dict[str, ReviewItem] = {}

    async def enqueue_review_many(self, items: Sequence[ReviewItem]) -> list[bool]:
        if self.fail:
            raise RedisConnectionError("Connection refused")
        out = []
        for item in items:  # SET NX semantics
            out.append(item.post_id not in self.queued)
            self.queued.setdefault(item.post_id, item)
        return out


class FakeDeadLetters:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter], reasons: Sequence[str]) -> None:
        if self.fail and letters:
            raise TransientError("kafka", "dlq_send", ConnectionError("broker down"))
        self.sent.extend(letters)


def test_a_review_item_round_trips() -> None:
    item = _item()
    assert parse_review_item(encode(item)) == item


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (None, "record"),
        (b'{"post_id": "p1", "text": ', "record"),
        (b'{"v": 1, "text": "t"}', "review_item"),
        (json.dumps({"post_id": 7, "text": "t", "image_url": None, "reasons": [], "label": {}}).encode(), "post_id"),
        (json.dumps({"post_id": " ", "text": "t", "image_url": None, "reasons": [], "label": {}}).encode(), "post_id"),
        (json.dumps({"post_id": "p", "text": "t", "image_url": None, "reasons": "x", "label": {}}).encode(), "reasons"),
        (json.dumps({"post_id": "p", "text": "t", "image_url": None, "reasons": [], "label": []}).encode(), "label"),
        (
            json.dumps({"post_id": "p", "text": "t", "image_url": None, "reasons": [], "label": {}, "tasks": {"h": 1}}),
            "tasks",
        ),
    ],
)
def test_malformed_review_records_name_the_field(raw: bytes | str | None, field: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_review_item(raw.encode() if isinstance(raw, str) else raw)
    assert info.value.field == field


@pytest.mark.asyncio
async def test_items_are_queued_once_and_malformed_records_are_dead_lettered() -> None:
    store, dead = FakeStore(), FakeDeadLetters()
    sink = ReviewSink(store, dead)
    batch = [_record(encode(_item("p1"))), _record(b"{broken", 1, key=b"p2"), _record(encode(_item("p3")), 2)]
    await sink.apply(batch)
    await sink.apply(batch)  # redelivered after a crash before the commit
    assert sorted(store.queued) == ["p1", "p3"]
    assert len(dead.sent) == 2  # the dead letter is re-sent on redelivery: at least once
    letter = dead.sent[0]
    assert letter.stage == "review_sink" and letter.post_id == "p2" and letter.raw == "{broken"
    assert "invalid JSON" in letter.reason and "review[0]@1" in letter.reason


@pytest.mark.asyncio
async def test_redis_down_raises_a_transient_error_so_the_batch_is_not_committed() -> None:
    sink = ReviewSink(FakeStore(fail=True), FakeDeadLetters())
    with pytest.raises(TransientError) as info:
        await sink.apply([_record(encode(_item()))])
    assert (info.value.dependency, info.value.op) == ("redis", "review_xadd")


@pytest.mark.asyncio
async def test_a_dead_letter_that_cannot_be_sent_stops_the_batch() -> None:
    store = FakeStore()
    sink = ReviewSink(store, FakeDeadLetters(fail=True))
    with pytest.raises(TransientError):
        await sink.apply([_record(b"not json"), _record(encode(_item()), 1)])
    assert store.queued == {}  # nothing applied before the dead letter is safe


def test_unknown_fields_are_ignored_as_the_records_contract_says() -> None:
    item = _item()  # one item: two would differ in queued_at across a millisecond boundary
    obj = {**item.to_json(), "added_by_a_newer_worker": {"x": 1}}
    assert parse_review_item(json.dumps(obj).encode()) == item
