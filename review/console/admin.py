"""The admin pages."""

from __future__ import annotations

import contextlib
import json
from urllib.parse import quote

from aiohttp import web

from modstream.records import RecordError
from review.console.base import HandlerBase, SettledElsewhere, _escalation_row, _fmt_age, _require_admin
from review.decisions import (
    KafkaUnavailable,
)
from review.queue import QueueError


class AdminPages(HandlerBase):
    """Admin pages: the review dead-letter stream and the escalations to settle."""

    async def dead_page(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        letters = await self.c.queue.dead_letters(200)
        rows = []
        for letter in letters:
            text = ""
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                text = json.loads(letter.get("item", "")).get("text", "")
            rows.append({**letter, "text": text})
        return self.c.render(request, "dead.html", letters=rows, stats=await self.c.stats(), fmt_age=_fmt_age)

    async def dead_action_page(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            await self._dead_action(request.match_info["dead_id"], request.match_info["action"], admin.name)
        except QueueError as exc:
            raise web.HTTPNotFound(text=str(exc)) from exc
        except KafkaUnavailable as exc:
            return self.c.render(
                request, "error.html", status=503, title="Not done", message=f"{exc}. Nothing changed; try again."
            )
        raise web.HTTPSeeOther("/admin/dead")

    async def escalated_page(
        self, request: web.Request, *, error: str | None = None, status: int = 200
    ) -> web.Response:
        _require_admin(request)
        rows = [_escalation_row(entry) for entry in await self.c.queue.escalated(200)]
        return self.c.render(
            request,
            "escalated.html",
            status=status,
            escalations=rows,
            error=error,
            done=request.query.get("done"),
            stats=await self.c.stats(),
            fmt_age=_fmt_age,
        )

    async def escalated_action_page(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        escalation_id, action = request.match_info["esc_id"], request.match_info["action"]
        form = await request.post()
        try:
            if action == "decide":
                labels = {k.removeprefix("label."): v for k, v in form.items() if k.startswith("label.")}
                decision = await self._decide_escalation(escalation_id, admin.name, labels, form.get("note"))
                post_id = decision.post_id
            elif action == "dismiss":
                await self._dismiss_escalation(escalation_id, admin.name)
                post_id = ""
            else:
                raise web.HTTPNotFound()
        except SettledElsewhere as exc:
            return await self.escalated_page(request, error=str(exc), status=409)
        except QueueError as exc:
            return await self.escalated_page(request, error=str(exc), status=404)
        except RecordError as exc:
            return await self.escalated_page(request, error=f"Not decided: {exc}", status=400)
        except KafkaUnavailable as exc:
            return await self.escalated_page(
                request, error=f"Not saved: {exc}. Nothing changed; try again in a moment.", status=503
            )
        raise web.HTTPSeeOther("/admin/escalated" + ("?done=" + quote(post_id, safe="") if post_id else ""))
