"""Fuzzing parse and the pipeline with Hypothesis: whatever the bytes (arbitrary, nested,
oversized, any type in any field), every input ends as exactly one label or one dead letter,
and every dead letter fits under the producer's limit. Examples are bounded so `make test`
stays quick; the hand-picked hostile inputs of the issue that found these bugs run every time."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modstream.records import MAX_POST_BYTES, MAX_RECORD_BYTES, DeadLetter, Post, encode
from stream.delivery import write_outcomes
from stream.pipeline import Outcome, parse
from tests.unit.test_pipeline import _pipeline
from tests.unit.test_worker_sends import SizeLimitedTopic

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
FIELDS = ("v", "id", "text", "image_urls", "author", "created_at")
# Any JSON value in any field the parser reads, plus fields it does not know.
post_like = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_value, max_size=8)


def _nested(depth: int) -> bytes:
    return b'{"id":"deep","text":' + b"[" * depth + b"]" * depth + b"}"


HOSTILE = {
    "10,000 deep": _nested(10_000),
    "1,000 deep": _nested(1_000),
    "deep object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "250 KB invalid UTF-8": b'{"id":"bad","text":"' + b"\xff\xfe\x00" * 85_000 + b'"}',
    "5 MB text (arrives gzip-compressed)": json.dumps({"id": "huge", "text": "a" * 5_000_000}).encode(),
    "NUL in id": b'{"id":"a\\u0000b","text":"x"}',
    "huge id": json.dumps({"id": "i" * 100_000, "text": "x"}).encode(),
    "lone surrogate": b'{"id":"s","text":"\\ud800"}',
    "NaN": b'{"id":"n","text":"x","v":NaN}',
    "empty": b"",
    "array": b"[1,2,3]",
    "one NUL byte": b"\x00",
}


def _one_outcome(outcome: Outcome) -> None:
    assert (outcome.post is None) != (outcome.dead_letter is None), "exactly one of a post or a dead letter"
    if outcome.dead_letter is not None:
        letter = outcome.dead_letter
        assert letter.stage == "parse" and letter.reason
        assert len(encode(letter)) <= MAX_RECORD_BYTES
        assert letter.raw_bytes == len(outcome.raw)
        if not letter.raw_truncated:
            assert letter.raw.encode("utf-8", "surrogatepass") == outcome.raw or "\\x" in letter.raw


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_of_the_issue_each_get_one_outcome_that_fits(name: str) -> None:
    raw = HOSTILE[name]
    outcome = parse(raw)
    _one_outcome(outcome)
    assert outcome.dead_letter is not None, f"{name} was accepted as a post"


def test_the_hostile_inputs_were_too_big_to_dead_letter_whole_before_the_cap() -> None:
    # What the old dead letter (the whole input, escaped) would have weighed: the cap is what keeps them sendable.
    raw = HOSTILE["250 KB invalid UTF-8"]
    assert len(json.dumps(raw.decode("utf-8", "backslashreplace"))) > MAX_RECORD_BYTES
    letter = DeadLetter.from_raw(raw, "parse", "x")
    assert letter.raw_truncated and len(encode(letter)) < 200_000
    assert len(gzip.compress(HOSTILE["5 MB text (arrives gzip-compressed)"])) < 100_000  # the broker takes it


def test_a_valid_post_up_to_the_size_limit_is_dead_lettered_whole_so_it_can_be_replayed() -> None:
    raw = encode(Post("p", "\\" * 20_000, ("http://example.invalid/" + "a" * 2000,) * 4))
    assert len(raw) < MAX_POST_BYTES
    letter = DeadLetter.from_raw(raw, "classify", "InferenceTimeout()", "p")
    assert not letter.raw_truncated and letter.raw.encode() == raw


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_get_one_outcome(raw: bytes) -> None:
    _one_outcome(parse(raw))


@FUZZ
@given(post_like)
def test_any_json_in_any_field_gets_one_outcome(obj: dict[str, Any]) -> None:
    _one_outcome(parse(json.dumps(obj).encode()))


@FUZZ
@given(st.integers(min_value=1, max_value=3000), st.sampled_from("[{"))
def test_nesting_of_any_depth_gets_one_outcome(depth: int, bracket: str) -> None:
    inner = "[" * depth + "]" * depth if bracket == "[" else '{"a":' * depth + "1" + "}" * depth
    outcome = parse(f'{{"id":"d","text":"t","extra":{inner}}}'.encode())
    _one_outcome(outcome)
    assert (outcome.post is not None) == (depth < 64)  # MAX_JSON_DEPTH counts the post's own object


@FUZZ
@given(
    st.integers(min_value=MAX_POST_BYTES - 100, max_value=MAX_POST_BYTES * 3), st.sampled_from([b"a", b"\xff", b"\x00"])
)
def test_oversized_posts_get_a_dead_letter_under_the_limit(size: int, fill: bytes) -> None:
    raw = b'{"id":"o","text":"' + fill * size + b'"}'
    _one_outcome(parse(raw))


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300),
            post_like.map(lambda o: json.dumps(o).encode()),
            st.builds(
                lambda i, t, url: encode(Post(f"f-{i}", t, (url,) if url else ())),
                st.integers(0, 5),  # repeated ids and contents in one batch
                st.text(max_size=50),
                st.sampled_from([None, "http://media.invalid/a.png", "http://media.invalid/404.png"]),
            ),
            st.sampled_from(list(HOSTILE.values())),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_batch_of_anything_through_the_pipeline_and_the_sends_ends_one_record_per_input(raws: list[bytes]) -> None:
    async def run() -> tuple[list[Outcome], dict[str, SizeLimitedTopic]]:
        outcomes = await _pipeline().process(raws)
        topics = {name: SizeLimitedTopic(MAX_RECORD_BYTES) for name in ("labels", "review", "dlq")}
        await write_outcomes(topics, outcomes, retry_s=0.01)
        return outcomes, topics

    outcomes, topics = asyncio.run(run())
    assert len(outcomes) == len(raws)
    labels = [json.loads(v) for _, v in topics["labels"].delivered]
    letters = [json.loads(v) for _, v in topics["dlq"].delivered]
    assert len(labels) + len(letters) == len(raws), "every input: exactly one label or dead letter"
    assert all(len(v) <= MAX_RECORD_BYTES for t in topics.values() for _, v in t.delivered)
    for raw, outcome in zip(raws, outcomes, strict=True):
        assert (outcome.label is None) != (outcome.dead_letter is None)
        assert outcome.raw is raw
