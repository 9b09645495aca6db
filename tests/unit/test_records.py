import json

import pytest

from stream.records import DeadLetter, Label, MediaInfo, Post, RecordError, encode


def test_post_round_trip_and_defaults():
    post = Post.from_json(
        b'{"id": "p1", "text": "hi", "image_urls": ["http://x/a.png"], "created_at": "2026-01-01T00:00:00+00:00"}'
    )
    assert post.image_url == "http://x/a.png" and post.author is None
    assert Post.from_json(encode(post)) == post
    assert json.loads(encode(post))["v"] == 1


@pytest.mark.parametrize(
    ("raw", "field", "why"),
    [
        (b"{not json", "record", "invalid JSON"),
        (b"[1, 2]", "record", "JSON object"),
        (b"\xff\xfe", "record", ""),
        (b'{"text": "x"}', "id", "required"),
        (b'{"id": 5, "text": "x"}', "id", "string"),
        (b'{"id": " ", "text": "x"}', "id", "empty"),
        (b'{"id": "a"}', "text", "required"),
        (b'{"id": "a", "text": "x", "image_urls": "http://x"}', "image_urls", "list"),
        (b'{"id": "a", "text": "x", "image_urls": [""]}', "image_urls[0]", "non-empty"),
        (b'{"id": "a", "text": "x", "created_at": "yesterday"}', "created_at", "ISO 8601"),
        (b'{"v": 2, "id": "a", "text": "x"}', "v", "unsupported"),
    ],
)
def test_invalid_posts_name_the_field_and_why(raw, field, why):
    with pytest.raises(RecordError) as info:
        Post.from_json(raw)
    assert info.value.field == field
    assert why in str(info.value)


def test_label_and_dead_letter_serialise():
    label = Label(
        "p1", {"hate": {"score": 0.2, "decision": False, "threshold": 0.5}}, 0.7, "auto", [], MediaInfo("ok"), "v1"
    )
    assert Label.from_json(encode(label)) == label
    dl = DeadLetter.from_raw(b"\xffbad", "parse", "record: not UTF-8")
    out = json.loads(encode(dl))
    assert out["stage"] == "parse" and out["raw"] == "\\xffbad" and out["v"] == 1
