"""The console's live-quality source against a real Prometheus: history backfilled with promtool,
the repo's recording rules evaluated by the server itself. The figures the page computes from
the recorded outcome counts must equal what the rules record (the alerts' inputs); the raw
counters give the whole history per model version; an unreachable Prometheus is an error on the
page, not an exception."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from review.live_quality_source import fetch
from tests.integration.prometheus_server import Series, backfill, require_prometheus, running_prometheus
from tests.integration.stack import free_loopback_ports

HOUR = 3600.0
# Verdicts per hour: (kind, task, version) -> outcome -> count.
RATES = {
    ("audit", "hate", "v1"): {"tp": 2, "fp": 2, "fn": 2, "tn": 2},
    ("routed", "hate", "v1"): {"tp": 1, "fp": 1, "fn": 1, "tn": 1},
    ("audit", "hate", "v2"): {"tp": 3, "fp": 1, "fn": 2, "tn": 6},
    ("routed", "hate", "v2"): {"tp": 2, "fp": 2, "fn": 1, "tn": 1},
    ("audit", "sarcasm", "v2"): {"tp": 4, "fp": 2, "fn": 1, "tn": 3},
    ("routed", "sarcasm", "v2"): {"tp": 1, "fp": 3, "fn": 1, "tn": 1},
}
SPANS = {"v1": (12 * 24, 5 * 24), "v2": (5 * 24, 0)}  # hours ago: first and last sample


def history(now: float) -> list[Series]:
    series: list[Series] = []
    for (kind, task, version), rates in RATES.items():
        first, last = SPANS[version]
        for outcome, rate in rates.items():
            hours = range(first, last - 1, -1)
            points = [(now - h * HOUR - 60, float(rate * (i + 1))) for i, h in enumerate(hours)]
            labels = {"kind": kind, "task": task, "model_version": version, "outcome": outcome}
            series.append(("modstream_live_outcomes_total", labels, points))
    return series


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    require_prometheus()
    now = time.time()
    data = tmp_path_factory.mktemp("prom") / "data"
    backfill(history(now), data)
    with running_prometheus(data, rules=True) as url:
        yield url, now


def instant(url: str, expr: str, at: float) -> dict[tuple[str, str], float]:
    query = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as resp:
        body = json.load(resp)
    return {(r["metric"]["task"], r["metric"]["model_version"]): float(r["value"][1]) for r in body["data"]["result"]}


def wait_for(url: str, expr: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if instant(url, expr, time.time()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{expr} never appeared: the rules were not evaluated")


def test_the_page_figures_equal_what_the_recording_rules_record(prometheus: tuple[str, float]) -> None:
    url, _ = prometheus
    wait_for(url, "modstream:live_macro_f1_upper:7d")
    time.sleep(2)  # a few evaluations: the latest group evaluation is complete
    at = time.time() - 1
    view = asyncio.run(fetch(url, "1d", "recorded", now=at))
    assert view.error is None and view.source == "recorded", view.error
    latest = {(task, version): stats for task, version, _, stats in view.latest()}
    assert {("hate", "v1"), ("hate", "v2"), ("sarcasm", "v2")} <= set(latest)
    rules = {
        "macro_f1": instant(url, "modstream:live_macro_f1:7d", at),
        "macro_f1_upper": instant(url, "modstream:live_macro_f1_upper:7d", at),
        "precision": instant(url, "modstream:live_precision:7d", at),
        "recall": instant(url, "modstream:live_recall:7d", at),
        "error_upper": instant(url, 'modstream:live_error_rate_upper:7d{kind="audit"}', at),
        "error_lower": instant(url, 'modstream:live_error_rate_lower:7d{kind="routed"}', at),
        "lift": instant(url, "modstream:live_routing_lift:7d", at),
    }
    compared = 0
    for key, stats in latest.items():
        ours = {
            "macro_f1": stats.macro_f1.value,
            "macro_f1_upper": stats.macro_f1.upper,
            "precision": stats.precision.value,
            "recall": stats.recall.value,
            "error_upper": stats.error_rate.upper,
            "error_lower": stats.routed_error_rate.lower,
            "lift": stats.lift.value,
        }
        for name, recorded in rules.items():
            assert key in recorded, (name, key)
            assert ours[name] == pytest.approx(recorded[key], rel=1e-9, abs=1e-12), (name, key)
            compared += 1
    assert compared == 7 * len(latest)
    # The one figure whose truth is known exactly (constant rates): hate v2's audit macro-F1
    # (2*3/(2*3+3) + 2*6/(2*6+3)) / 2 and its lift (3/6) / (3/12).
    assert latest[("hate", "v2")].macro_f1.value == pytest.approx((6 / 9 + 12 / 15) / 2)
    assert latest[("hate", "v2")].lift.value == pytest.approx(2.0)
    assert latest[("hate", "v2")].macro_f1.lower < latest[("hate", "v2")].macro_f1.value


def test_raw_counters_give_each_versions_history(prometheus: tuple[str, float]) -> None:
    url, now = prometheus
    view = asyncio.run(fetch(url, "30d", "raw", now=now))
    assert view.error is None and view.source == "raw", view.error
    v1, v2 = view.history[("hate", "v1")], view.history[("hate", "v2")]
    assert v1[0][0] < now - 10 * 86_400 and v1[-1][0] > now - 2 * 86_400  # counted until its window empties
    assert now - 5.1 * 86_400 < v2[0][0] and v2[-1][0] >= now - view.step
    assert len(v2) >= 18  # 5 days at 6-hour steps (30 days / 120 points)
    for _, stats in v2[2:]:  # constant rates: every point's F1 is the rates' (increase scales all counts alike)
        assert stats.macro_f1.value == pytest.approx((6 / 9 + 12 / 15) / 2, rel=1e-6)
        assert stats.macro_f1.lower < stats.macro_f1.value < stats.macro_f1.upper
    assert all(math.isfinite(s.macro_f1.value) for _, s in v1)


def test_an_unreachable_prometheus_is_an_error_on_the_page() -> None:
    (port,) = free_loopback_ports(1)  # nothing listens there
    view = asyncio.run(fetch(f"http://127.0.0.1:{port}", "7d"))
    assert view.configured and view.error and "cannot reach" in view.error and not view.history
    unconfigured = asyncio.run(fetch(None))
    assert not unconfigured.configured and unconfigured.error is None


def test_the_backfill_helper_writes_readable_openmetrics(tmp_path: Path) -> None:
    from tests.integration.prometheus_server import openmetrics

    text = openmetrics(history(1_000_000.0))
    assert text.startswith("# TYPE modstream_live_outcomes counter") and text.endswith("# EOF\n")
