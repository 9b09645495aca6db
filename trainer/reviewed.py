"""The reviewed dataset (written by the dataset sink) as training data, and which decisions are new.

Every version the retraining job writes keeps, next to its card, `reviewed-decisions.json`:
the decision keys it trained on and those it held out. A decision is new when no such file of
the newest retrained version lists it, so a refused candidate also counts as "trained" and the
watch loop does not retrain on the same decisions again and again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.registry import ModelRegistry
from modstream.manifest import Example, read_complete_lines
from trainer.holdout import decided_at

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
DECISIONS_FILE = "reviewed-decisions.json"


def decision_key(example: Example) -> str:
    """A decision's identity: its decision_id, else post id + time (a re-decision is new)."""
    decision_id = example.meta.get("decision_id")
    if isinstance(decision_id, str) and decision_id:
        return decision_id
    return f"{example.id}@{example.meta.get('decided_at')}"


def read_reviewed(folder: Path, tasks: Mapping[str, Sequence[str]]) -> list[Example]:
    """The labelled reviewed examples for these tasks. Labels for other tasks are dropped;
    decisions that label none of these tasks (skip, escalate) are left out; a label value the
    task does not know, or a missing decision time, is an error naming the example."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        log.info("no reviewed dataset at %s yet", manifest)
        return []
    out = []
    for ex in read_complete_lines(manifest, latest=True):
        labels: dict[str, str | None] = {}
        for task, label in ex.labels.items():
            if task not in tasks:
                continue
            if label is not None and label not in tasks[task]:
                raise ValueError(
                    f"{manifest}: example {ex.id!r} has label {label!r} for task {task!r}, "
                    f"which the model does not know (expected one of {list(tasks[task])})"
                )
            labels[task] = label
        if not any(v is not None for v in labels.values()):
            continue
        decided_at(ex)  # validated here, before any training starts
        # A reviewed post was routed because its pair looked weak: its own pair is an ITM
        # target only when the reviewer said whether image and text belong together.
        answer = ex.meta.get("image_text_match")
        meta = {**ex.meta, "itm_target": answer if isinstance(answer, bool) else None}
        out.append(Example(ex.id, ex.text, ex.image, labels, meta))
    return out


@dataclass
class SeenDecisions:
    """The decisions the newest retrained version looked at (`version` None: no retrain yet)."""

    version: str | None = None
    trained_on: set[str] = field(default_factory=set)
    holdout: set[str] = field(default_factory=set)
    set_aside: set[str] = field(default_factory=set)

    @property
    def all(self) -> set[str]:
        return self.trained_on | self.holdout | self.set_aside


def write_seen(
    version_dir: Path, trained_on: Iterable[str], holdout: Iterable[str], set_aside: Iterable[str] = ()
) -> Path:
    """`set_aside`: decisions looked at but neither trained on nor held out (their post id is
    in the base holdout)."""
    path = Path(version_dir) / DECISIONS_FILE
    data = {"trained_on": sorted(trained_on), "holdout": sorted(holdout), "set_aside": sorted(set_aside)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_seen(registry: ModelRegistry, version: str) -> SeenDecisions | None:
    path = registry.root / version / DECISIONS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return SeenDecisions(
        version, set(data.get("trained_on", [])), set(data.get("holdout", [])), set(data.get("set_aside", []))
    )


def last_seen(registry: ModelRegistry) -> SeenDecisions:
    """What the newest retrained version (promoted or refused) looked at."""
    for version in reversed(registry.versions()):
        seen = read_seen(registry, version)
        if seen is not None:
            return seen
    return SeenDecisions()


def new_decisions(examples: Iterable[Example], seen: SeenDecisions) -> list[str]:
    """Keys of the decisions no retrained version has looked at yet."""
    known = seen.all
    return [key for key in map(decision_key, examples) if key not in known]
