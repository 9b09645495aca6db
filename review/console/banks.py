"""Bank curation (admins): list, search and remove verdict-bank entries, import and export
hash lists in ThreatExchange's PDQ CSV format, as pages and through the JSON API.

Every change goes to the bank-updates topic (after an audit record of who did it), which every
worker and this console read: a removal or an import takes effect everywhere within seconds,
and the list shown here is what the topic says, not what this console last sent.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from aiohttp import web

from modstream.records import RecordError, now_iso
from review.console.base import HandlerBase, _fmt_age, _require_admin
from review.console.middlewares import _json_error
from review.decisions import KafkaUnavailable
from stream.banks.bank import BANKS, MAX_LIST_LIMIT, BankEntry, BankUpdate
from stream.banks.te_csv import TeCsvError, read_te_csv, write_te_csv

log = logging.getLogger(__name__)

MAX_IMPORT_BYTES = 900 * 1024  # under the app's 1 MiB request cap; larger lists: `modstream banks import`


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RecordError(name, "must be an integer") from None
    if not low <= value <= high:
        raise RecordError(name, f"must be from {low} to {high}")
    return value


def _query_bank(request: web.Request) -> str | None:
    bank = request.query.get("bank") or None
    if bank is not None and bank not in BANKS:
        raise RecordError("bank", f"must be one of {', '.join(BANKS)}")
    return bank


class BankPages(HandlerBase):
    """/admin/banks (page) and /api/v1/admin/banks (JSON, CSV)."""

    def _entries(self, request: web.Request) -> list[BankEntry]:
        query = request.query.get("q", "").strip()
        bank, source = _query_bank(request), request.query.get("source") or None
        limit = _query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
        if query:
            found = self.c.banks.search(query, limit=MAX_LIST_LIMIT)
            return [e for e in found if (bank is None or e.bank == bank) and (source is None or e.source == source)][
                :limit
            ]
        return self.c.banks.list(bank, source, _query_int(request, "offset", 0, 0, 10**9), limit)

    def _state(self) -> dict[str, Any]:
        follower = self.c.bank_follower
        return {
            "sizes": self.c.banks.sizes(),
            "version": self.c.banks.version,
            "loaded": follower is not None and follower.loaded.is_set(),
        }

    # -- pages ------------------------------------------------------------------------------

    async def banks_page(self, request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
        _require_admin(request)
        try:
            entries = self._entries(request)
        except (RecordError, ValueError) as exc:
            entries, error, status = [], str(exc), 400
        return self.c.render(
            request,
            "banks.html",
            status=status,
            entries=entries,
            state=self._state(),
            query=request.query.get("q", ""),
            bank=request.query.get("bank", ""),
            error=error,
            done=request.query.get("done"),
            stats=await self.c.stats(),
            fmt_age=_fmt_age,
        )

    async def bank_remove_page(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        try:
            await self._remove(request.match_info["entry_id"], admin.name)
        except KeyError:
            return await self.banks_page(request, error="No such entry (already removed?)", status=404)
        except KafkaUnavailable as exc:
            return await self.banks_page(request, error=f"Not removed: {exc}. Try again in a moment.", status=503)
        raise web.HTTPSeeOther("/admin/banks?done=removed")

    async def bank_import_page(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        form = await request.post()
        upload = form.get("file")
        data = upload.file.read(MAX_IMPORT_BYTES + 1) if isinstance(upload, web.FileField) else b""
        try:
            count = await self._import(
                data, str(form.get("source", "")), str(form.get("bank", "violating")), admin.name
            )
        except (TeCsvError, RecordError, ValueError) as exc:
            return await self.banks_page(request, error=f"Not imported: {exc}", status=400)
        except KafkaUnavailable as exc:
            return await self.banks_page(request, error=f"Not imported: {exc}", status=503)
        raise web.HTTPSeeOther(f"/admin/banks?done=imported+{count}")

    # -- API --------------------------------------------------------------------------------

    async def api_banks(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            entries = self._entries(request)
        except (RecordError, ValueError) as exc:
            return _json_error(400, str(exc))
        return web.json_response({**self._state(), "entries": [e.to_json() for e in entries]})

    async def api_bank_remove(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        entry_id = request.match_info["entry_id"]
        try:
            await self._remove(entry_id, admin.name)
        except KeyError:
            return _json_error(404, f"no bank entry {entry_id!r}")
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc))
        return web.json_response({"removed": entry_id, "applies": "on every worker within seconds"}, status=202)

    async def api_bank_import(self, request: web.Request) -> web.StreamResponse:
        admin = _require_admin(request)
        data = await request.content.read(MAX_IMPORT_BYTES + 1)
        try:
            count = await self._import(
                data, request.query.get("source", ""), request.query.get("bank", "violating"), admin.name
            )
        except (TeCsvError, RecordError, ValueError) as exc:
            return _json_error(400, str(exc))
        except KafkaUnavailable as exc:
            return _json_error(503, str(exc))
        return web.json_response({"imported": count}, status=202)

    async def api_bank_export(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            bank, source = _query_bank(request), request.query.get("source") or None
        except RecordError as exc:
            return _json_error(400, str(exc))
        out = io.StringIO()
        chosen = (
            e
            for e in self.c.banks.entries()
            if (bank is None or e.bank == bank) and (source is None or e.source == source)
        )
        report = write_te_csv(chosen, out)
        return web.Response(
            text=out.getvalue(),
            content_type="text/csv",
            headers={
                "X-Modstream-Exported": str(report.written),
                "X-Modstream-Not-Exported": str(report.without_pdq + report.low_quality),
            },
        )

    # -- the changes ------------------------------------------------------------------------

    async def _remove(self, entry_id: str, admin: str) -> None:
        """KeyError if the banks do not hold it; audited first, then the remove on the topic."""
        entry = self.c.banks.get(entry_id)
        if entry is None:
            raise KeyError(entry_id)
        await self._audit("bank_entry_removed", admin, entry_id[:256], bank=entry.bank, source=entry.source)
        await self._send([BankUpdate.remove(entry_id)])
        self.c.metrics.bank_curation.labels("remove").inc()
        log.warning("bank entry %s (%s, %s) removed by %s", entry_id, entry.bank, entry.source, admin)

    async def _import(self, data: bytes, source: str, bank: str, admin: str) -> int:
        if len(data) > MAX_IMPORT_BYTES:
            raise ValueError(f"the list is over {MAX_IMPORT_BYTES:,} bytes: use `modstream banks import`")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the list is not UTF-8 text") from None
        entries = read_te_csv(text, source=source, bank=bank, imported_by=admin, imported_at=now_iso())
        await self._audit("bank_list_imported", admin, source[:256], bank=bank, entries=len(entries))
        await self._send([BankUpdate.add(e) for e in entries])
        self.c.metrics.bank_curation.labels("import").inc(len(entries))
        return len(entries)

    async def _send(self, updates: list[BankUpdate]) -> None:
        try:
            await self.c.producer.send_banks(updates, self.c.config.bank_topic)
        except KafkaUnavailable:
            self.c.metrics.kafka_errors.inc()
            raise
