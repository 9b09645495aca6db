"""Reads docs/metrics.md, the metric catalogue: one table per role, headed `## ... role `name``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ROLES = ("worker", "review-sink", "dataset-sink", "review-console", "retrain")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_ROLE = re.compile(r"^## .*role `([a-z-]+)`\s*$")
_ROW = re.compile(r"^\| `([a-z_:][a-z0-9_:]*)` \|\s*(\w+)\s*\|([^|]*)\|([^|]*)\|(.*)\|\s*$")


@dataclass(frozen=True)
class Entry:
    name: str
    type: str
    labels: frozenset[str]
    cuda_only: bool


def read_catalogue(path: Path = CATALOGUE) -> dict[str, dict[str, Entry]]:
    """role -> metric name -> Entry. Raises ValueError on a table row it cannot read."""
    roles: dict[str, dict[str, Entry]] = {}
    role: str | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        heading = _ROLE.match(line)
        if heading:
            role = heading.group(1)
            roles[role] = {}
            continue
        if role is None or not line.startswith("| `"):
            continue
        row = _ROW.match(line)
        if row is None:
            raise ValueError(f"{path}:{number}: unreadable catalogue row: {line!r}")
        name, kind, labels, _unit, meaning = row.groups()
        label_set = frozenset(re.findall(r"`([a-z_]+)`", labels))
        roles[role][name] = Entry(name, kind, label_set, "*CUDA only.*" in meaning)
    return roles


def all_names(catalogue: dict[str, dict[str, Entry]]) -> set[str]:
    return {name for entries in catalogue.values() for name in entries}


def base_name(series: str, known: set[str]) -> str:
    """The catalogued family of an exposed series name (histogram parts map to the histogram)."""
    if series in known:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series[: -len(suffix)] in known:
            return series[: -len(suffix)]
    return series
