import json

import pytest

from modstream.records import DeadLetter, Label, MediaInfo, Post, RecordError, encode


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


def test_review_decision_round_trip_and_training_labels():
    from modstream.records import ReviewDecision, TaskDecision

    decision = ReviewDecision(
        decision_id="d1",
        post_id="p1",
        reviewer="alice",
        decisions={"hate": TaskDecision("correct", "not_hateful"), "sarcasm": TaskDecision("skip")},
        model_version="v0001",
        model_labels={"hate": {"label": "hateful", "score": 0.8}},
        text="t",
    )
    back = ReviewDecision.from_json(encode(decision))
    assert back == decision
    assert back.training_labels() == {"hate": "not_hateful", "sarcasm": None}
    assert not back.escalated


def test_records_ignore_fields_a_newer_producer_added():
    import json

    from modstream.records import ReviewDecision, ReviewItem

    item = {"v": 1, "post_id": "p", "text": "t", "image_url": None, "reasons": [], "label": {}, "extra": 1}
    assert ReviewItem.from_json(json.dumps(item)).post_id == "p"
    decision = {
        "v": 1, "decision_id": "d", "post_id": "p", "reviewer": "r", "model_version": "v1", "model_labels": {},
        "text": "t", "decisions": {"hate": {"action": "escalate", "why": "new field"}}, "new": True,
    }  # fmt: skip
    assert ReviewDecision.from_json(json.dumps(decision)).escalated


def test_decide_and_task_decision_refuse_what_makes_no_label():
    from modstream.records import TaskDecision, reviewer_decision

    labels = ["not_hateful", "hateful"]
    assert reviewer_decision("confirm", labels, "hateful").label == "hateful"
    assert reviewer_decision("correct", labels, "hateful").label == "not_hateful"
    assert reviewer_decision("not_violating", labels, "hateful").label == "not_hateful"
    assert reviewer_decision("escalate", labels, "hateful").label is None
    with pytest.raises(RecordError, match="must be one of"):
        TaskDecision("approve", "hateful")
    with pytest.raises(RecordError, match="needs a label"):
        TaskDecision("confirm")
    with pytest.raises(RecordError, match="carries no label"):
        TaskDecision("skip", "hateful")
    with pytest.raises(RecordError, match="not one of"):
        reviewer_decision("correct", labels, "hateful", chosen="spam")
    with pytest.raises(RecordError, match="must name the label"):
        reviewer_decision("correct", ["a", "b", "c"], "a")


def test_label_carries_the_ocr_text_and_older_records_still_load():
    label = Label("p1", {}, 0.4, "auto", [], MediaInfo("ok"), "v1", ocr_text="STOP THE HATE — नमस्ते")
    assert Label.from_json(encode(label)) == label
    assert json.loads(encode(label))["ocr_text"] == "STOP THE HATE — नमस्ते"
    old = json.loads(encode(label))
    del old["ocr_text"]  # written before OCR existed
    assert Label.from_json(json.dumps(old)).ocr_text is None


def test_a_model_update_names_a_plain_version_and_refuses_paths_and_junk():
    from modstream.records import ModelUpdate, RecordError, encode

    update = ModelUpdate.from_json(encode(ModelUpdate("v0002", "v0001", "retrain")))
    assert update == ModelUpdate("v0002", "v0001", "retrain")
    assert ModelUpdate.from_json(b'{"version": "v0003"}').reason == "retrain"  # older messages carry no v
    for bad in (b'{"version": "../../etc"}', b'{"version": "v1\\u0000"}', b'{"version": 7}', b"{}", b"[1]"):
        with pytest.raises(RecordError):
            ModelUpdate.from_json(bad)
