"""Live quality over time for the console, read from Prometheus (issue 21, part 2: "shown on an
admin page with a plot over time").

Why Prometheus, and why the outcome counts:
- The counts already live there: every dataset sink exports `modstream_live_outcomes_total`
  (kind, task, model_version, outcome), and the shipped rules turn them into 7-day windows
  (`modstream:live_outcomes:7d`) and every statistic the alerts fire on. Prometheus keeps their
  history, across console and sink restarts and across every sink replica; the console holds no
  verdicts of its own, and re-reading the `reviewed` topic or the dataset manifest from the
  console would mean a second, diverging implementation of counting that the sink owns.
- The console asks for the one recorded series the rules derive everything from,
  `modstream:live_outcomes:7d`, with `query_range`, and computes precision, recall, macro-F1,
  error rates and the routing lift from those counts with review/live_quality.py, whose
  formulas are the rules' own (same constants; an integration test compares the two on a real
  Prometheus). One query per page instead of one per statistic and bound; and the page can
  show what the rules do not record (the macro-F1's lower bound, precision and recall
  intervals, an interval for the lift) without adding recording rules.
- When the recorded series is absent over the whole window (a Prometheus without this
  project's rules, or rules loaded only recently), the page falls back to the rule's own
  expression over the raw counters and says so; that is heavier for Prometheus (7 days of raw
  samples per point), so the recorded series stays the default.

Prometheus is not trusted to be well-behaved: a body over MAX_BODY_BYTES, a wrong shape, a
non-finite or negative count, an unknown kind or outcome, or too many series end in
PrometheusError (the page says what went wrong) or in the point being skipped, never in a
crash. Without a configured URL (`--prometheus-url` / MODSTREAM_PROMETHEUS_URL) the page says
so and queries nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from review.live_quality import OUTCOMES, Counts, Interval, error_rate, macro_f1, precision, recall, routing_lift

RECORDED = "modstream:live_outcomes:7d"
RAW = "sum by (kind, task, model_version, outcome) (increase(modstream_live_outcomes_total[7d]))"
KINDS = ("audit", "routed")

RANGES = {"1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400, "90d": 90 * 86_400}
DEFAULT_RANGE = "30d"
POINTS = 120  # steps per plot: fine enough for a 7-day window, cheap for Prometheus
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_SERIES = 2_000
MAX_LABEL_CHARS = 128
TIMEOUT_S = 10.0


class PrometheusError(Exception):
    """Prometheus could not be asked, or its answer is not what the page can use."""


@dataclass(frozen=True)
class Stats:
    """Every figure the page shows for one task and model version at one time."""

    audit: Counts
    routed: Counts
    macro_f1: Interval
    precision: Interval
    recall: Interval
    error_rate: Interval
    routed_error_rate: Interval
    lift: Interval

    @classmethod
    def of(cls, audit: Counts, routed: Counts) -> Stats:
        return cls(
            audit,
            routed,
            macro_f1(audit),
            precision(audit),
            recall(audit),
            error_rate(audit),
            error_rate(routed),
            routing_lift(routed, audit),
        )

    def to_json(self) -> dict[str, Any]:
        def iv(i: Interval) -> dict[str, float | None]:
            return {
                k: (v if math.isfinite(v) else None)
                for k, v in (("value", i.value), ("lower", i.lower), ("upper", i.upper))
            }

        return {
            "audit_verdicts": self.audit.n,
            "routed_verdicts": self.routed.n,
            "audit_counts": vars(self.audit),
            "routed_counts": vars(self.routed),
            "macro_f1": iv(self.macro_f1),
            "precision": iv(self.precision),
            "recall": iv(self.recall),
            "error_rate": iv(self.error_rate),
            "routed_error_rate": iv(self.routed_error_rate),
            "routing_lift": iv(self.lift),
        }


@dataclass
class LiveQualityView:
    """What the page shows: per (task, model version) its latest figures and its history."""

    configured: bool
    range: str = DEFAULT_RANGE
    source: str = ""  # "recorded" (the rules' series) or "raw" (their expression on the counters)
    source_asked: str = "auto"
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    step: float = 0.0
    # (task, version) -> [(unix time, Stats)], time ascending
    history: dict[tuple[str, str], list[tuple[float, Stats]]] = field(default_factory=dict)

    def latest(self) -> list[tuple[str, str, float, Stats]]:
        rows = [(task, version, *points[-1]) for (task, version), points in self.history.items() if points]
        return sorted(rows, key=lambda r: (r[0], -r[2], r[1]))

    def to_json(self) -> dict[str, Any]:
        return {
            "configured": self.configured,
            "range": self.range,
            "source": self.source,
            "error": self.error,
            "start": self.start,
            "end": self.end,
            "step": self.step,
            "latest": [
                {"task": task, "model_version": version, "time": t, **stats.to_json()}
                for task, version, t, stats in self.latest()
            ],
            "history": [
                {
                    "task": task,
                    "model_version": version,
                    "points": [{"time": t, **stats.to_json()} for t, stats in points],
                }
                for (task, version), points in sorted(self.history.items())
            ],
        }


def _number(raw: object) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str) and len(raw) <= 64:
        try:
            value = float(raw)
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


def parse_matrix(body: bytes) -> dict[tuple[str, str], dict[float, dict[str, dict[str, float]]]]:
    """A query_range answer to (task, version) -> time -> kind -> outcome -> count. Raises
    PrometheusError on an answer of the wrong shape; skips points that cannot be counts
    (NaN, infinities, negatives, unknown kinds or outcomes, over-long labels)."""
    if len(body) > MAX_BODY_BYTES:
        raise PrometheusError(f"answer larger than {MAX_BODY_BYTES} bytes")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PrometheusError(f"answer is not JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise PrometheusError("answer is not a JSON object")
    if doc.get("status") != "success":
        why = doc.get("error")
        raise PrometheusError(f"query failed: {str(why)[:300] if why else 'status ' + str(doc.get('status'))[:40]}")
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
        raise PrometheusError("answer is not a range vector (data.resultType matrix)")
    result: list[Any] = data["result"]
    if len(result) > MAX_SERIES:
        raise PrometheusError(f"{len(result)} series, more than the {MAX_SERIES} this page reads")
    out: dict[tuple[str, str], dict[float, dict[str, dict[str, float]]]] = {}
    for series in result:
        if not isinstance(series, dict) or not isinstance(series.get("metric"), dict):
            raise PrometheusError("a series without its labels")
        labels = series["metric"]
        values = series.get("values")
        if not isinstance(values, list):
            raise PrometheusError("a series without values")
        kind, outcome = labels.get("kind"), labels.get("outcome")
        task, version = labels.get("task"), labels.get("model_version")
        if kind not in KINDS or outcome not in OUTCOMES:
            continue
        if not (isinstance(task, str) and isinstance(version, str)) or not task or not version:
            continue
        if len(task) > MAX_LABEL_CHARS or len(version) > MAX_LABEL_CHARS:
            continue
        by_time = out.setdefault((task, version), {})
        for pair in values:
            if not isinstance(pair, list) or len(pair) != 2:
                raise PrometheusError("a sample that is not [time, value]")
            t, v = _number(pair[0]), _number(pair[1])
            if t is None or v is None or v < 0:
                continue
            slot = by_time.setdefault(t, {}).setdefault(kind, {})
            slot[outcome] = slot.get(outcome, 0.0) + v
    return out


def to_history(
    matrix: dict[tuple[str, str], dict[float, dict[str, dict[str, float]]]],
) -> dict[tuple[str, str], list[tuple[float, Stats]]]:
    history = {}
    for key, by_time in matrix.items():
        points = []
        for t in sorted(by_time):
            kinds = by_time[t]
            audit, routed = (Counts(**kinds.get(kind, {})) for kind in KINDS)
            points.append((t, Stats.of(audit, routed)))
        history[key] = points
    return history


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    declared = response.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise PrometheusError(f"answer of {declared} bytes, larger than {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PrometheusError(f"answer larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def query_range(base_url: str, expr: str, start: float, end: float, step: float) -> bytes:
    url = base_url.rstrip("/") + "/api/v1/query_range"
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session,
            session.get(url, params=params, allow_redirects=False) as response,
        ):
            body = await _read_capped(response)
            if response.status != 200 and response.status not in (400, 422, 503):  # Prometheus' error codes
                raise PrometheusError(f"HTTP {response.status} from {url}")
            return body
    except PrometheusError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise PrometheusError(f"cannot reach Prometheus at {base_url}: {type(exc).__name__} {exc}"[:400]) from None


SOURCES = {
    "auto": (("recorded", RECORDED), ("raw", RAW)),
    "recorded": (("recorded", RECORDED),),
    "raw": (("raw", RAW),),
}


async def fetch(
    base_url: str | None, range_name: str = DEFAULT_RANGE, source: str = "auto", *, now: float | None = None
) -> LiveQualityView:
    """The page's data; never raises for anything Prometheus does (the view carries the error).
    `source`: auto (the recorded series, else the raw counters), recorded, or raw (the rule's
    expression on the counters: the whole history even where the rules were loaded later)."""
    if range_name not in RANGES:
        raise ValueError(f"range must be one of {', '.join(RANGES)}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}")
    if not base_url:
        return LiveQualityView(configured=False, range=range_name, source_asked=source)
    end = time.time() if now is None else now
    span = RANGES[range_name]
    step = max(60.0, span / POINTS)
    view = LiveQualityView(configured=True, range=range_name, source_asked=source, start=end - span, end=end, step=step)
    try:
        for name, expr in SOURCES[source]:
            matrix = parse_matrix(await query_range(base_url, expr, view.start, end, step))
            view.source = name
            if matrix:
                break
        view.history = to_history(matrix)
    except PrometheusError as exc:
        view.error = str(exc)
    return view
