"""Label Studio interop: open review items out as tasks, annotations back in as decisions.

Export (Label Studio's JSON import format): a list of tasks
`{"id", "data": {"text", "image", "post_id"}, "meta": {...}, "predictions": [...]}`; `meta`
carries the whole ReviewItem for reference, and `predictions` pre-fill the model's labels
(Label Studio shows them as a starting point). The labeling config has
one `<Choices name=TASK toName="text">` per task with the task's labels, a
`<Choices name="review_flag">` with `escalate`, and a `<TextArea name="note">`.

Import (Label Studio's JSON export): for each task, the newest annotation that was not
cancelled; each `result[]` entry of type `choices` whose `from_name` is a task gives the
label chosen. The label becomes an action the way the console would record it: the model's
label -> confirm, the negative label -> not_violating, another label -> correct; a task
left unanswered -> skip; `review_flag: escalate` -> escalate for every task, and the item
goes to the escalated stream for admins, as from the console. An annotation that chooses
nothing is refused (the item stays queued). Only posts in the review queue are decided, and
always from the queue's own copy of the item: a file's `meta` is never trusted (a forged task
is refused). An item a console reviewer holds right now (a live claim) is skipped, saying by
whom, and so is a post decided in the console. The decision id is derived from the Label
Studio task, the annotation, its update time and what it says: importing a file twice gives
the same ids (the second time: "already imported"), and an annotation edited after an import
is a new decision, whose labels win downstream (the ids Label Studio decisions got per post
are kept in Redis, so an edit is told from a console decision). Double review applies as in the
console (`import_export_file`): a sampled post's annotation is a first review that waits for a
different reviewer; gold items are neither exported nor imported.

Media: Label Studio's browser loads `data.image` itself. With `--media-base-url` (and
MODSTREAM_MEDIA_LINK_KEY), the export points it at signed, expiring links to the console's
copy of the bytes the model scored (review/media_links.py: CORS-enabled, no session needed);
without, at the post's own URL (which may serve other bytes by now, and rarely sends CORS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modstream.records import RecordError, ReviewDecision, ReviewItem
from review.agreement import SecondReviewSampler, disagreement_note, review_stage
from review.bank_verdicts import entry_for, with_variants
from review.decisions import build_decision, item_tasks, model_label
from stream.banks.bank import BankUpdate
from stream.evidence import DIGEST, EvidenceStore

FLAG = "review_flag"
NOTE = "note"
_NAMESPACE = uuid.UUID("6f1c7a52-1d0e-4a4e-9f43-5d1e4a8b2c11")


# -- export ---------------------------------------------------------------------------------


def confidence(task_label: dict[str, Any]) -> float | None:
    """The model's confidence in the label it gives a task: the probability of that label
    (`score` is the positive class's probability; a negative label's is 1 - score)."""
    score = task_label.get("score")
    if not isinstance(score, int | float) or isinstance(score, bool):
        return None
    return float(score) if task_label.get("decision") else 1.0 - float(score)


@dataclass(frozen=True)
class MediaLinks:
    """Signed links to the console's copy of the scored bytes (review/media_links.py)."""

    key: str
    base_url: str
    ttl_s: float

    def link(self, digest: str) -> str:
        from review.media_links import sign

        return sign(self.key, self.base_url, digest, self.ttl_s)

    def no_image(self) -> str:
        return f"{self.base_url.rstrip('/')}/ls-media/none.png"


def item_to_task(task_id: int, entry_id: str, item: ReviewItem, links: MediaLinks | None = None) -> dict[str, Any]:
    """One Label Studio task. `predictions[].score` is what Label Studio reads as confidence:
    the model's least confident pre-filled choice; each task's positive-class probability and
    threshold are in `meta.model_scores`. With `links`, the image is a signed link to the bytes
    the model scored, or the console's "no image" placeholder for a post the model saw as text
    only; without, the post's own URL ("" for none). Every task has an `image` key: a real Label
    Studio server refuses to import a task without the key its Image tag names."""
    labels = item.label.get("labels") or {}
    result = []
    confidences = []
    model_scores: dict[str, Any] = {}
    for task in item_tasks(item):
        label = model_label(item, task)
        if label is None:
            continue
        result.append({"from_name": task, "to_name": "text", "type": "choices", "value": {"choices": [label]}})
        task_label = labels.get(task) or {}
        sure = confidence(task_label)
        if sure is not None:
            confidences.append(sure)
        model_scores[task] = {
            "label": label,
            "confidence": None if sure is None else round(sure, 4),
            "positive_probability": task_label.get("score"),
            "threshold": task_label.get("threshold"),
        }
    data: dict[str, Any] = {"text": item.text, "post_id": item.post_id}
    scored = (item.label.get("media") or {}).get("content_hash")
    if links is not None:
        if item.image_url and isinstance(scored, str) and DIGEST.fullmatch(scored):
            data["image"] = links.link(scored)
        else:  # Label Studio refuses a task without its Image tag's key: a placeholder says why
            data["image"] = links.no_image()
    else:
        data["image"] = item.image_url or ""
    ls_task: dict[str, Any] = {
        "id": task_id,
        "data": data,
        "meta": {
            "post_id": item.post_id,
            "entry_id": entry_id,
            "model_version": item.label.get("model_version"),
            "itm_match": item.label.get("itm_match"),
            "reasons": list(item.reasons),
            "model_scores": model_scores,
            "review_item": item.to_json(),
        },
    }
    if item.kind == "audit":
        # A blind audit item: the annotator must not see the model's labels (no predictions to
        # pre-fill, no scores in meta, the item in meta blinded).
        ls_task["meta"].update(model_version=None, itm_match=None, reasons=["audit"], model_scores={})
        ls_task["meta"]["review_item"] = item.blinded()
        ls_task["meta"]["kind"] = "audit"
        return ls_task
    if result:
        prediction: dict[str, Any] = {"model_version": str(item.label.get("model_version", "")), "result": result}
        if confidences:
            prediction["score"] = round(min(confidences), 4)
        ls_task["predictions"] = [prediction]
    return ls_task


def tasks_from_items(items: Sequence[tuple[str, ReviewItem]], links: MediaLinks | None = None) -> list[dict[str, Any]]:
    return [item_to_task(i + 1, entry_id, item, links) for i, (entry_id, item) in enumerate(items)]


def labeling_config(task_sets: dict[str, list[str]]) -> str:
    """The project's labeling config: the post, one single-choice block per task, a flag, a note."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image", zoom="true")
    ET.SubElement(view, "Header", value="Post text")
    ET.SubElement(view, "Text", name="text", value="$text")
    for task, labels in task_sets.items():
        ET.SubElement(view, "Header", value=task)
        choices = ET.SubElement(view, "Choices", name=task, toName="text", choice="single", showInline="true")
        for label in labels:
            ET.SubElement(choices, "Choice", value=label)
    ET.SubElement(view, "Header", value="Needs a specialist?")
    flag = ET.SubElement(view, "Choices", name=FLAG, toName="text", choice="single", showInline="true")
    ET.SubElement(flag, "Choice", value="escalate")
    ET.SubElement(view, "TextArea", name=NOTE, toName="text", rows="2", maxSubmissions="1", editable="true")
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def task_sets_of(items: Iterable[ReviewItem]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    for item in items:
        for task, labels in item_tasks(item).items():
            known = sets.setdefault(task, [])
            known.extend(label for label in labels if label not in known)
    return sets


async def export_open_items(
    redis_url: str, out: Path, config_out: Path | None, *, limit: int = 10_000, links: MediaLinks | None = None
) -> tuple[int, Path]:
    import redis.asyncio as aioredis

    from review.queue import ReviewQueue

    client = aioredis.Redis.from_url(redis_url)
    try:
        queue = ReviewQueue(client)
        await queue.ensure_group()
        items = await queue.open_items(limit)
        gold = await queue.gold_items()  # answered in the console only (the import refuses them)
        items = [(entry_id, item) for entry_id, item in items if item.post_id not in gold]
    finally:
        await client.aclose()
    tasks = tasks_from_items(items, links)
    config_path = config_out or out.with_name(out.stem + ".labeling-config.xml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks, ensure_ascii=False, indent=1))
    config_path.write_text(labeling_config(task_sets_of(item for _, item in items) or {}))
    return len(tasks), config_path


# -- import ---------------------------------------------------------------------------------


@dataclass
class Annotated:
    """One Label Studio task read back: the post, what the annotator chose, the ids."""

    post_id: str
    ls_task_id: Any
    annotation_id: Any
    chosen: dict[str, str]  # task -> label
    escalate: bool
    note: str | None
    item: ReviewItem | None  # from the export's meta, when present
    updated_at: str = ""


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"imported {len(self.imported)}, skipped {len(self.skipped)}, errors {len(self.errors)}"]
        lines += [f"  imported: post {s}" for s in self.imported]
        lines += [f"  skipped: {s}" for s in self.skipped]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


def _latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return None
    return max(annotations, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id"))))


def parse_export(export: Any) -> tuple[list[Annotated], list[str], list[str]]:
    """Label Studio's JSON export -> annotated tasks, skipped (why), errors (why)."""
    if not isinstance(export, list):
        raise ValueError("a Label Studio JSON export is a list of tasks")
    out: list[Annotated] = []
    skipped: list[str] = []
    errors: list[str] = []
    for index, task in enumerate(export):
        where = f"task {task.get('id', index) if isinstance(task, dict) else index}"
        if not isinstance(task, dict):
            errors.append(f"{where}: not an object")
            continue
        data = task.get("data") or {}
        meta = task.get("meta") or {}
        post_id = data.get("post_id") or meta.get("post_id")
        if not isinstance(post_id, str) or not post_id:
            errors.append(f"{where}: no data.post_id (was it exported by modstream?)")
            continue
        annotation = _latest_annotation(task)
        if annotation is None:
            skipped.append(f"{where} (post {post_id}): no annotation that was not cancelled")
            continue
        chosen: dict[str, str] = {}
        escalate = False
        note = None
        for region in annotation.get("result") or []:
            if not isinstance(region, dict):
                continue
            name, kind, value = region.get("from_name"), region.get("type"), region.get("value") or {}
            if kind == "choices":
                picked = value.get("choices") or []
                if not picked:
                    continue
                if name == FLAG:
                    escalate = "escalate" in picked
                elif isinstance(name, str):
                    chosen[name] = str(picked[0])
            elif kind == "textarea" and name == NOTE:
                texts = value.get("text") or []
                note = "\n".join(str(t) for t in texts) or None
        item = None
        if isinstance(meta.get("review_item"), dict):
            try:
                item = ReviewItem.from_json(meta["review_item"])
            except RecordError as exc:
                errors.append(f"{where}: meta.review_item is not a review item ({exc})")
                continue
        updated = str(annotation.get("updated_at") or annotation.get("created_at") or "")
        out.append(Annotated(post_id, task.get("id"), annotation.get("id"), chosen, escalate, note, item, updated))
    return out, skipped, errors


def annotation_choices(annotated: Annotated, item: ReviewItem) -> dict[str, tuple[str, str | None]]:
    """The console's choices for an annotation (see the module docstring for the mapping)."""
    tasks = item_tasks(item)
    unknown = sorted(set(annotated.chosen) - set(tasks))
    if unknown:
        raise RecordError("result", f"unknown task(s) {', '.join(unknown)}; the item has {', '.join(tasks)}")
    choices: dict[str, tuple[str, str | None]] = {}
    for task, labels in tasks.items():
        label = annotated.chosen.get(task)
        if annotated.escalate:
            choices[task] = ("escalate", None)
        elif label is None:
            choices[task] = ("skip", None)
        elif label not in labels:
            raise RecordError(f"result.{task}", f"{label!r} is not one of {labels}")
        elif label == model_label(item, task):
            choices[task] = ("confirm", None)
        elif labels and label == labels[0]:
            choices[task] = ("not_violating", None)
        else:
            choices[task] = ("correct", label)
    return choices


def decision_id_of(annotated: Annotated) -> str:
    """Same annotation, same id; an edit (a new update time, other choices or note) a new one."""
    said = json.dumps(
        {"chosen": annotated.chosen, "escalate": annotated.escalate, "note": annotated.note or ""}, sort_keys=True
    )
    key = f"{annotated.post_id}:{annotated.ls_task_id}:{annotated.annotation_id}:{annotated.updated_at}:{said}"
    return str(uuid.uuid5(_NAMESPACE, key))


def decision_for(annotated: Annotated, item: ReviewItem, reviewer: str) -> ReviewDecision:
    decision_id = decision_id_of(annotated)
    return build_decision(
        item, reviewer, annotation_choices(annotated, item), note=annotated.note, decision_id=decision_id
    )


async def import_export_file(
    source: Path,
    reviewer: str,
    *,
    bootstrap: str,
    redis_url: str,
    evidence: EvidenceStore | None = None,
    second_reviews: SecondReviewSampler | None = None,
) -> ImportReport:
    """Produce one ReviewDecision per annotated task to `reviewed`, then mark the post decided
    and ack its entry. A failure to produce stops the import (what was done stays done).

    Double review as in the console (review/agreement.py `review_stage`, with the console's
    sampler: `second_reviews`, None for none): a sampled post's labelling annotation is its first
    review (stage `first`: never trains, nothing banked), kept in the pair and the entry left open
    (parked if pending) for a different reviewer, in the console or a later import under another
    `reviewer`; an annotation of a post waiting for its second review is that second review
    (agreed, or disagreed and escalated) unless `reviewer` gave the first. A finished pair is not
    reopened by an edit. Gold items are answered in the console only (their answers score the
    reviewer and never train): refused here."""
    import redis.asyncio as aioredis

    from review.auth import check_name
    from review.decisions import DecisionProducer
    from review.queue import PARKED, QueueError, ReviewQueue

    check_name(reviewer)
    sampler = second_reviews or SecondReviewSampler(0.0, b"unused: no double review")
    try:
        export = json.loads(source.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    annotated, skipped, errors = parse_export(export)
    report = ImportReport(skipped=skipped, errors=errors)
    client = aioredis.Redis.from_url(redis_url)
    producer = DecisionProducer(bootstrap)
    try:
        queue = ReviewQueue(client)
        await queue.ensure_group()
        live: dict[str, tuple[str, ReviewItem]] = {}
        start = "-"
        while True:  # one pass over the stream: the live items by post id
            rows = await queue._range(queue.stream, start, "+", count=1000)
            for found_id, fields in rows:
                with contextlib.suppress(RecordError):
                    found = ReviewItem.from_json(fields.get("item", ""))
                    live[found.post_id] = (found_id, found)
            if len(rows) < 1000:
                break
            start = "(" + rows[-1][0]
        for one in annotated:
            if one.post_id not in live:
                # Only what the queue holds can be decided, and only from the queue's own copy:
                # the file's meta.review_item could be anything (a forged post, another image).
                report.errors.append(f"post {one.post_id}: not in the review queue (never routed?): refused")
                continue
            entry_id, item = live[one.post_id]
            if not one.escalate and not one.chosen:
                report.errors.append(f"post {one.post_id}: the annotation chooses nothing: refused, still queued")
                continue
            try:
                decision = decision_for(one, item, reviewer)
            except RecordError as exc:
                report.errors.append(f"post {one.post_id}: {exc}")
                continue
            marker = await client.get(queue.decided_key(one.post_id))
            decided = marker.decode() if isinstance(marker, bytes) else marker
            ours = queue.prefix + ":review:label-studio:" + one.post_id  # the ids this import gave the post
            pair = await queue.pair(one.post_id)
            if decided == decision.decision_id or (pair is not None and pair.first_decision_id == decision.decision_id):
                report.skipped.append(f"post {one.post_id}: already imported (this annotation, unchanged)")
                continue
            if pair is not None and pair.state != "first":
                report.skipped.append(f"post {one.post_id}: its double review is over ({pair.state}): not reopened")
                continue
            if decided is not None and not await client.sismember(ours, decided):
                report.skipped.append(f"post {one.post_id}: already decided in the console (decision {decided})")
                continue
            holder = await queue.holder(entry_id) if decided is None else None
            if holder is not None and holder != PARKED:
                report.skipped.append(
                    f"post {one.post_id}: held by {holder} in the console right now: import again once they are done"
                )
                continue
            try:
                stage = await review_stage(queue, sampler, one.post_id, decision)
            except RecordError:
                report.skipped.append(
                    f"post {one.post_id}: {reviewer} gave it its first review; a different reviewer decides it"
                )
                continue
            if stage == "gold":
                report.errors.append(f"post {one.post_id}: a gold item is answered in the console only: refused")
                continue
            if stage == "first" and decided is not None:
                stage = "single"  # an edit of a post this import decided before double review picked it
            decision = dataclasses.replace(decision, review_stage=stage)
            await producer.send(decision)  # KafkaUnavailable ends the import here
            # Only when the annotator saw the scored image, and only a verdict that trains (as the
            # console: a first review or a disagreement is not settled).
            banked = entry_for(decision, item) if decision.trains else None
            if banked is not None and evidence is not None:
                banked = await with_variants(banked, evidence)
            if banked is not None:
                await producer.send_bank(BankUpdate.add(banked))
            await client.sadd(ours, decision.decision_id)
            await client.expire(ours, queue.decided_ttl_s)
            labels = decision.training_labels()
            try:
                if stage == "first":
                    await queue.first_review_done(
                        entry_id, one.post_id, reviewer, decision.decision_id, labels, item.kind, claimed=False
                    )
                    report.imported.append(f"{one.post_id} (first of two reviews: waits for a second reviewer)")
                    continue
                if stage in ("agreed", "disagreed"):
                    note = disagreement_note(pair, decision) if stage == "disagreed" else ""
                    await queue.second_review_done(
                        entry_id, one.post_id, reviewer, decision.decision_id, stage, labels, note, claimed=False
                    )
                    report.imported.append(f"{one.post_id} (second review: {stage})")
                    continue
            except QueueError as exc:  # a console reviewer got there between the checks and now
                report.errors.append(f"post {one.post_id}: decision {decision.decision_id} is on record, but {exc}")
                continue
            if decision.escalated:
                await queue.add_escalation(entry_id, item, reviewer, decision.decision_id, one.note)
            await queue.mark_decided(one.post_id, decision.decision_id, reviewer, entry_id=entry_id)
            report.imported.append(one.post_id + (" (an edit of an earlier import: its labels win)" if decided else ""))
    finally:
        await producer.close()
        await client.aclose()
    return report
