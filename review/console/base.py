"""What every group of handlers shares: small helpers and the operations on claims and
escalations that a page and the API both perform."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from modstream.records import AuditEvent, RecordError, ReviewDecision, ReviewItem, decode_json
from review.agreement import disagreement_note, gold_result, review_stage
from review.auth import User
from review.bank_verdicts import entry_for, with_variants
from review.console.core import IDENTITY, Console, Identity
from review.console.middlewares import _json_error, _wants_json
from review.decisions import (
    KafkaUnavailable,
    audit_choices,
    build_decision,
    item_tasks,
    model_label,
)
from review.queue import Claim, NotClaimed, QueueError
from stream.banks.bank import BankUpdate

log = logging.getLogger(__name__)


MAX_BODY_BYTES = 1024 * 1024  # the app's client_max_size too


async def json_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 response to return: bounded in size and depth
    (a body of 100,000 nested brackets made the stdlib parser raise RecursionError: a 500)."""
    try:
        return decode_json(await request.read(), max_bytes=MAX_BODY_BYTES)
    except RecordError as exc:
        return _json_error(400, f"body must be a JSON object: {exc.why}")


class SubmitInProgress(QueueError):
    """Another request is recording a decision on this item right now (a double submit)."""

    def __init__(self, decision_id: str, same: bool) -> None:
        super().__init__(
            "the same decision is being recorded by another request"
            if same
            else f"another decision ({decision_id}) is being recorded for this item"
        )
        self.decision_id = decision_id
        self.same = same


class ClaimLostAfterProduce(NotClaimed):
    """The decision reached Kafka, but the submitter no longer held the item when it was to
    be closed (the produce outlasted the claim timeout): the item stays with its new holder."""


RENEW_FLOOR_MS = 250  # a heartbeat no more often than this, however short the claim timeout


def renew_interval_ms(claim_timeout_s: float) -> int:
    """Three heartbeats per claim timeout: two can be lost (a slow network, a throttled
    background tab) before the claim lapses."""
    return max(RENEW_FLOOR_MS, int(claim_timeout_s * 1000 / 3))


LOST_TITLE = "Item reassigned"

LOST_MESSAGE = (
    "This item was reassigned to another reviewer (or closed) before your decision was saved: "
    "your claim on it lapsed. Nothing was recorded for it."
)

LOST_AFTER_PRODUCE_MESSAGE = (
    "Your decision was written to the decision log, but this item had been reassigned to another "
    "reviewer before it could be closed; it stays with them, and the later decision is the one kept."
)


def decision_id_for(
    scope: str, choices: Mapping[str, tuple[str, str | None]], note: str | None, pair: bool | None = None
) -> str:
    """A decision's id from where it was made (`scope`) and what it says. An identical retry
    after a Kafka timeout (whose first attempt may have reached the topic after all) gets the
    same id, which the dataset sink recognises as a replay; a resubmit with other labels or
    another note is a new decision, and being the later one, its labels win. (One id per
    claim made the dataset keep the first labels of a corrected resubmit.)"""
    said: dict[str, Any] = {
        "choices": sorted([task, action, label] for task, (action, label) in choices.items()),
        "note": note or "",
    }
    if pair is not None:  # absent when unanswered, so ids made before the question are unchanged
        said["image_text_match"] = pair
    content = json.dumps(said, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(content.encode()).hexdigest()
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"modstream-review:{scope}:{digest}"))


def claim_decision_id(
    claim: Claim, choices: Mapping[str, tuple[str, str | None]], note: str | None, pair: bool | None = None
) -> str:
    return decision_id_for(f"{claim.entry_id}:{claim.reviewer}:{claim.deliveries}", choices, note, pair)


def _ident(request: web.Request) -> Identity:
    ident: Identity = request[IDENTITY]
    return ident


def _require_admin(request: web.Request) -> User:
    user = _ident(request).user
    if not user.is_admin:
        if _wants_json(request):
            raise web.HTTPForbidden(text=json.dumps({"error": "admin role required"}), content_type="application/json")
        raise web.HTTPForbidden(text="admin role required")
    return user


def _task_rows(
    claim: Claim, chosen: dict[str, tuple[str, str | None]] | None = None, *, blind: bool = False
) -> list[dict[str, Any]]:
    """The page's rows per task; `blind` (an audit item): without the model's label and score."""
    item = claim.item
    rows = []
    tasks = item_tasks(item)
    for index, (task, labels) in enumerate(tasks.items()):
        if blind:  # only the item's own label sets: one made from the model's label would show it
            labels = list(item.tasks.get(task, []))
        value = {} if blind else (item.label.get("labels") or {}).get(task) or {}
        action, label = (chosen or {}).get(task, ("", None))
        rows.append(
            {
                "index": index + 1,
                "name": task,
                "labels": labels,
                "model_label": None if blind else model_label(item, task),
                "score": value.get("score"),
                "threshold": value.get("threshold"),
                "decision": value.get("decision"),
                "action": action,
                "chosen": label,
            }
        )
    return rows


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SettledElsewhere(QueueError):
    """The admin's decision reached Kafka, but another admin settled or dismissed the
    escalation during the produce: nothing more is changed in Redis."""


def escalation_decision_id(
    escalation_id: str, admin: str, choices: Mapping[str, tuple[str, str | None]], note: str | None
) -> str:
    """As `decision_id_for`, per (escalation, admin): an identical retry is the same decision,
    a changed one a new decision."""
    return decision_id_for(f"escalation:{escalation_id}:{admin}", choices, note)


def admin_choices(item: ReviewItem, labels: Any) -> dict[str, tuple[str, str | None]]:
    """An admin's final labels (task -> label name, or empty / None for no label) as the
    choices `build_decision` takes: the model's label is a confirm, the task's first
    (negative) label not_violating, any other label a correction; no label a skip. RecordError
    for a task or label the item does not have, or when nothing at all is labelled."""
    if not isinstance(labels, Mapping):
        raise RecordError("labels", "expected {task: label or null}")
    tasks = item_tasks(item)
    unknown = sorted(set(labels) - set(tasks))
    if unknown:
        raise RecordError("labels", f"unknown task(s) {', '.join(map(str, unknown))}; this item has {', '.join(tasks)}")
    choices: dict[str, tuple[str, str | None]] = {}
    for task, names in tasks.items():
        chosen = labels.get(task)
        if chosen is not None and not isinstance(chosen, str):
            raise RecordError(f"labels.{task}", "must be a label name or null")
        if not chosen:
            choices[task] = ("skip", None)
        elif chosen not in names:
            raise RecordError(f"labels.{task}", f"{chosen!r} is not one of {names}")
        elif chosen == model_label(item, task):
            choices[task] = ("confirm", None)
        elif chosen == names[0]:
            choices[task] = ("not_violating", None)
        else:
            choices[task] = ("correct", chosen)
    if all(action == "skip" for action, _ in choices.values()):
        raise RecordError("labels", "choose a label for at least one task (or dismiss the escalation)")
    return choices


def _escalation_row(entry: dict[str, Any]) -> dict[str, Any]:
    """What the escalations page shows of one entry; an unreadable item can only be dismissed."""
    item: ReviewItem | None = None
    error = ""
    try:
        item = ReviewItem.from_json(entry.get("item", ""))
    except RecordError as exc:
        error = f"unreadable item: {exc}"
    tasks = []
    if item is not None:
        for task, names in item_tasks(item).items():
            value = (item.label.get("labels") or {}).get(task) or {}
            tasks.append(
                {"name": task, "labels": names, "model_label": model_label(item, task), "score": value.get("score")}
            )
    try:
        at_ms = int(entry.get("escalated_at", ""))
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at_ms / 1000))
        age: float | None = max(0.0, time.time() - at_ms / 1000)
    except ValueError:
        when, age = "?", None
    return {
        "id": entry["id"],
        "post_id": entry.get("post_id", ""),
        "text": item.text if item else "",
        "tasks": tasks,
        "reviewer": entry.get("reviewer", ""),
        "note": entry.get("note", ""),
        "when": when,
        "age": age,
        "error": error,
    }


class HandlerBase:
    """What the pages and the API share: the console's services and the operations on claims
    and escalations that both a form and a JSON request perform."""

    def __init__(self, console: Console) -> None:
        self.c = console

    async def _commit(self, claim: Claim, decision: ReviewDecision) -> None:
        """The claim is renewed first (owner-checked: NotClaimed, nothing produced, if the
        submitter lost it), so it cannot lapse during the produce. Then Kafka (acks=all,
        awaited: every decision is on record), then Redis: a decision that labels something or
        escalates ends the item (mark decided + XACK; an escalation is also copied to the
        escalated stream for admins); one that only skips puts the item back in the queue for
        another reviewer. Each Redis step checks the owner again: ClaimLostAfterProduce when the
        item changed hands during the produce (nothing acked; it stays with its holder).
        One submit at a time per item: a second one meanwhile gets SubmitInProgress and records
        nothing (two simultaneous submits made two records with one id)."""
        under_way = await self.c.queue.begin_submit(claim.entry_id, decision.decision_id)
        if under_way is not None:
            raise SubmitInProgress(under_way, same=under_way == decision.decision_id)
        try:
            await self._commit_held(claim, decision)
        finally:
            await self.c.queue.end_submit(claim.entry_id, decision.decision_id)

    async def _commit_held(self, claim: Claim, decision: ReviewDecision) -> None:
        try:
            await self.c.queue.hold(claim.entry_id, decision.reviewer)
        except NotClaimed:
            self.c.metrics.claims_lost.labels("submit").inc()
            raise
        try:
            await self.c.producer.send(decision)
            # The verdict goes to the banks before the item closes: if the bank update fails, the
            # submit fails and the item stays claimed (a retry resends both, same ids). Only a
            # verdict that trains is banked: a first review, a disagreement or a gold answer is
            # not settled (and a bank's precedent would show the second reviewer the first verdict).
            entry = entry_for(decision, claim.item) if decision.trains else None
            if entry is not None and self.c.config.bank_topic:
                entry = await with_variants(entry, self.c.media.store)
                await self.c.producer.send_bank(BankUpdate.add(entry), self.c.config.bank_topic)
                self.c.metrics.banked.labels(entry.bank).inc()
        except KafkaUnavailable:
            self.c.metrics.kafka_errors.inc()
            raise
        labels = any(label is not None for label in decision.training_labels().values())
        try:
            if labels and not decision.escalated and await self._close_reviewed(claim, decision):
                pass  # a first review parked, a second one recorded (escalated if it disagreed), gold scored
            else:
                if decision.escalated:
                    await self.c.queue.escalate(claim.entry_id, decision.reviewer, decision.decision_id, decision.note)
                if labels or decision.escalated:
                    await self.c.queue.complete(
                        claim.entry_id, claim.item.post_id, decision.reviewer, decision.decision_id
                    )
                else:
                    await self.c.queue.release(claim.entry_id, decision.reviewer)
        except NotClaimed as exc:
            self.c.metrics.claims_lost.labels("close").inc()
            log.warning("decision %s produced, but %s", decision.decision_id, exc)
            raise ClaimLostAfterProduce(str(exc)) from exc
        for task_decision in decision.decisions.values():
            self.c.metrics.decisions.labels(task_decision.action).inc()
        self.c.metrics.items_decided.inc()
        self.c.metrics.stages.labels(decision.review_stage).inc()

    async def _close_reviewed(self, claim: Claim, decision: ReviewDecision) -> bool:
        """The Redis side of a double-review or gold decision that labels something (True), or
        False for an ordinary one (the caller completes it). First review: the entry is parked
        for a second reviewer; second: the pair is recorded and the item ends, a disagreement
        escalated; gold: the answer is scored."""
        q, post_id, stage = self.c.queue, claim.item.post_id, decision.review_stage
        if stage == "first":
            await q.first_review_done(
                claim.entry_id,
                post_id,
                decision.reviewer,
                decision.decision_id,
                decision.training_labels(),
                claim.item.kind,
            )
            return True
        if stage in ("agreed", "disagreed"):
            note = disagreement_note(await q.pair(post_id), decision) if stage == "disagreed" else ""
            await q.second_review_done(
                claim.entry_id,
                post_id,
                decision.reviewer,
                decision.decision_id,
                stage,
                decision.training_labels(),
                note,
            )
            return True
        if stage == "gold":
            gold = await q.gold(post_id) or {}
            expected = gold.get("expected") if isinstance(gold.get("expected"), dict) else {}
            result = gold_result(expected or {}, decision.training_labels())
            await q.gold_done(claim.entry_id, post_id, decision.reviewer, decision.decision_id, result)
            return True
        return False

    async def review_stage(self, claim: Claim, decision: ReviewDecision) -> str:
        """Where this decision stands in double review (review/agreement.py `review_stage`, shared
        with the Label Studio import). RecordError when the caller made the pair's first review
        (the queue never hands it to them, so this is a forged or replayed submit)."""
        return await review_stage(self.c.queue, self.c.second_reviews, claim.item.post_id, decision)

    async def _renew(self, request: web.Request) -> web.Response:
        """The heartbeat: 200 while the caller holds the item (its idle clock reset), 409 once
        it is lost (taken over, decided elsewhere, or never theirs); changes nothing then."""
        user = _ident(request).user
        entry_id = request.match_info["entry_id"]
        interval = renew_interval_ms(self.c.config.claim_timeout_s)
        if await self.c.queue.renew(entry_id, user.name):
            self.c.metrics.renewals.inc()
            return web.json_response({"held": True, "entry_id": entry_id, "renew_interval_ms": interval})
        self.c.metrics.claims_lost.labels("renew").inc()
        return _json_error(
            409,
            f"item {entry_id} is no longer claimed by {user.name}: it was reassigned or closed",
            held=False,
            next="/review",
        )

    async def claim_decision(
        self,
        claim: Claim,
        reviewer: str,
        choices: Mapping[str, tuple[str, str | None]],
        note: str | None,
        pair: bool | None,
        shown: str | None = None,
    ) -> ReviewDecision:
        """A reviewer's decision on their claim, from the page or the API alike: its id from the
        claim and what it says, the image the console showed, the image-text answer.
        RecordError for choices the item does not allow."""
        if claim.item.kind == "audit":
            choices = audit_choices(claim.item, choices)
        decision = build_decision(
            claim.item,
            reviewer,
            choices,
            note=note,
            decision_id=claim_decision_id(claim, choices, note, pair),
            seen_media_hash=await self.shown_media(claim.item) if shown is None else self.page_shown(claim.item, shown),
            image_text_match=pair,
        )
        return dataclasses.replace(decision, review_stage=await self.review_stage(claim, decision))

    @staticmethod
    def page_shown(item: ReviewItem, shown: str) -> str | None:
        """What the item page showed, as it recorded when it was rendered (a form field): the
        scored hash, or "" for "media unavailable". Anything but the item's hash is no image."""
        content_hash = (item.label.get("media") or {}).get("content_hash")
        return shown if shown and item.image_url and shown == content_hash else None

    async def shown_media(self, item: ReviewItem) -> str | None:
        """The hash of the image this console shows for `item` (the scored bytes from the
        evidence store), None when it shows none: what a decision records as seen."""
        if not item.image_url:
            return None
        content_hash = (item.label.get("media") or {}).get("content_hash")
        return content_hash if await self.c.media.has(content_hash) else None

    async def _decide_escalation(self, escalation_id: str, admin: str, labels: Any, note: Any) -> ReviewDecision:
        """The admin's final decision: checked, produced to Kafka (acks=all, awaited), then the
        escalation settled in Redis. QueueError (gone), RecordError (bad choice) and
        KafkaUnavailable change nothing."""
        entry = await self.c.queue.escalation(escalation_id)
        item = ReviewItem.from_json(entry.get("item", ""))
        if note is not None and not isinstance(note, str):
            raise RecordError("note", "must be a string")
        choices = admin_choices(item, labels)
        decision_id = escalation_decision_id(escalation_id, admin, choices, note)
        # The escalated page shows no image (so the admin saw none: no training image from this
        # decision) and shows the model's view (so a decided audit item is no blind verdict).
        decision = build_decision(item, admin, choices, note=note, decision_id=decision_id, seen_media_hash=None)
        if decision.kind == "audit":
            decision = dataclasses.replace(decision, kind="routed")
        pair = await self.c.queue.pair(item.post_id)
        if pair is not None and pair.state in ("first", "disagreed", "second"):
            decision = dataclasses.replace(decision, review_stage="settled")  # the pair's settlement trains
        try:
            await self.c.producer.send(decision)
        except KafkaUnavailable:
            self.c.metrics.kafka_errors.inc()
            raise
        try:
            await self.c.queue.settle_escalation(escalation_id, item.post_id, decision.decision_id, admin)
        except QueueError as exc:
            log.warning("decision %s produced, but %s", decision.decision_id, exc)
            raise SettledElsewhere(
                f"{exc}: another admin settled it while your decision was being saved; your decision "
                f"{decision.decision_id} is on the decision log all the same"
            ) from exc
        if decision.review_stage == "settled":
            await self.c.queue.pair_settled(item.post_id, admin, decision.decision_id)
            self.c.metrics.stages.labels("settled").inc()
        for task_decision in decision.decisions.values():
            self.c.metrics.decisions.labels(task_decision.action).inc()
        self.c.metrics.escalations_settled.labels("decided").inc()
        log.info("escalation %s (post %s) decided by %s: %s", escalation_id, item.post_id, admin, decision_id)
        return decision

    async def _audit(self, action: str, actor: str, subject: str, **detail: Any) -> None:
        """Record the act on the audit topic before it takes effect (review/audit.py);
        KafkaUnavailable means it must not happen."""
        try:
            await self.c.producer.send_audit(AuditEvent(action, actor, subject, detail), self.c.config.audit_topic)
        except KafkaUnavailable:
            self.c.metrics.kafka_errors.inc()
            raise

    async def _dismiss_escalation(self, escalation_id: str, admin: str) -> None:
        """QueueError (gone) and KafkaUnavailable (not audited) change nothing."""
        entry = await self.c.queue.escalation(escalation_id)
        post_id = str(entry.get("post_id") or escalation_id)
        await self._audit(
            "escalation_dismissed",
            admin,
            post_id,
            escalation_id=escalation_id,
            escalated_by=entry.get("reviewer", ""),
            entry_id=entry.get("entry_id", ""),
        )
        if not await self.c.queue.dismiss_escalation(escalation_id):
            raise QueueError(f"no open escalation {escalation_id} (settled or dismissed already?)")
        self.c.metrics.escalations_settled.labels("dismissed").inc()
        log.info("escalation %s (post %s) dismissed without a label by %s", escalation_id, post_id, admin)

    async def _dead_action(self, dead_id: str, action: str, admin: str) -> str | bool:
        """Requeue (returns the new entry id) or drop (returns whether it was there) a dead-
        lettered review item, audited first. QueueError and KafkaUnavailable change nothing."""
        if action not in ("requeue", "delete"):
            raise web.HTTPNotFound()
        entry = await self.c.queue.dead_entry(dead_id)
        post_id = str(entry.get("post_id") or dead_id)
        await self._audit("dead_requeued" if action == "requeue" else "dead_dropped", admin, post_id, dead_id=dead_id)
        if action == "requeue":
            return await self.c.queue.requeue_dead(dead_id)
        return await self.c.queue.delete_dead(dead_id)
