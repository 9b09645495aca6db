"""The JSON API and the operations routes."""

from __future__ import annotations

import functools
import logging

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from modstream.records import RecordError
from review.bank_verdicts import precedent
from review.console.base import (
    ClaimLostAfterProduce,
    HandlerBase,
    SettledElsewhere,
    SubmitInProgress,
    _ident,
    _require_admin,
    json_body,
)
from review.console.middlewares import _json_error
from review.decisions import (
    KafkaUnavailable,
    choices_from_json,
    pair_answer,
)
from review.queue import NotClaimed, QueueError

log = logging.getLogger(__name__)


@functools.cache
def no_image_png() -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (360, 90), (236, 238, 242))
    ImageDraw.Draw(image).text((20, 36), "No image in this post (text only)", fill=(90, 98, 112))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ApiHandlers(HandlerBase):
    """The JSON API (/api/v1, bearer tokens) and the operations routes (/healthz, /metrics)."""

    async def api_claim(self, request: web.Request) -> web.StreamResponse:
        claim = await self.c.queue.claim(_ident(request).user.name)
        self.c.metrics.sync_queue(self.c.queue)
        if claim is None:
            return web.json_response({"item": None})
        return web.json_response(claim.to_json())

    async def api_item(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        try:
            claim = await self.c.queue.get_claimed(request.match_info["entry_id"], user.name, admin=user.is_admin)
        except NotClaimed as exc:
            return _json_error(404, str(exc))
        body = claim.to_json()
        if claim.item.kind != "audit":  # an audit item stays blind to earlier verdicts too
            body["precedent"] = precedent(self.c.banks, claim.item)
        return web.json_response(body)

    async def api_decision(self, request: web.Request) -> web.StreamResponse:
        user = _ident(request).user
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            choices, note = choices_from_json(body)
            pair = pair_answer(body.get("image_text_match"))
        except RecordError as exc:
            return _json_error(400, str(exc))
        try:
            claim = await self.c.queue.get_claimed(request.match_info["entry_id"], user.name)
        except NotClaimed as exc:
            self.c.metrics.claims_lost.labels("submit").inc()
            decided = await self.c.queue.decided_decision(request.match_info["entry_id"], user.name)
            if decided is not None:  # a retry after the first submit went through: say so
                return _json_error(409, f"already decided: {exc}", recorded=True, decision_id=decided[1])
            return _json_error(409, str(exc), recorded=False)
        try:
            decision = await self.claim_decision(claim, user.name, choices, note, pair)
        except RecordError as exc:
            return _json_error(400, str(exc))
        try:
            await self._commit(claim, decision)
        except SubmitInProgress as exc:
            return _json_error(409, str(exc), recorded="in progress", decision_id=exc.decision_id)
        except ClaimLostAfterProduce as exc:
            return _json_error(409, str(exc), recorded=True, decision_id=decision.decision_id)
        except NotClaimed as exc:
            return _json_error(409, str(exc), recorded=False)
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        body = decision.to_json()
        if decision.review_stage in ("agreed", "disagreed"):  # the second reviewer learns nothing of the first
            body["review_stage"] = "second"
        return web.json_response({"decision": body}, status=201)

    async def api_renew(self, request: web.Request) -> web.StreamResponse:
        return await self._renew(request)

    async def api_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response((await self.c.stats()).to_json())

    async def api_escalated(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            count = max(1, min(1000, int(request.query.get("count", "100"))))
        except ValueError:
            return _json_error(400, "count must be an integer")
        return web.json_response({"escalated": await self.c.queue.escalated(count)})

    async def api_escalated_decide(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            decision = await self._decide_escalation(
                request.match_info["esc_id"], admin.name, body.get("labels"), body.get("note")
            )
        except SettledElsewhere as exc:
            return _json_error(409, str(exc), recorded=True)
        except QueueError as exc:
            return _json_error(404, str(exc), recorded=False)
        except RecordError as exc:
            return _json_error(400, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        return web.json_response({"decision": decision.to_json()}, status=201)

    async def api_escalated_dismiss(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            await self._dismiss_escalation(request.match_info["esc_id"], admin.name)
        except QueueError as exc:
            return _json_error(404, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        return web.json_response({"dismissed": request.match_info["esc_id"]})

    async def api_dead(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            count = max(1, min(1000, int(request.query.get("count", "100"))))
        except ValueError:
            return _json_error(400, "count must be an integer")
        return web.json_response({"dead_letters": await self.c.queue.dead_letters(count)})

    async def api_dead_requeue(self, request: web.Request) -> web.StreamResponse:
        return await self._api_dead(request, "requeue")

    async def api_dead_delete(self, request: web.Request) -> web.StreamResponse:
        return await self._api_dead(request, "delete")

    async def _api_dead(self, request: web.Request, action: str) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            outcome = await self._dead_action(request.match_info["dead_id"], action, admin.name)
        except QueueError as exc:
            return _json_error(404, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc), retry=True)
        if action == "requeue":
            return web.json_response({"entry_id": outcome})
        return web.json_response({"deleted": outcome}, status=200 if outcome else 404)

    async def signed_media(self, request: web.Request) -> web.StreamResponse:
        """The scored image behind a signed link (Label Studio's annotators): no session, the
        link is the credential; CORS-enabled, so Label Studio's page on its own origin can load it."""
        from review.evidence_images import MediaError
        from review.media_links import LinkError, verify

        key = self.c.config.media_link_key
        if not key:
            return _json_error(404, "signed media links are not enabled on this console")
        digest = request.match_info["digest"]
        try:
            verify(key, digest, request.query.get("expires"), request.query.get("sig"))
        except LinkError as exc:
            log.info("refused a media link for %s: %s", digest[:80], exc)
            return _json_error(403, "this media link is not valid (expired or not signed by this deployment)")
        try:
            image = await self.c.media.get(digest)
        except MediaError as exc:
            return _json_error(404 if exc.status != "unavailable" else 503, f"media unavailable: {exc.status}")
        response = web.Response(body=image.body, content_type=image.content_type)
        response.headers["Access-Control-Allow-Origin"] = self.c.config.media_link_origin
        response.headers["Content-Disposition"] = "inline"
        return response

    async def no_image(self, request: web.Request) -> web.StreamResponse:
        """What Label Studio shows for a text-only post: its Image tag needs an image in every
        task (the server refuses a task without one), so a plain placeholder, public and CORS-enabled."""
        response = web.Response(body=no_image_png(), content_type="image/png")
        response.headers["Access-Control-Allow-Origin"] = self.c.config.media_link_origin
        return response

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.c.redis.ping()
        except (RedisError, OSError):
            return web.json_response({"status": "degraded", "redis": False}, status=503)
        return web.json_response({"status": "ok", "redis": True})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.c.stats()
        except (RedisError, OSError):
            self.c.metrics.stats_unknown()
        response = web.Response(body=generate_latest(self.c.metrics.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response
