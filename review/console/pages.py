"""The reviewer's pages."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from modstream.records import RecordError
from review.bank_verdicts import precedent
from review.console.base import (
    LOST_AFTER_PRODUCE_MESSAGE,
    LOST_MESSAGE,
    LOST_TITLE,
    ClaimLostAfterProduce,
    HandlerBase,
    SubmitInProgress,
    _fmt_age,
    _ident,
    _task_rows,
    renew_interval_ms,
)
from review.console.core import ACTION_KEYS, ACTION_TITLES, SHORTCUTS
from review.console.middlewares import _json_error
from review.decisions import (
    KafkaUnavailable,
    choices_from_form,
    item_tasks,
    pair_answer,
)
from review.evidence_images import MediaError
from review.queue import Claim, NotClaimed, QueueStats


class ReviewerPages(HandlerBase):
    """The reviewer's pages: the next item, its media, the decision form and the claim's heartbeat."""

    async def index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/review")

    async def review_page(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        claim = await self.c.queue.claim(user.name)
        stats = await self.c.stats()
        done = request.query.get("done")
        if claim is None:
            return self.c.render(request, "empty.html", stats=stats, fmt_age=_fmt_age, done=done)
        return await self._item_page(request, claim, stats, done=done)

    async def _item_page(
        self,
        request: web.Request,
        claim: Claim,
        stats: QueueStats,
        *,
        status: int = 200,
        error: str | None = None,
        chosen: dict[str, tuple[str, str | None]] | None = None,
        note: str | None = None,
        done: str | None = None,
    ) -> web.Response:
        item = claim.item
        audit = item.kind == "audit"  # blind: nothing of the model's output reaches the page
        media = item.label.get("media") or {}
        shown = await self.shown_media(item)
        # Precedent is a verdict: an audit item stays blind to it as it does to the model's.
        rows = [] if audit or not shown else precedent(self.c.banks, item)
        return self.c.render(
            request,
            "item.html",
            status=status,
            claim=claim,
            item=item,
            tasks=_task_rows(claim, chosen, blind=item.kind == "audit"),
            media=media,
            has_image=bool(item.image_url),
            media_shown=shown is not None,
            shown_hash=shown or "",
            itm_match=None if audit else item.label.get("itm_match"),
            model_version="" if audit else item.label.get("model_version", ""),
            audit=audit,
            precedent=rows,
            stats=stats,
            fmt_age=_fmt_age,
            error=error,
            note=note or "",
            done=done,
            shortcuts=SHORTCUTS,
            action_keys=ACTION_KEYS,
            action_titles=ACTION_TITLES,
            claim_timeout_s=self.c.config.claim_timeout_s,
            renew_interval_ms=renew_interval_ms(self.c.config.claim_timeout_s),
        )

    async def submit_page(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        entry_id = request.match_info["entry_id"]
        try:
            claim = await self.c.queue.get_claimed(entry_id, user.name)
        except NotClaimed:
            self.c.metrics.claims_lost.labels("submit").inc()
            decided = await self.c.queue.decided_decision(entry_id, user.name)
            if decided is not None:  # a double submit whose first went through: not "nothing recorded"
                raise web.HTTPSeeOther("/review?done=" + quote(decided[0], safe="")) from None
            return self._lost_page(request, LOST_MESSAGE)
        form = await request.post()
        choices, note = choices_from_form(form, list(item_tasks(claim.item)))
        raw_pair = form.get("pair", "")
        try:
            pair = pair_answer(raw_pair if isinstance(raw_pair, str) else None)
            raw_shown = form.get("shown_media", "")
            shown = raw_shown if isinstance(raw_shown, str) else ""
            decision = await self.claim_decision(claim, user.name, choices, note, pair, shown=shown)
        except RecordError as exc:
            stats = await self.c.stats()
            return await self._item_page(
                request, claim, stats, status=400, error=f"Not submitted: {exc}", chosen=choices, note=note
            )
        try:
            await self._commit(claim, decision)
        except SubmitInProgress as exc:
            # The page was sent twice (or from two tabs): the first request is recording; this
            # one recorded nothing, and says so rather than claiming an outcome it cannot know.
            message = (
                "Your first submit of this decision is still being recorded; this one recorded nothing more."
                if exc.same
                else f"Not saved: {exc}."
            )
            return self.c.render(
                request, "error.html", status=409, title="Being recorded", message=message + " Reload to see."
            )
        except ClaimLostAfterProduce:
            return self._lost_page(request, LOST_AFTER_PRODUCE_MESSAGE)
        except NotClaimed:
            return self._lost_page(request, LOST_MESSAGE)
        except KafkaUnavailable as exc:
            stats = await self.c.stats()
            return await self._item_page(
                request,
                claim,
                stats,
                status=503,
                error=f"Not saved: {exc}. The item is still yours; submit again in a moment.",
                chosen=choices,
                note=note,
            )
        raise web.HTTPSeeOther("/review?done=" + quote(claim.item.post_id, safe=""))

    def _lost_page(self, request: web.Request, message: str) -> web.Response:
        return self.c.render(request, "error.html", status=409, title=LOST_TITLE, message=message)

    async def media(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        try:
            claim = await self.c.queue.get_claimed(request.match_info["entry_id"], user.name, admin=user.is_admin)
        except NotClaimed:
            return _json_error(404, "no such item claimed by you")
        if not claim.item.image_url:
            return _json_error(404, "this post has no image")
        content_hash = (claim.item.label.get("media") or {}).get("content_hash")
        if not content_hash:
            return _json_error(404, "media unavailable: the worker read no image for this post")
        try:
            image = await self.c.media.get(content_hash)
        except MediaError as exc:
            status = 503 if exc.status == "unavailable" else 404
            return _json_error(status, f"media unavailable: {exc.status}", reason=exc.reason)
        response = web.Response(body=image.body, content_type=image.content_type)
        response.headers["Content-Disposition"] = "inline"
        return response

    async def renew_page(self, request: web.Request) -> web.StreamResponse:
        return await self._renew(request)  # session + CSRF header checked by the auth middleware
