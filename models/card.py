"""The model card: everything needed to use a model version, stored as `card.json`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from models.config import ModelConfig
from models.routing.policy import RoutingPolicySpec

CARD_SCHEMA = 1


def json_safe(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (e.g. AUROC with one class) is stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass
class ModelCard:
    """`thresholds` and `temperatures` are per task; a task's decision is
    P(positive label) >= threshold, where the positive label is the last in its label list.
    `itm` carries the match threshold for review routing and whether ITM was trained.
    `metrics` holds validation numbers, including `itm_auroc` and `routing_lift`.
    `routing` is the review policy chosen at training (models/routing/policy.py: kind,
    coefficients, review cut, the budget it was tuned for and its validated curve); empty
    on cards made before it existed, which route by the ITM gate as they always did."""

    config: ModelConfig
    version: str = "unversioned"
    created_at: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)
    itm: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)

    def routing_policy(self) -> RoutingPolicySpec | None:
        """The card's review policy, or None on a card without one."""
        return RoutingPolicySpec.from_dict(self.routing) if self.routing else None

    @property
    def tasks(self) -> dict[str, list[str]]:
        return self.config.tasks

    def threshold(self, task: str) -> float:
        return self.thresholds.get(task, 0.5)

    def temperature(self, task: str) -> float:
        return self.temperatures.get(task, 1.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = CARD_SCHEMA
        data["backbones"] = {"text": self.config.text_backbone, "image": self.config.image_backbone}
        data["tasks"] = self.config.tasks
        return data

    def to_json(self) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if data.get("schema") != CARD_SCHEMA:
            raise ValueError(f"unsupported model card schema {data.get('schema')!r}")
        return cls(
            config=ModelConfig.from_dict(data["config"]),
            version=data["version"],
            created_at=data.get("created_at", ""),
            thresholds={k: float(v) for k, v in data.get("thresholds", {}).items()},
            temperatures={k: float(v) for k, v in data.get("temperatures", {}).items()},
            itm=dict(data.get("itm", {})),
            training=dict(data.get("training", {})),
            metrics=dict(data.get("metrics", {})),
            routing=_checked_routing(data.get("routing")),
        )


def _checked_routing(value: Any) -> dict[str, Any]:
    """A card's routing block, refused at load (not at the first post) when malformed."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"model card 'routing' must be an object, got {type(value).__name__}")
    spec = RoutingPolicySpec.from_dict(value)
    if spec.cut is None:
        raise ValueError("model card 'routing' has no review cut")
    return dict(value)
