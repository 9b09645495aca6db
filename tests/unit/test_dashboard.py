"""The Grafana dashboard: valid JSON, valid PromQL, only catalogued metrics, the panels operators need."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_catalogue import all_names, base_name, read_catalogue

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "modstream.json"


def targets() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t for panel in dashboard["panels"] for t in panel["targets"]]


def test_dashboard_parses_with_unique_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]


def test_dashboard_uses_only_catalogued_metrics() -> None:
    known = all_names(read_catalogue())
    used = set()
    for target in targets():
        expr = re.sub(r'"[^"]*"', '""', target["expr"])
        used |= {base_name(name, known) for name in re.findall(r"\bmodstream_[a-z0-9_]+\b", expr)}
    assert used, "no metric found in the dashboard: the pattern is wrong"
    assert used - known == set(), "dashboard uses metrics missing from docs/metrics.md"


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(t["expr"] for t in targets())
    for metric in (
        "modstream_posts_total",  # throughput
        "modstream_consumer_topic_lag",
        "modstream_produce_to_label_seconds_bucket",
        "modstream_dead_letters_total",
        "modstream_review_queue_depth",
        "modstream_review_oldest_item_age_seconds",
        "modstream_labels_total",  # routed share
        "modstream_model_info",
        "modstream_inference_exec_count_total",  # mean batch size
        "modstream_gpu_memory_allocated_bytes",
    ):
        assert metric in exprs, metric
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query, written as a recording rule."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run deploy/test-tools.sh (Debian's prometheus package)", pytrace=False)
    rules = [{"record": f"dashboard:query{i}", "expr": t["expr"]} for i, t in enumerate(targets())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
