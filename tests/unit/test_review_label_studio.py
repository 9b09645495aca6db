"""Label Studio interop: tasks + labeling config out, a realistic JSON export back in."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from modstream.records import RecordError, ReviewItem
from review.label_studio import (
    annotation_choices,
    confidence,
    decision_for,
    labeling_config,
    parse_export,
    task_sets_of,
    tasks_from_items,
)


def item(post_id: str, hate: str = "hateful", sarcasm: str = "not_sarcastic", image: str | None = "http://cdn/x.png"):
    return ReviewItem(
        post_id=post_id,
        text=f"caption of {post_id} & <friends>",
        image_url=image,
        reasons=["weak_image_text_match"],
        label={
            "post_id": post_id,
            "labels": {
                "hate": {"label": hate, "score": 0.71, "decision": hate == "hateful", "threshold": 0.5},
                "sarcasm": {"label": sarcasm, "score": 0.33, "decision": sarcasm == "sarcastic", "threshold": 0.45},
            },
            "itm_match": 0.08,
            "media": {"status": "ok", "url": image, "content_hash": "cd" * 32},
            "model_version": "v0003",
        },
        tasks={"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]},
        queued_at="2026-11-28T06:00:00.000+00:00",
    )


ITEMS = [("1795849801844-0", item("post-a")), ("1795849801900-0", item("post-b", image=None))]


def test_tasks_are_in_label_studio_import_format() -> None:
    tasks = tasks_from_items(ITEMS)
    json.dumps(tasks)  # serialisable as is
    first = tasks[0]
    assert first["id"] == 1
    assert first["data"] == {"text": "caption of post-a & <friends>", "image": "http://cdn/x.png", "post_id": "post-a"}
    assert confidence({"score": 0.2, "decision": False}) == 0.8 and confidence({"score": "x"}) is None
    assert first["meta"]["entry_id"] == "1795849801844-0"
    assert first["meta"]["model_version"] == "v0003"
    assert ReviewItem.from_json(first["meta"]["review_item"]) == ITEMS[0][1]
    (prediction,) = first["predictions"]
    assert prediction["model_version"] == "v0003"
    assert {r["from_name"]: r["value"]["choices"] for r in prediction["result"]} == {
        "hate": ["hateful"],
        "sarcasm": ["not_sarcastic"],
    }
    assert all(r["to_name"] == "text" and r["type"] == "choices" for r in prediction["result"])
    assert tasks[1]["data"]["image"] == "", "every task has the key (Label Studio refuses one without)"
    # Label Studio reads `score` as the confidence in the pre-filled choices: the least sure
    # task's probability of the label given (hate: 0.71 positive; sarcasm: 1 - 0.33 negative).
    assert prediction["score"] == 0.67
    scores = first["meta"]["model_scores"]
    assert scores["hate"] == {"label": "hateful", "confidence": 0.71, "positive_probability": 0.71, "threshold": 0.5}
    assert scores["sarcasm"]["confidence"] == 0.67 and scores["sarcasm"]["positive_probability"] == 0.33


def test_labeling_config_has_one_choices_block_per_task_matching_the_tasks() -> None:
    xml = labeling_config(task_sets_of(i for _, i in ITEMS))
    view = ET.fromstring(xml)
    assert view.tag == "View"
    names = {el.get("name"): el for el in view.iter("Choices")}
    assert set(names) == {"hate", "sarcasm", "review_flag"}
    assert [c.get("value") for c in names["hate"]] == ["not_hateful", "hateful"]
    assert all(el.get("toName") == "text" and el.get("choice") == "single" for el in names.values())
    assert {el.get("name") for el in view.iter("Text")} == {"text"}
    assert view.find("Text").get("value") == "$text"  # type: ignore[union-attr]
    assert view.find("Image").get("value") == "$image"  # type: ignore[union-attr]
    # Every prediction's from_name/to_name exists in the config.
    for task in tasks_from_items(ITEMS):
        for region in task["predictions"][0]["result"]:
            assert region["from_name"] in names and region["to_name"] == "text"


def test_labeling_config_escapes_odd_label_names() -> None:
    xml = labeling_config({"hate": ['a"b', "<c>&"]})
    choices = [c.get("value") for c in ET.fromstring(xml).iter("Choice")]
    assert choices[:2] == ['a"b', "<c>&"]


def _annotation(ann_id: int, results: list[dict[str, Any]], *, cancelled: bool = False, updated: str) -> dict:
    return {
        "id": ann_id,
        "completed_by": 3,
        "result": results,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": updated,
        "updated_at": updated,
        "draft_created_at": None,
        "lead_time": 12.93,
        "prediction": {},
        "result_count": 0,
        "unique_id": f"u-{ann_id}",
        "import_id": None,
        "last_action": None,
        "task": 1,
        "project": 4,
        "updated_by": 3,
        "parent_prediction": 17,
        "parent_annotation": None,
        "last_created_by": None,
    }


def _choice(name: str, value: str, region_id: str = "r1") -> dict:
    return {
        "value": {"choices": [value]},
        "id": region_id,
        "from_name": name,
        "to_name": "text",
        "type": "choices",
        "origin": "manual",
    }


def export_sample() -> list[dict]:
    """Shaped like Label Studio's JSON export of the tasks above (ids reassigned by LS)."""
    tasks = tasks_from_items(ITEMS)
    out = []
    for ls_id, task in zip((101, 102), tasks, strict=True):
        exported = copy.deepcopy(task)
        exported.pop("predictions")
        exported.update(
            id=ls_id,
            file_upload="3c1f1a2e-tasks.json",
            drafts=[],
            predictions=[17 if ls_id == 101 else 18],
            created_at="2026-11-28T06:10:00.000000Z",
            updated_at="2026-11-28T06:20:00.000000Z",
            inner_id=ls_id - 100,
            total_annotations=1,
            cancelled_annotations=0,
            total_predictions=1,
            comment_count=0,
            unresolved_comment_count=0,
            last_comment_updated_at=None,
            project=4,
            updated_by=3,
            comment_authors=[],
        )
        out.append(exported)
    out[0]["annotations"] = [
        _annotation(1, [_choice("hate", "hateful")], cancelled=True, updated="2026-11-28T06:15:00Z"),
        _annotation(
            2,
            [
                _choice("hate", "not_hateful", "r2"),
                _choice("sarcasm", "sarcastic", "r3"),
                {
                    "value": {"text": ["irony, not hate"]},
                    "id": "r4",
                    "from_name": "note",
                    "to_name": "text",
                    "type": "textarea",
                    "origin": "manual",
                },
            ],
            updated="2026-11-28T06:19:00Z",
        ),
    ]
    out[1]["annotations"] = [
        _annotation(
            3, [_choice("hate", "hateful"), _choice("review_flag", "escalate", "r9")], updated="2026-11-28T06:18Z"
        )
    ]
    out.append({"id": 103, "data": {"text": "t", "image": "", "post_id": "post-c"}, "annotations": [], "meta": {}})
    out.append({"id": 104, "data": {"text": "no id"}, "annotations": []})
    return out


def test_export_is_read_back_as_decisions() -> None:
    annotated, skipped, errors = parse_export(json.loads(json.dumps(export_sample())))
    assert [a.post_id for a in annotated] == ["post-a", "post-b"]
    assert len(skipped) == 1 and "post-c" in skipped[0]
    assert len(errors) == 1 and "post_id" in errors[0]
    first, second = annotated
    assert first.annotation_id == 2  # the newest annotation that was not cancelled
    assert first.chosen == {"hate": "not_hateful", "sarcasm": "sarcastic"}
    assert first.note == "irony, not hate"
    assert first.item == ITEMS[0][1]
    decision = decision_for(first, ITEMS[0][1], "ls-team")
    assert {t: (d.action, d.label) for t, d in decision.decisions.items()} == {
        "hate": ("not_violating", "not_hateful"),
        "sarcasm": ("correct", "sarcastic"),
    }
    assert decision.reviewer == "ls-team" and decision.note == "irony, not hate"
    assert decision.model_version == "v0003" and decision.media_hash == "cd" * 32
    assert decision_for(first, ITEMS[0][1], "ls-team").decision_id == decision.decision_id  # stable on re-import
    # An annotation edited in Label Studio after the import is a new decision: by its update
    # time, and by what it says (an edit that keeps the time still changes the id).
    import dataclasses

    later = dataclasses.replace(first, updated_at="2026-12-24T10:00:00Z")
    relabelled = dataclasses.replace(first, chosen={"hate": "hateful", "sarcasm": "sarcastic"})
    ids = {decision_for(x, ITEMS[0][1], "ls-team").decision_id for x in (first, later, relabelled)}
    assert len(ids) == 3
    escalated = decision_for(second, ITEMS[1][1], "ls-team")
    assert {d.action for d in escalated.decisions.values()} == {"escalate"}


def test_choice_mapping_confirm_skip_and_bad_labels() -> None:
    annotated, _, _ = parse_export(export_sample())
    one = annotated[0]
    one.chosen = {"hate": "hateful"}  # the model's label; sarcasm left unanswered
    assert annotation_choices(one, ITEMS[0][1]) == {"hate": ("confirm", None), "sarcasm": ("skip", None)}
    one.chosen = {"hate": "maybe"}
    with pytest.raises(RecordError, match="not one of"):
        annotation_choices(one, ITEMS[0][1])
    one.chosen = {"spam": "yes"}
    with pytest.raises(RecordError, match="unknown task"):
        annotation_choices(one, ITEMS[0][1])


def test_not_an_export_is_refused() -> None:
    with pytest.raises(ValueError, match="list of tasks"):
        parse_export({"tasks": []})


def test_an_audit_item_is_exported_blind() -> None:
    import dataclasses

    audit = dataclasses.replace(item("post-audit"), kind="audit")
    (task,) = tasks_from_items([("1795849801999-0", audit)])
    assert "predictions" not in task, "no pre-filled model labels for a blind audit"
    text = json.dumps(task)
    assert "0.71" not in text and "0.33" not in text and '"score"' not in text, "no model output anywhere"
    assert '"label": "hateful"' not in text and '"decision"' not in text
    assert task["meta"]["kind"] == "audit" and task["data"]["post_id"] == "post-audit"
