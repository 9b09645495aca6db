"""Live quality (admins): per task and model version, the live model's precision, recall and
macro-F1 from the blind audit sample, with 95% intervals, the live routing lift, and a plot of
macro-F1 and lift over time, as /admin/live-quality (page, server-drawn SVG: no script) and
/api/v1/admin/live-quality (JSON). Data: Prometheus (review/live_quality_source.py says why).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from review.console.base import HandlerBase, _fmt_age, _require_admin
from review.console.middlewares import _json_error
from review.live_quality import Interval
from review.live_quality_source import DEFAULT_RANGE, RANGES, SOURCES, LiveQualityView, Stats, fetch

PALETTE = ("#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d")
WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28


@dataclass
class Line:
    version: str
    color: str
    segments: list[str]  # polyline "x,y x,y" per unbroken run of defined values
    bands: list[str]  # polygon points of the interval around each segment


@dataclass
class Plot:
    title: str
    width: int
    height: int
    lines: list[Line]
    y_ticks: list[tuple[float, str]]  # (pixel y, label)
    x_ticks: list[tuple[float, str, str]]  # (pixel x, label, text-anchor)
    reference: float | None  # pixel y of a reference line (lift 1.0), if any
    empty: bool


def plot(
    title: str,
    series: dict[str, list[tuple[float, Interval]]],
    start: float,
    end: float,
    y_range: tuple[float, float] | None = None,
    reference: float | None = None,
    colors: dict[str, str] | None = None,
) -> Plot:
    """Pixel geometry of one chart: a line per model version, its 95% interval as a band.
    Undefined points (NaN) break the line; the y axis is `y_range` or fits the bounds."""
    finite = [
        v for points in series.values() for _, iv in points for v in (iv.value, iv.lower, iv.upper) if math.isfinite(v)
    ]
    if y_range is None:
        low = min([*finite, reference if reference is not None else math.inf, 0.0])
        high = max([*finite, reference if reference is not None else 0.0, 1.0])
        high = min(high, 10.0)
        y_range = (low, high * 1.05)
    y0, y1 = y_range
    span_t = max(end - start, 1.0)

    def px(t: float) -> float:
        return round(LEFT + (t - start) / span_t * (WIDTH - LEFT - RIGHT), 1)

    def py(v: float) -> float:
        v = min(max(v, y0), y1)
        return round(TOP + (1 - (v - y0) / (y1 - y0)) * (HEIGHT - TOP - BOTTOM), 1)

    lines = []
    for i, (version, points) in enumerate(sorted(series.items())):
        runs: list[list[tuple[float, Interval]]] = [[]]
        for t, iv in points:
            if math.isfinite(iv.value):
                runs[-1].append((t, iv))
            elif runs[-1]:
                runs.append([])
        segments, bands = [], []
        for run in runs:
            if not run:
                continue
            segments.append(" ".join(f"{px(t)},{py(iv.value)}" for t, iv in run))
            if all(math.isfinite(iv.lower) and math.isfinite(iv.upper) for _, iv in run):
                upper = [f"{px(t)},{py(iv.upper)}" for t, iv in run]
                lower = [f"{px(t)},{py(iv.lower)}" for t, iv in reversed(run)]
                bands.append(" ".join(upper + lower))
        color = (colors or {}).get(version) or PALETTE[i % len(PALETTE)]
        lines.append(Line(version, color, segments, bands))
    y_ticks = [(py(y0 + (y1 - y0) * k / 4), f"{y0 + (y1 - y0) * k / 4:.2f}") for k in range(5)]
    fmt = "%H:%M" if span_t <= 2 * 86_400 else "%b %d"
    anchors = ("start", "middle", "middle", "middle", "end")  # the end labels stay inside the frame
    x_ticks = [
        (
            px(start + span_t * k / 4),
            dt.datetime.fromtimestamp(start + span_t * k / 4, dt.UTC).strftime(fmt),
            anchors[k],
        )
        for k in range(5)
    ]
    ref = py(reference) if reference is not None and y0 <= reference <= y1 else None
    return Plot(title, WIDTH, HEIGHT, lines, y_ticks, x_ticks, ref, not any(line.segments for line in lines))


def plots(view: LiveQualityView) -> list[Plot]:
    """Per task: macro-F1 (0-1) and routing lift over time, one line per model version."""
    out = []
    versions = sorted({version for _, version in view.history})
    colors = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(versions)}  # one colour per version on every plot
    for task in sorted({task for task, _ in view.history}):
        f1: dict[str, list[tuple[float, Interval]]] = {}
        lift: dict[str, list[tuple[float, Interval]]] = {}
        for (t_name, version), points in view.history.items():
            if t_name == task:
                f1[version] = [(t, s.macro_f1) for t, s in points]
                lift[version] = [(t, s.lift) for t, s in points]
        title = f"{task}: live macro-F1 (audit sample, 7-day window)"
        out.append(plot(title, f1, view.start, view.end, (0.0, 1.0), colors=colors))
        title = f"{task}: live routing lift (routed / audit error rate)"
        out.append(plot(title, lift, view.start, view.end, None, 1.0, colors))
    return out


def fmt_interval(iv: Interval, digits: int = 3) -> str:
    if not math.isfinite(iv.value):
        return "—"
    text = f"{iv.value:.{digits}f}"
    if math.isfinite(iv.lower) and math.isfinite(iv.upper):
        text += f" [{iv.lower:.{digits}f}, {iv.upper:.{digits}f}]"
    return text


def fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _query(request: web.Request) -> tuple[str, str]:
    """(range, source) from the query string, each from its fixed set."""
    name, source = request.query.get("range") or DEFAULT_RANGE, request.query.get("source") or "auto"
    if name not in RANGES:
        raise ValueError(f"range must be one of {', '.join(RANGES)}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}")
    return name, source


class LiveQualityPages(HandlerBase):
    """/admin/live-quality (page) and /api/v1/admin/live-quality (JSON)."""

    async def live_quality_page(self, request: web.Request) -> web.Response:
        _require_admin(request)
        status, error = 200, None
        try:
            name, source = _query(request)
        except ValueError as exc:
            name, source, status, error = DEFAULT_RANGE, "auto", 400, str(exc)
        view = await fetch(self.c.config.prometheus_url, name, source)
        extra: dict[str, Any] = {}
        with contextlib.suppress(RedisError, OSError):  # the page needs Prometheus, not Redis
            extra = {"stats": await self.c.stats(), "fmt_age": _fmt_age}
        rows: Sequence[tuple[str, str, float, Stats]] = view.latest()
        return self.c.render(
            request,
            "live_quality.html",
            status=status,
            view=view,
            rows=rows,
            plots=plots(view),
            ranges=list(RANGES),
            sources=list(SOURCES),
            error=error,
            prometheus_url=self.c.config.prometheus_url,
            fmt_interval=fmt_interval,
            fmt_time=fmt_time,
            **extra,
        )

    async def api_live_quality(self, request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        try:
            name, source = _query(request)
        except ValueError as exc:
            return _json_error(400, str(exc))
        view = await fetch(self.c.config.prometheus_url, name, source)
        return web.json_response(view.to_json())
