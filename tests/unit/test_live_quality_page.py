"""The live-quality admin page and API against a stand-in Prometheus on loopback: admins only;
every hostile or malformed answer (oversized, NaN and infinities, wrong shapes, HTML errors,
redirects, a hang) becomes a message on the page, never a 500; the plot is drawn server-side."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from review import live_quality_source as source
from review.auth import UserStore
from review.console import ConsoleConfig, create_app
from review.console.live_quality import plot
from review.live_quality import Interval
from review.live_quality_source import PrometheusError, fetch, parse_matrix

NOW = 1_800_000_000.0


def matrix(series: list[dict[str, Any]]) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": series}}).encode()


def outcome_series(kind: str, outcome: str, values: list[list[Any]], task: str = "hate", version: str = "v1") -> dict:
    return {"metric": {"kind": kind, "task": task, "model_version": version, "outcome": outcome}, "values": values}


def good_answer() -> bytes:
    counts = {("audit", "tp"): 30, ("audit", "fp"): 10, ("audit", "fn"): 20, ("audit", "tn"): 40}
    counts |= {("routed", "tp"): 5, ("routed", "fp"): 5}
    return matrix(
        [
            outcome_series(kind, outcome, [[NOW - 3600 * (2 - i), str(n * (i + 1) / 3)] for i in range(3)])
            for (kind, outcome), n in counts.items()
        ]
    )


def test_parse_matrix_skips_what_cannot_be_a_count_and_refuses_wrong_shapes() -> None:
    parsed = parse_matrix(
        matrix(
            [
                outcome_series("audit", "tp", [[NOW, "NaN"], [NOW + 60, "+Inf"], [NOW + 120, "-3"], [NOW + 180, "4"]]),
                outcome_series("audit", "nonsense", [[NOW, "1"]]),
                outcome_series("weird", "tp", [[NOW, "1"]]),
                outcome_series("audit", "tp", [[NOW, "1"]], task="x" * 500),
                outcome_series("audit", "fp", [["not a time", "1"], [NOW + 180, {"a": 1}], [True, "1"]]),
            ]
        )
    )
    assert parsed == {("hate", "v1"): {NOW + 180: {"audit": {"tp": 4.0}}}}
    for bad in (
        b"<html>502 Bad Gateway</html>",
        b"[1, 2]",
        json.dumps({"status": "error", "error": "query timed out"}).encode(),
        json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode(),
        json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [1]}}).encode(),
        matrix([outcome_series("audit", "tp", [[1, 2, 3]])]),
        matrix([{"metric": {"kind": "audit"}, "values": "lots"}]),
        b" " * (source.MAX_BODY_BYTES + 1),
        matrix([{"metric": {}, "values": []}] * (source.MAX_SERIES + 1)),
    ):
        with pytest.raises(PrometheusError):
            parse_matrix(bad)


def test_the_plot_breaks_lines_at_undefined_points_and_stays_in_its_frame() -> None:
    nan = Interval(math.nan, math.nan, math.nan)
    points = [(NOW, Interval(0.5, 0.4, 0.6)), (NOW + 10, Interval(0.7, 0.6, 0.8)), (NOW + 20, nan)]
    points += [(NOW + 30, Interval(2.0, 1.5, 3.0)), (NOW + 40, Interval(0.2, math.nan, math.nan))]
    p = plot("t", {"v1": points}, NOW, NOW + 40, (0.0, 1.0))
    (line,) = p.lines
    assert len(line.segments) == 2 and len(line.bands) == 1  # the NaN split it; the last run has no bounds
    coords = [float(c) for seg in line.segments for xy in seg.split() for c in xy.split(",")]
    assert all(0 <= c <= p.width for c in coords[0::2]) and all(0 <= c <= p.height for c in coords[1::2])
    assert not p.empty and plot("t", {"v1": [(NOW, nan)]}, NOW, NOW + 1).empty


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest_asyncio.fixture
async def fake_prometheus() -> AsyncIterator[Callable[[Answer], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(answer: Answer) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/query_range", answer)
        server = TestServer(app, host="127.0.0.1", port=0)  # the OS picks a free port
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/"))

    yield start
    for server in servers:
        await server.close()


@pytest.mark.asyncio
async def test_hostile_prometheus_answers_become_errors(
    fake_prometheus: Callable[[Answer], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to refuse it by
        await response.prepare(request)
        chunk = b"[" * 65536
        for _ in range(source.MAX_BODY_BYTES // len(chunk) + 2):
            await response.write(chunk)
        return response

    async def html_error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="<html>oops</html>", content_type="text/html")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    async def declared_huge(request: web.Request) -> web.Response:
        return web.Response(body=b"{" * (source.MAX_BODY_BYTES + 10))

    monkeypatch.setattr(source, "TIMEOUT_S", 1.0)
    for answer, expected in (
        (huge, "larger than"),
        (declared_huge, "larger than"),
        (html_error, "HTTP 500"),
        (redirect, "HTTP 302"),
        (hang, "cannot reach"),
    ):
        view = await fetch(await fake_prometheus(answer), "7d", now=NOW)
        assert view.error and expected in view.error and not view.history, (answer.__name__, view.error)


def _app(tmp_path: Path, prometheus_url: str | None) -> tuple[web.Application, dict[str, str]]:
    users = UserStore(tmp_path / "users.json")
    users.add("root", "admin", "a long enough password 1")
    users.add("alice", "reviewer", "a long enough password 2")
    tokens = {name: users.issue_token(name) for name in ("root", "alice")}
    config = ConsoleConfig(
        users_path=tmp_path / "users.json",
        redis_url="redis://127.0.0.1:9/0",  # nothing there: the page must not need Redis
        bank_topic="",
        prometheus_url=prometheus_url,
    )
    return create_app(config), tokens


@pytest.mark.asyncio
async def test_admins_see_the_table_and_plot_reviewers_are_refused(
    tmp_path: Path, fake_prometheus: Callable[[Answer], Awaitable[str]]
) -> None:
    async def answer(request: web.Request) -> web.Response:
        assert request.query["query"] == source.RECORDED
        return web.Response(body=good_answer(), content_type="application/json")

    app, tokens = _app(tmp_path, await fake_prometheus(answer))
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        admin = {"Authorization": f"Bearer {tokens['root']}"}
        reviewer = {"Authorization": f"Bearer {tokens['alice']}"}
        for path in ("/admin/live-quality", "/api/v1/admin/live-quality"):
            assert (await client.get(path, headers=reviewer)).status == 403, path
        page = await client.get("/admin/live-quality", headers=admin)
        html = await page.text()
        assert page.status == 200, html
        assert 'id="live-table"' in html and "0.697 [0.601, 0.779]" in html  # tests/unit/test_live_quality_stats.py
        assert html.count("<polyline") >= 2 and "<svg" in html and 'class="live-band"' in html
        api = await client.get("/api/v1/admin/live-quality?range=1d", headers=admin)
        body = await api.json()
        (row,) = body["latest"]
        assert row["task"] == "hate" and row["macro_f1"]["value"] == pytest.approx(0.69697, abs=1e-5)
        assert row["routing_lift"]["value"] == pytest.approx(0.5 / 0.3)
        assert (await client.get("/api/v1/admin/live-quality?range=2y", headers=admin)).status == 400
        assert (await client.get("/admin/live-quality?source=../etc", headers=admin)).status == 400


@pytest.mark.asyncio
async def test_the_page_says_when_no_prometheus_is_configured(tmp_path: Path) -> None:
    app, tokens = _app(tmp_path, None)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        page = await client.get("/admin/live-quality", headers={"Authorization": f"Bearer {tokens['root']}"})
        assert page.status == 200 and 'id="live-unconfigured"' in await page.text()
