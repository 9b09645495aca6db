"""From a reviewer's choices to a `ReviewDecision`, and onto the `reviewed` topic.

`build_decision` is pure (unit-tested): it checks every task of the item has a valid action
and turns each into a TaskDecision with `modstream.records.reviewer_decision`, carrying the model's view
(version, per-task labels, ITM match, reasons, media hash) so the dataset sink and audits
need nothing else. `DecisionProducer` sends it with acks=all and waits for the broker; the
caller acknowledges the Redis entry only after that returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from modstream.kafka_auth import client_options, kafka_auth
from modstream.records import (
    ACTIONS,
    REVIEW_KINDS,
    AuditEvent,
    RecordError,
    ReviewDecision,
    ReviewItem,
    TaskDecision,
    encode,
    reviewer_decision,
)
from stream.bank_topic import BANK_TOPIC, send_updates
from stream.banks.bank import BankUpdate

log = logging.getLogger(__name__)

REVIEWED_TOPIC = "reviewed"
AUDIT_TOPIC = "audit"  # append-only: every act of a person besides decisions (AuditEvent)
MAX_NOTE = 2000


def model_label(item: ReviewItem, task: str) -> str | None:
    value = (item.label.get("labels") or {}).get(task) or {}
    label = value.get("label")
    return str(label) if label is not None else None


def item_tasks(item: ReviewItem) -> dict[str, list[str]]:
    """The item's tasks with their label sets; tasks the model labelled but `tasks` lacks get
    the model's label alone (confirm / skip / escalate still work)."""
    tasks = {t: list(labels) for t, labels in item.tasks.items()}
    for task in item.label.get("labels") or {}:
        if task not in tasks:
            label = model_label(item, task)
            tasks[task] = [label] if label else []
    return tasks


def build_decision(
    item: ReviewItem,
    reviewer: str,
    choices: Mapping[str, tuple[str, str | None]],
    *,
    note: str | None = None,
    decision_id: str | None = None,
    seen_media_hash: str | None = None,
    image_text_match: bool | None = None,
) -> ReviewDecision:
    """`choices`: task -> (action, chosen label or None). Every task needs an action.
    `seen_media_hash`: the hash of the image the reviewer was shown (None: none shown)."""
    tasks = item_tasks(item)
    unknown = sorted(set(choices) - set(tasks))
    if unknown:
        raise RecordError("decisions", f"unknown task(s) {', '.join(unknown)}; this item has {', '.join(tasks)}")
    missing = [t for t in tasks if t not in choices]
    if missing:
        raise RecordError("decisions", f"no decision for task(s) {', '.join(missing)}")
    decisions: dict[str, TaskDecision] = {}
    for task, labels in tasks.items():
        action, chosen = choices[task]
        if action not in ACTIONS:
            raise RecordError(f"decisions.{task}", f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
        try:
            decisions[task] = reviewer_decision(action, labels, model_label(item, task), chosen or None)
        except RecordError as exc:
            raise RecordError(f"decisions.{task}", exc.why) from exc
    if note is not None:
        note = note.strip()[:MAX_NOTE] or None
    media = item.label.get("media") or {}
    return ReviewDecision(
        decision_id=decision_id or str(uuid.uuid4()),
        post_id=item.post_id,
        reviewer=reviewer,
        decisions=decisions,
        model_version=str(item.label.get("model_version", "")),
        model_labels=dict(item.label.get("labels") or {}),
        text=item.text,
        image_url=item.image_url,
        media_hash=media.get("content_hash"),
        itm_match=item.label.get("itm_match"),
        reasons=list(item.reasons),
        queued_at=item.queued_at,
        note=note,
        seen_media_hash=seen_media_hash,
        image_text_match=image_text_match if item.image_url else None,
        kind=item.kind if item.kind in REVIEW_KINDS else "routed",
        routed_by_policy=item.routed_by_policy,
    )


def audit_choices(item: ReviewItem, choices: Mapping[str, tuple[str, str | None]]) -> dict[str, tuple[str, str | None]]:
    """An audit item's reviewer never saw the model's labels, so they give a label per task
    (action "label" with the label, the page's "label:<name>"), or not_violating, skip,
    escalate; confirm and correct presuppose the model's view and are refused. The label is
    recorded as the console would: the model's label -> confirm, another -> correct."""
    out: dict[str, tuple[str, str | None]] = {}
    for task, (action, label) in choices.items():
        if action.startswith("label:"):
            action, label = "label", action.removeprefix("label:")
        if action in ("confirm", "correct"):
            raise RecordError(f"decisions.{task}", "an audit item takes a label (action 'label'), not confirm/correct")
        if action == "label":
            if not label:
                raise RecordError(f"decisions.{task}", "action 'label' needs a label")
            out[task] = ("confirm", None) if label == model_label(item, task) else ("correct", label)
        else:
            out[task] = (action, label)
    return out


PAIR_ANSWERS = {"match": True, "mismatch": False, "": None}


def pair_answer(value: Any) -> bool | None:
    """The reviewer's image-text answer from an API body (true, false, null) or the page's
    form ("match", "mismatch", ""); RecordError for anything else."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in PAIR_ANSWERS:
        return PAIR_ANSWERS[value]
    raise RecordError("image_text_match", "must be true, false or null (the form: match, mismatch or empty)")


def choices_from_json(obj: Any) -> tuple[dict[str, tuple[str, str | None]], str | None]:
    """The API body `{"decisions": {task: {"action", "label"?}}, "note"?}` as choices."""
    if not isinstance(obj, dict) or not isinstance(obj.get("decisions"), dict):
        raise RecordError("decisions", 'expected {"decisions": {task: {"action": ..., "label": ...}}}')
    choices: dict[str, tuple[str, str | None]] = {}
    for task, value in obj["decisions"].items():
        if isinstance(value, str):
            value = {"action": value}
        if not isinstance(value, dict) or not isinstance(value.get("action"), str):
            raise RecordError(f"decisions.{task}", 'expected {"action": ..., "label": optional}')
        label = value.get("label")
        if label is not None and not isinstance(label, str):
            raise RecordError(f"decisions.{task}.label", "must be a string")
        choices[str(task)] = (value["action"], label)
    note = obj.get("note")
    if note is not None and not isinstance(note, str):
        raise RecordError("note", "must be a string")
    return choices, note


Choices = dict[str, tuple[str, str | None]]


def choices_from_form(form: Mapping[str, Any], tasks: list[str]) -> tuple[Choices, str | None]:
    """The item page's form: `action.<task>` and, for a correction, `label.<task>`."""
    choices: dict[str, tuple[str, str | None]] = {}
    for task in tasks:
        action = form.get(f"action.{task}")
        if isinstance(action, str) and action:
            label = form.get(f"label.{task}")
            choices[task] = (action, label if isinstance(label, str) and label else None)
    note = form.get("note")
    return choices, note if isinstance(note, str) else None


class KafkaUnavailable(RuntimeError):
    """The decision did not reach Kafka; nothing was acknowledged."""


class DecisionProducer:
    """aiokafka producer (acks=all, idempotent) started on first use and rebuilt after failures."""

    def __init__(self, bootstrap: str, *, topic: str = REVIEWED_TOPIC, timeout_s: float = 15.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer: Any = None
        self._lock = asyncio.Lock()

    async def _get(self) -> Any:
        from aiokafka import AIOKafkaProducer

        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    acks="all",
                    enable_idempotence=True,
                    request_timeout_ms=int(self.timeout_s * 1000),
                    linger_ms=0,
                    **client_options(),
                )
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()  # a half-started client still holds connections
                    raise
                self._producer = producer
            return self._producer

    async def send(self, decision: ReviewDecision) -> None:
        principal = kafka_auth().username if kafka_auth().secured else None
        if principal:
            decision = dataclasses.replace(decision, recorded_by=principal)
        await self._send(self.topic, decision.post_id, encode(decision), f"decision {decision.decision_id}")

    async def send_audit(self, event: AuditEvent, topic: str = AUDIT_TOPIC) -> None:
        """Record a person's act on the audit topic; KafkaUnavailable (the act must not happen) if not."""
        await self._send(topic, event.subject, encode(event), f"audit event {event.action} on {event.subject}")

    async def send_bank(self, update: BankUpdate, topic: str = BANK_TOPIC) -> None:
        """A verdict-bank change, keyed by its entry id (the topic is compacted on that key);
        KafkaUnavailable if the broker did not take it."""
        value = orjson.dumps(update.to_json())
        await self._send(topic, str(update.entry_id), value, f"bank update {update.op} {update.entry_id}")

    async def send_banks(self, updates: Sequence[BankUpdate], topic: str = BANK_TOPIC) -> None:
        """Many bank changes (an imported list) in flight together, all acknowledged or
        KafkaUnavailable (a retry resends them: each is keyed by its entry, so it converges)."""
        try:
            async with asyncio.timeout(self.timeout_s + len(updates) / 500):
                await send_updates(await self._get(), updates, topic)
        except Exception as exc:
            log.warning("%d bank updates not produced: %r", len(updates), exc)
            await self._reset()
            raise KafkaUnavailable(f"could not write the bank updates to Kafka ({type(exc).__name__}: {exc})") from exc

    async def send_tombstone(self, topic: str, key: str) -> None:
        """A null value keyed `key`: on `reviewed`, the dataset sink erases that post."""
        await self._send(topic, key, None, f"tombstone for {key}")

    async def _send(self, topic: str, key: str, value: bytes | None, what: str) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                producer = await self._get()
                await producer.send_and_wait(topic, value, key=key.encode())
        except Exception as exc:
            log.warning("%s not produced: %r", what, exc)
            await self._reset()
            kind = what.split(" ")[0]
            raise KafkaUnavailable(f"could not write the {kind} record to Kafka ({type(exc).__name__}: {exc})") from exc

    async def _reset(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5)
            except Exception:  # a broken producer may fail to stop; it is dropped either way
                log.debug("producer stop failed", exc_info=True)

    async def close(self) -> None:
        await self._reset()
