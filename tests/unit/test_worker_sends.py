"""stream.delivery: transient send failures are retried until the broker acks; a record that can
never be sent (too large) becomes a dead letter instead of stalling the worker, and every post
ends as exactly one label or dead letter."""

import asyncio
import json

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from faust.exceptions import ProducerSendError
from prometheus_client import REGISTRY

from modstream.records import MAX_RECORD_BYTES, DeadLetter, Label, MediaInfo, Post, ReviewItem, encode
from stream.delivery import LAST_RESORT_KEEP, is_permanent, send_all, write_outcomes
from stream.pipeline import Outcome
from stream.worker import label_batch


class FlakyTopic:
    def __init__(self):
        self.calls = 0
        self.delivered: list[tuple[bytes | None, bytes]] = []

    async def send(self, key, value, force):
        assert force  # never attached to the event: must be on the broker before the ack
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("buffer full")
        future = asyncio.get_running_loop().create_future()
        if self.calls == 2:
            future.set_exception(ConnectionError("broker gone"))
        else:
            self.delivered.append((key, value))
            future.set_result("metadata")
        return future


class SizeLimitedTopic:
    """Refuses records over `limit` bytes the way faust does (aiokafka's error wrapped in
    ProducerSendError, raised by send itself), or in the future like the broker would."""

    def __init__(self, limit: int = MAX_RECORD_BYTES, in_future: bool = False):
        self.limit = limit
        self.in_future = in_future
        self.delivered: list[tuple[bytes | None, bytes]] = []
        self.calls = 0

    async def send(self, key, value, force):
        self.calls += 1
        future = asyncio.get_running_loop().create_future()
        if len(value) > self.limit:
            if not self.in_future:
                try:
                    raise MessageSizeTooLargeError(f"{len(value)} bytes")
                except MessageSizeTooLargeError as exc:
                    raise ProducerSendError(f"Error while sending: {exc!r}") from exc
            future.set_exception(RecordTooLargeError())
            return future
        self.delivered.append((key, value))
        future.set_result("metadata")
        return future


def test_send_all_retries_both_kinds_of_failure_until_acked():
    topic = FlakyTopic()
    refused = asyncio.run(send_all(topic, [("a", b"1"), ("b", b"2")], retry_s=0.01))
    assert refused == []
    assert sorted(topic.delivered) == [(b"a", b"1"), (b"b", b"2")]
    assert topic.calls == 4  # two failed attempts, then both records once
    assert REGISTRY.get_sample_value("modstream_worker_send_blocked", {"topic": "output"}) == 0


def test_a_record_too_large_is_refused_once_not_retried_forever():
    topic = SizeLimitedTopic(limit=10)
    refused = asyncio.run(send_all(topic, [("a", b"x" * 11), ("b", b"ok")], retry_s=0.01))
    assert [i for i, _ in refused] == [0]
    assert topic.calls == 2 and topic.delivered == [(b"b", b"ok")]


def test_permanent_errors_are_recognised_through_faust_wrapping_and_others_are_not():
    try:
        try:
            raise MessageSizeTooLargeError("big")
        except MessageSizeTooLargeError as inner:
            raise ProducerSendError("wrapped") from inner
    except ProducerSendError as exc:
        wrapped = exc
    assert is_permanent(wrapped)
    assert is_permanent(RecordTooLargeError())
    assert not is_permanent(ConnectionError("broker gone"))
    assert not is_permanent(ProducerSendError("no cause"))


def _label(post_id: str, route: str = "auto", ocr_text: str | None = None) -> Label:
    return Label(
        post_id, {"hate": {"score": 0.1, "decision": False}}, 0.5, route, [], MediaInfo("none"), "v1", ocr_text=ocr_text
    )


def _topics(limit: int = MAX_RECORD_BYTES, in_future: bool = False) -> dict:
    return {name: SizeLimitedTopic(limit, in_future) for name in ("labels", "review", "dlq")}


def _ids(topic: SizeLimitedTopic) -> list[str]:
    return [json.loads(v)["post_id"] for _, v in topic.delivered]


def test_a_label_the_broker_refuses_becomes_that_posts_dead_letter_at_stage_sink():
    huge = Outcome(b'{"id":"big"}', post=Post("big", "t"), label=_label("big", ocr_text="x" * 2000))
    fine = Outcome(b'{"id":"ok"}', post=Post("ok", "t"), label=_label("ok"))
    topics = _topics(limit=1000, in_future=True)
    before = REGISTRY.get_sample_value("modstream_dead_letters_total", {"stage": "sink", "reason": "too_large"})
    asyncio.run(write_outcomes(topics, [huge, fine], retry_s=0.01))
    assert _ids(topics["labels"]) == ["ok"]
    (letter,) = [json.loads(v) for _, v in topics["dlq"].delivered]
    assert letter["post_id"] == "big" and letter["stage"] == "sink" and letter["reason"].startswith("too_large")
    assert huge.label is None and huge.dead_letter is not None
    after = REGISTRY.get_sample_value("modstream_dead_letters_total", {"stage": "sink", "reason": "too_large"})
    assert after == before + 1


def test_a_routed_post_whose_review_item_is_refused_gets_a_dead_letter_and_no_label():
    review = ReviewItem("r", "t" * 3000, None, ["weak_match"], {})
    routed = Outcome(b'{"id":"r"}', post=Post("r", "t"), label=_label("r", "review"), review=review)
    topics = _topics(limit=2000)
    asyncio.run(write_outcomes(topics, [routed], retry_s=0.01))
    assert topics["review"].delivered == [] and topics["labels"].delivered == []
    assert _ids(topics["dlq"]) == ["r"]


def test_a_dead_letter_the_broker_refuses_is_cut_to_a_prefix_and_sent():
    raw = b'{"id":"p","text":"' + b"a" * 6000 + b'"}'
    outcome = Outcome(raw, dead_letter=DeadLetter.from_raw(raw, "classify", "InferenceTimeout()", "p"))
    topics = _topics(limit=4000)
    asyncio.run(write_outcomes(topics, [outcome], retry_s=0.01))
    (letter,) = [json.loads(v) for _, v in topics["dlq"].delivered]
    assert letter["raw_truncated"] is True and len(letter["raw"]) == LAST_RESORT_KEEP
    assert letter["raw_bytes"] == len(raw) and letter["post_id"] == "p"
    assert "raw cut" in letter["reason"] and letter["reason"].startswith("InferenceTimeout")


def test_a_batch_whose_processing_raises_is_dead_lettered_post_by_post():
    class Broken:
        async def process(self, raws):
            raise RecursionError("maximum recursion depth exceeded")

    topics = _topics()
    raws = [encode(Post(f"p{i}", "text")) for i in range(3)]
    asyncio.run(label_batch(Broken(), topics, raws, retry_s=0.01))  # type: ignore[arg-type]
    letters = [json.loads(v) for _, v in topics["dlq"].delivered]
    assert [letter["raw"] for letter in letters] == [r.decode() for r in raws]
    assert {letter["stage"] for letter in letters} == {"classify"}
    assert all("RecursionError" in letter["reason"] for letter in letters)


def test_a_stuck_send_sets_the_blocked_gauge_while_it_retries():
    class Down:
        async def send(self, key, value, force):
            raise ConnectionError("broker gone")

    async def run() -> float | None:
        task = asyncio.create_task(send_all(Down(), [("a", b"1")], retry_s=0.01, name="labels"))
        await asyncio.sleep(0.05)
        seen = REGISTRY.get_sample_value("modstream_worker_send_blocked", {"topic": "labels"})
        task.cancel()
        return seen

    assert asyncio.run(run()) == 1
    assert REGISTRY.get_sample_value("modstream_worker_send_blocked", {"topic": "labels"}) == 0
