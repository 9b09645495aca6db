"""Live quality in the console, in Chromium: an admin opens /admin/live-quality on a console
configured with a real Prometheus (history backfilled by promtool) and sees the table and the
server-drawn plot, one line per model version; a reviewer cannot open it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Console
from tests.e2e.test_review_console import login
from tests.integration.prometheus_server import backfill, require_prometheus, running_prometheus
from tests.integration.test_live_quality_prometheus import history


def test_an_admin_sees_the_live_quality_plot_and_a_reviewer_is_refused(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    require_prometheus()
    data = tmp_path / "prom"
    backfill(history(time.time()), data)
    with running_prometheus(data) as url:  # no rules: the page falls back to the raw counters
        console: Console = start_console(extra_args=("--prometheus-url", url))
        page = login(browser, console, "root")
        page.goto("/admin/live-quality?range=30d")
        assert "the raw counters" in page.locator("#live-source").inner_text()
        rows = page.locator("#live-table .live-row")
        assert rows.count() == 3  # hate v1, hate v2, sarcasm v2
        assert "[" in page.locator(".live-macro-f1").first.inner_text()  # value and its interval
        chart = page.locator("svg.live-chart").first
        assert chart.is_visible() and chart.bounding_box()["width"] > 300  # type: ignore[index]
        versions = {
            line.get_attribute("data-version") for line in page.locator("svg.live-chart polyline.live-line").all()
        }
        assert versions == {"v1", "v2"}
        assert page.locator("svg.live-chart polygon.live-band").count() >= 2
        page.screenshot(path=str(tmp_path / "live-quality.png"), full_page=True)

        reviewer = login(browser, console, "alice")
        response = reviewer.goto("/admin/live-quality")
        assert response is not None and response.status == 403
