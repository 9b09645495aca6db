"""Building a ReviewDecision from a reviewer's choices (form and API shapes)."""

from __future__ import annotations

import uuid

import pytest

from modstream.records import RecordError, ReviewDecision, ReviewItem
from review.decisions import build_decision, choices_from_form, choices_from_json


def make_item(**overrides: object) -> ReviewItem:
    fields: dict = dict(
        post_id="p1",
        text="look at this <b>meme</b>",
        image_url="http://img.example/1.png",
        reasons=["weak_image_text_match"],
        label={
            "post_id": "p1",
            "labels": {
                "hate": {"label": "hateful", "score": 0.81, "decision": True, "threshold": 0.5},
                "sarcasm": {"label": "not_sarcastic", "score": 0.2, "decision": False, "threshold": 0.4},
                "topic": {"label": "sports", "score": 0.6, "decision": True, "threshold": 0.3},
            },
            "itm_match": 0.12,
            "media": {"status": "ok", "url": "http://img.example/1.png", "content_hash": "ab" * 32},
            "model_version": "v0007",
        },
        tasks={
            "hate": ["not_hateful", "hateful"],
            "sarcasm": ["not_sarcastic", "sarcastic"],
            "topic": ["none", "sports", "politics"],
        },
        queued_at="2026-01-01T00:00:00.000+00:00",
    )
    fields.update(overrides)
    return ReviewItem(**fields)


def test_decision_carries_the_model_view_and_each_task_action() -> None:
    item = make_item()
    decision = build_decision(
        item,
        "alice",
        {"hate": ("correct", None), "sarcasm": ("confirm", None), "topic": ("correct", "politics")},
        note="  context  ",
    )
    assert uuid.UUID(decision.decision_id)
    assert decision.reviewer == "alice" and decision.post_id == "p1"
    assert decision.model_version == "v0007"
    assert decision.model_labels == item.label["labels"]
    assert decision.media_hash == "ab" * 32
    assert decision.itm_match == 0.12
    assert decision.reasons == ["weak_image_text_match"]
    assert decision.queued_at == item.queued_at
    assert decision.text == item.text and decision.image_url == item.image_url
    assert decision.note == "context"
    assert decision.training_labels() == {"hate": "not_hateful", "sarcasm": "not_sarcastic", "topic": "politics"}
    # Round trip through the topic's JSON.
    assert ReviewDecision.from_json(decision.to_json()) == decision


def test_not_violating_skip_and_escalate() -> None:
    decision = build_decision(
        make_item(), "bob", {"hate": ("not_violating", None), "sarcasm": ("skip", None), "topic": ("escalate", None)}
    )
    assert decision.training_labels() == {"hate": "not_hateful", "sarcasm": None, "topic": None}
    assert decision.escalated


def test_every_task_needs_a_decision() -> None:
    with pytest.raises(RecordError, match="no decision for task"):
        build_decision(make_item(), "bob", {"hate": ("confirm", None)})


def test_unknown_task_action_and_label_are_refused() -> None:
    base = {"hate": ("confirm", None), "sarcasm": ("confirm", None), "topic": ("confirm", None)}
    with pytest.raises(RecordError, match="unknown task"):
        build_decision(make_item(), "bob", {**base, "spam": ("confirm", None)})
    with pytest.raises(RecordError, match="action must be one of"):
        build_decision(make_item(), "bob", {**base, "hate": ("delete", None)})
    with pytest.raises(RecordError, match="is not one of"):
        build_decision(make_item(), "bob", {**base, "topic": ("correct", "weather")})
    with pytest.raises(RecordError, match="must name the label"):
        build_decision(make_item(), "bob", {**base, "topic": ("correct", None)})


def test_decision_ids_are_fresh() -> None:
    choices = {"hate": ("skip", None), "sarcasm": ("skip", None), "topic": ("skip", None)}
    ids = {build_decision(make_item(), "bob", choices).decision_id for _ in range(5)}
    assert len(ids) == 5


def test_api_body_parsing() -> None:
    choices, note = choices_from_json(
        {
            "decisions": {
                "hate": {"action": "correct"},
                "topic": {"action": "correct", "label": "none"},
                "sarcasm": "skip",
            }
        }
    )
    assert choices == {"hate": ("correct", None), "topic": ("correct", "none"), "sarcasm": ("skip", None)}
    assert note is None
    for bad in (
        [],
        {"decisions": []},
        {"decisions": {"hate": 3}},
        {"decisions": {"hate": {"action": "x", "label": 1}}},
    ):
        with pytest.raises(RecordError):
            choices_from_json(bad)


def test_form_parsing_ignores_undecided_tasks() -> None:
    form = {
        "action.hate": "confirm",
        "action.topic": "correct",
        "label.topic": "none",
        "label.sarcasm": "x",
        "note": "n",
    }
    choices, note = choices_from_form(form, ["hate", "sarcasm", "topic"])
    assert choices == {"hate": ("confirm", None), "topic": ("correct", "none")}
    assert note == "n"


def test_the_image_text_answer_changes_the_decision_id_and_unanswered_keeps_the_old_one() -> None:
    from review.console.base import decision_id_for
    from review.decisions import pair_answer

    choices = {"hate": ("confirm", None)}
    unanswered = decision_id_for("entry:alice:1", choices, None)
    assert decision_id_for("entry:alice:1", choices, None, None) == unanswered  # ids made before the question
    ids = {decision_id_for("entry:alice:1", choices, None, answer) for answer in (True, False)}
    assert len(ids | {unanswered}) == 3, "a changed answer is a new decision (its answer wins)"
    assert [pair_answer(v) for v in ("match", "mismatch", "", None, True, False)] == [
        True,
        False,
        None,
        None,
        True,
        False,
    ]
    for hostile in ("yes", "MATCH", 0, 1, [], {}):
        with pytest.raises(RecordError):
            pair_answer(hostile)


def test_reviewed_pairs_are_itm_targets_only_where_the_reviewer_answered(tmp_path) -> None:
    import json

    from trainer.features import LoadedInputs
    from trainer.reviewed import read_reviewed

    tasks = {"hate": ["not_hateful", "hateful"]}
    lines = []
    for i, answer in enumerate((True, False, None, "yes")):
        meta = {"decision_id": f"d{i}", "decided_at": "2026-12-01T00:00:00+00:00"}
        if answer is not None:
            meta["image_text_match"] = answer
        lines.append({"id": f"p{i}", "text": "t", "image": None, "labels": {"hate": "hateful"}, "meta": meta})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples = read_reviewed(tmp_path, tasks)
    assert [e.meta["itm_target"] for e in examples] == [True, False, None, None]
    targets = LoadedInputs(examples, [None] * 4, [None] * 4).pair_targets.tolist()
    assert targets[:2] == [1.0, 0.0] and all(t != t for t in targets[2:]), "unanswered pairs are NaN (neither)"
