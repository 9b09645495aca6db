"""Reviewer agreement (admins): Cohen's kappa of double-reviewed items per task, overall and
per reviewer, and each reviewer's accuracy on gold items, as a page and through the JSON API;
gold items defined and put in the queue (review/agreement.py has the rules).

A gold item is an admin's post with known answers: its own post id, text and label sets, the
expected label per task. It is queued as an audit item (blind: no model output), so reviewers
cannot tell it from one; their answers are scored and never train (review_stage "gold").
Every definition and removal is recorded on the audit topic first, like any admin act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web
from redis.exceptions import RedisError

from modstream.records import MAX_ID, MAX_TEXT, RecordError, ReviewItem, has_control, now_iso
from review.agreement import MIN_PAIRS, AgreementReport, agreement_report
from review.console.base import HandlerBase, _fmt_age, _require_admin, json_body
from review.console.middlewares import _json_error
from review.decisions import KafkaUnavailable
from review.queue import QueueError

log = logging.getLogger(__name__)

MAX_GOLD_TASKS = 16
MAX_GOLD_LABELS = 32
MAX_GOLD_ITEMS = 10_000
WINDOW = 5000  # the newest pairs and gold answers the report reads
REFRESH_S = 30.0


def _name(value: Any, field: str, max_len: int = MAX_ID) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_len or has_control(value):
        raise RecordError(
            field, f"must be a non-empty string of at most {max_len} characters without control characters"
        )
    return value


def gold_item(body: Mapping[str, Any]) -> tuple[ReviewItem, dict[str, str]]:
    """A gold item from `{"post_id", "text", "tasks": {task: [labels, negative first]},
    "expected": {task: label}}`: RecordError naming the field for anything else (nested,
    oversized, unknown tasks or labels)."""
    post_id = _name(body.get("post_id"), "post_id")
    text = body.get("text")
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise RecordError("text", f"must be a string of at most {MAX_TEXT} characters")
    tasks = body.get("tasks")
    if not isinstance(tasks, dict) or not tasks or len(tasks) > MAX_GOLD_TASKS:
        raise RecordError("tasks", f"must be an object of 1 to {MAX_GOLD_TASKS} tasks -> [labels]")
    label_sets: dict[str, list[str]] = {}
    for task, labels in tasks.items():
        _name(task, "tasks", 64)
        if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_GOLD_LABELS:
            raise RecordError(f"tasks.{task}", f"must be a list of 2 to {MAX_GOLD_LABELS} labels, negative first")
        names = [_name(label, f"tasks.{task}", 64) for label in labels]
        if len(set(names)) != len(names):
            raise RecordError(f"tasks.{task}", "labels must be distinct")
        label_sets[task] = names
    expected = body.get("expected")
    if not isinstance(expected, dict) or not expected:
        raise RecordError("expected", "must be an object of task -> the known label")
    known: dict[str, str] = {}
    for task, label in expected.items():
        if task not in label_sets:
            raise RecordError("expected", f"unknown task {str(task)[:64]!r}; the item has {', '.join(label_sets)}")
        if not isinstance(label, str) or label not in label_sets[task]:
            raise RecordError(f"expected.{task}", f"must be one of {label_sets[task]}")
        known[task] = label
    item = ReviewItem(
        post_id=post_id,
        text=text,
        image_url=None,
        reasons=["audit"],
        # No model output: the item is blind (kind audit); model_version names what it is for the
        # decision record (never shown: an audit item's page and API drop the label).
        label={"post_id": post_id, "model_version": "gold", "labels": {}},
        tasks=label_sets,
        kind="audit",
    )
    return item, known


class AgreementPages(HandlerBase):
    """/admin/agreement (page, gold form) and /api/v1/admin/agreement, /api/v1/admin/gold (JSON)."""

    async def agreement_report(self) -> AgreementReport:
        """The report over the newest pairs and gold answers; the gauges follow it."""
        report = agreement_report(await self.c.queue.pairs(WINDOW), await self.c.queue.gold_answers(WINDOW))
        self.c.metrics.set_agreement(report)
        return report

    async def _refresh_agreement(self) -> None:
        while True:
            try:
                await self.agreement_report()
            except (RedisError, OSError) as exc:
                log.debug("agreement refresh failed: %r", exc)
            await asyncio.sleep(REFRESH_S)

    async def agreement_refresher(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: keeps the agreement gauges fresh for scrapes (every REFRESH_S; the
        page and the API refresh them too)."""
        task = asyncio.create_task(self._refresh_agreement(), name="review-agreement")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def agreement_page(
        self, request: web.Request, *, error: str | None = None, status: int = 200
    ) -> web.Response:
        _require_admin(request)
        report = await self.agreement_report()
        gold = await self.c.queue.gold_items()
        return self.c.render(
            request,
            "agreement.html",
            status=status,
            report=report,
            min_pairs=MIN_PAIRS,
            rate=self.c.config.second_review_rate,
            gold=sorted(gold.items()),
            error=error,
            done=request.query.get("done"),
            stats=await self.c.stats(),
            fmt_age=_fmt_age,
        )

    async def api_agreement(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        report = await self.agreement_report()
        return web.json_response({**report.to_json(), "second_review_rate": self.c.config.second_review_rate})

    async def _add_gold(self, admin: str, body: Mapping[str, Any]) -> tuple[ReviewItem, str]:
        """Checked, audited, then defined and queued. RecordError (bad input or a post id in
        use) and KafkaUnavailable (not audited) change nothing."""
        item, expected = gold_item(body)
        if await self.c.queue.gold(item.post_id) is None:
            if len(await self.c.queue.gold_items()) >= MAX_GOLD_ITEMS:
                raise RecordError("post_id", f"at most {MAX_GOLD_ITEMS} gold items; remove some first")
            if await self.c.redis.exists(self.c.queue.decided_key(item.post_id)):
                raise RecordError("post_id", "a post with this id was reviewed already; give the gold item its own id")
        await self._audit("gold_item_added", admin, item.post_id, tasks=sorted(expected))
        definition = {"expected": expected, "added_by": admin, "added_at": now_iso()}
        entry_id = await self.c.queue.add_gold(item, definition)
        log.info("gold item %s queued by %s (entry %s)", item.post_id, admin, entry_id)
        return item, entry_id

    async def api_gold_add(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            item, entry_id = await self._add_gold(admin.name, body)
        except RecordError as exc:
            return _json_error(400, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        return web.json_response({"post_id": item.post_id, "entry_id": entry_id}, status=201)

    async def api_gold(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        return web.json_response({"gold": await self.c.queue.gold_items()})

    async def api_gold_remove(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        post_id = request.match_info["post_id"]
        try:
            removed = await self._remove_gold(admin.name, post_id)
        except QueueError as exc:
            return _json_error(404, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        return web.json_response({"removed": removed})

    async def _remove_gold(self, admin: str, post_id: str) -> str:
        if len(post_id) > MAX_ID or await self.c.queue.gold(post_id) is None:
            raise QueueError(f"no gold item {post_id[:MAX_ID]!r}")
        await self._audit("gold_item_removed", admin, post_id)
        await self.c.queue.remove_gold(post_id)
        return post_id

    async def gold_add_page(self, request: web.Request) -> web.StreamResponse:
        """The page's form: post id, text, one task with its labels (comma-separated, negative
        first) and the known label."""
        admin = _require_admin(request)
        form = await request.post()
        fields = {k: form.get(k) for k in ("post_id", "text", "task", "labels", "expected")}
        if not all(isinstance(v, str) for v in fields.values()):
            return await self.agreement_page(request, error="Not added: every field is text", status=400)
        task, labels = str(fields["task"]).strip(), [x.strip() for x in str(fields["labels"]).split(",") if x.strip()]
        body = {
            "post_id": str(fields["post_id"]).strip(),
            "text": fields["text"],
            "tasks": {task: labels},
            "expected": {task: str(fields["expected"]).strip()},
        }
        try:
            item, _ = await self._add_gold(admin.name, body)
        except RecordError as exc:
            return await self.agreement_page(request, error=f"Not added: {exc}", status=400)
        except KafkaUnavailable as exc:
            return await self.agreement_page(request, error=f"Not added: {exc}. Try again.", status=503)
        raise web.HTTPSeeOther("/admin/agreement?done=" + quote(item.post_id, safe=""))

    async def gold_remove_page(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            await self._remove_gold(admin.name, request.match_info["post_id"])
        except QueueError as exc:
            return await self.agreement_page(request, error=str(exc), status=404)
        except KafkaUnavailable as exc:
            return await self.agreement_page(request, error=f"Not removed: {exc}. Try again.", status=503)
        raise web.HTTPSeeOther("/admin/agreement")
