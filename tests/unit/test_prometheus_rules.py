"""The Prometheus config and alert rules: promtool's checks and unit tests, plus the contracts
around them (every alert tested both ways, has a runbook entry, uses catalogued metrics)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_catalogue import all_names, base_name, read_catalogue

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "modstream.rules.yml"
TESTS = sorted((PROM / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
# Series Prometheus itself creates for every target.
BUILTIN = {"up"}


def promtool(*args: str) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run deploy/test-tools.sh (Debian's prometheus package)", pytrace=False)
    proc = subprocess.run([exe, *args], cwd=PROM, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    cases = []
    for path in TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def test_promtool_check_config() -> None:
    promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules() -> None:
    promtool("check", "rules", str(RULES.relative_to(PROM)))


def test_promtool_unit_tests_pass() -> None:
    assert TESTS, "no promtool tests in deploy/prometheus/tests"
    promtool("test", "rules", *(str(p.relative_to(PROM)) for p in TESTS))


def test_every_alert_has_a_firing_and_a_silent_test() -> None:
    cases = rule_tests()
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"
    assert (firing | silent) - names == set(), "tests name alerts that do not exist"


def test_every_alert_is_complete_and_has_a_runbook_entry() -> None:
    headings = {m.group(1).lower() for m in re.finditer(r"^### (\w+)\s*$", RUNBOOK.read_text(), re.M)}
    for alert in alerts():
        name = alert["alert"]
        assert alert.get("for"), f"{name}: no `for:`"
        assert alert.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = alert.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        assert annotations.get("runbook_url") == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in headings, f"{name}: no `### {name}` entry in docs/runbook.md"


def test_rules_use_only_catalogued_metrics() -> None:
    known = all_names(read_catalogue())
    used = set()
    for alert in alerts():
        expr = re.sub(r'"[^"]*"', '""', alert["expr"])  # label values are not metric names
        used |= {base_name(name, known) for name in re.findall(r"\bmodstream_[a-z0-9_]+\b", expr)}
        used |= {word for word in BUILTIN if re.search(rf"\b{word}\b", expr)}
    assert used, "no metric found in the rules: the pattern is wrong"
    assert used - known - BUILTIN == set(), "rules use metrics missing from docs/metrics.md"


def test_catalogue_parses_every_role() -> None:
    catalogue = read_catalogue()
    assert set(catalogue) == {"worker", "lag-exporter", "review-sink", "dataset-sink", "review-console", "retrain"}
    for role, entries in catalogue.items():
        assert entries, role
        for entry in entries.values():
            assert entry.type in {"counter", "gauge", "histogram"}, entry
            assert (entry.type == "counter") == entry.name.endswith("_total"), entry
