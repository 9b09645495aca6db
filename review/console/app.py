"""The application: routes to handlers, the internal operations app, and `serve`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from review.console.admin import AdminPages
from review.console.agreement import AgreementPages
from review.console.api import ApiHandlers
from review.console.banks import BankPages
from review.console.core import STATIC, Console, ConsoleConfig
from review.console.live_quality import LiveQualityPages
from review.console.login import LoginPages
from review.console.middlewares import build_middlewares
from review.console.pages import ReviewerPages
from review.decisions import (
    DecisionProducer,
)


class Handlers(LoginPages, ReviewerPages, AdminPages, BankPages, LiveQualityPages, AgreementPages, ApiHandlers):
    """Every route's handler, one group per concern (login, pages, admin, api)."""


CONSOLE_KEY = web.AppKey("console", Console)


def create_app(config: ConsoleConfig, *, producer: DecisionProducer | None = None) -> web.Application:
    console = Console(config, producer=producer)
    h = Handlers(console)
    app = web.Application(middlewares=build_middlewares(console), client_max_size=1024 * 1024)
    app[CONSOLE_KEY] = console
    r = app.router
    r.add_get("/login", h.login_page)
    r.add_post("/login", h.login)
    r.add_post("/logout", h.logout)
    r.add_get("/", h.index)
    r.add_get("/review", h.review_page)
    r.add_post("/review/{entry_id}/decision", h.submit_page)
    r.add_post("/review/{entry_id}/renew", h.renew_page)
    r.add_get("/media/{entry_id}", h.media)
    r.add_get("/ls-media/none.png", h.no_image)  # before the dynamic route, which would match it too
    r.add_get("/ls-media/{digest}", h.signed_media)
    r.add_get("/admin/dead", h.dead_page)
    r.add_post("/admin/dead/{dead_id}/{action}", h.dead_action_page)
    r.add_get("/admin/escalated", h.escalated_page)
    r.add_post("/admin/escalated/{esc_id}/{action}", h.escalated_action_page)
    r.add_get("/admin/banks", h.banks_page)
    r.add_post("/admin/banks/import", h.bank_import_page)  # before the dynamic route
    r.add_post("/admin/banks/{entry_id:.+}/remove", h.bank_remove_page)  # an id may hold "/"
    r.add_get("/admin/live-quality", h.live_quality_page)
    r.add_get("/admin/agreement", h.agreement_page)
    r.add_post("/admin/gold", h.gold_add_page)
    r.add_post("/admin/gold/{post_id}/remove", h.gold_remove_page)
    r.add_post("/api/v1/claim", h.api_claim)
    r.add_get("/api/v1/items/{entry_id}", h.api_item)
    r.add_post("/api/v1/items/{entry_id}/decision", h.api_decision)
    r.add_post("/api/v1/items/{entry_id}/renew", h.api_renew)
    r.add_get("/api/v1/stats", h.api_stats)
    r.add_get("/api/v1/admin/escalated", h.api_escalated)
    r.add_post("/api/v1/admin/escalated/{esc_id}/decide", h.api_escalated_decide)
    r.add_post("/api/v1/admin/escalated/{esc_id}/dismiss", h.api_escalated_dismiss)
    r.add_get("/api/v1/admin/dead", h.api_dead)
    r.add_post("/api/v1/admin/dead/{dead_id}/requeue", h.api_dead_requeue)
    r.add_delete("/api/v1/admin/dead/{dead_id}", h.api_dead_delete)
    r.add_get("/api/v1/admin/banks", h.api_banks)
    r.add_get("/api/v1/admin/banks/export", h.api_bank_export)
    r.add_post("/api/v1/admin/banks/import", h.api_bank_import)
    r.add_delete("/api/v1/admin/banks/{entry_id:.+}", h.api_bank_remove)
    r.add_get("/api/v1/admin/live-quality", h.api_live_quality)
    r.add_get("/api/v1/admin/agreement", h.api_agreement)
    r.add_get("/api/v1/admin/gold", h.api_gold)
    r.add_post("/api/v1/admin/gold", h.api_gold_add)
    r.add_delete("/api/v1/admin/gold/{post_id}", h.api_gold_remove)
    r.add_get("/healthz", h.healthz)
    r.add_get("/metrics", h.metrics)
    r.add_static("/static", STATIC, show_index=False, follow_symlinks=False)
    app.on_startup.append(console.on_startup)
    app.on_cleanup.append(console.on_cleanup)
    app.cleanup_ctx.append(h.agreement_refresher)
    return app


def create_ops_app(main: web.Application) -> web.Application:
    """/healthz and /metrics without authentication, for probes and scrapers on an internal port."""
    console = main[CONSOLE_KEY]
    h = Handlers(console)
    app = web.Application()
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/metrics", h.metrics)
    return app


async def serve(config: ConsoleConfig, host: str, port: int, ops_port: int | None = None) -> None:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    ops_runner: web.AppRunner | None = None
    if ops_port:
        ops_runner = web.AppRunner(create_ops_app(app), access_log=None)
        await ops_runner.setup()
        await web.TCPSite(ops_runner, host, ops_port).start()
    print(f"review console on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        if ops_runner is not None:
            await ops_runner.cleanup()
        await runner.cleanup()
