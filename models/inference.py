"""Batched inference: calibrated per-task scores, decisions and the ITM match probability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from models.card import ModelCard
from models.classifier import ClassifierOutput, MultimodalModel
from models.preprocess import ImagePreprocessor, TextPreprocessor


@dataclass
class TaskPrediction:
    """score: calibrated P(positive label); decision: score >= threshold."""

    label: str
    score: float
    decision: bool
    threshold: float
    probs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": self.score,
            "decision": self.decision,
            "threshold": self.threshold,
            "probs": self.probs,
        }


@dataclass
class Prediction:
    """itm_match is None for text-only posts: ITM is undefined without an image."""

    tasks: dict[str, TaskPrediction]
    itm_match: float | None
    model_version: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": {task: p.to_dict() for task, p in self.tasks.items()},
            "itm_match": self.itm_match,
            "model_version": self.model_version,
        }


def task_predictions(out: ClassifierOutput, card: ModelCard) -> list[dict[str, TaskPrediction]]:
    rows: list[dict[str, TaskPrediction]] = [{} for _ in range(len(out.itm_logits))]
    for task, labels in card.tasks.items():
        probs = torch.softmax(out.task_logits[task].float() / card.temperature(task), dim=-1)
        threshold = card.threshold(task)
        for i, row in enumerate(probs.tolist()):
            score = row[-1]
            if len(labels) == 2:
                decision = score >= threshold
                label = labels[1] if decision else labels[0]
            else:
                best = max(range(len(labels)), key=row.__getitem__)
                label, score, decision = labels[best], row[best], best != 0
            rows[i][task] = TaskPrediction(
                label=label,
                score=score,
                decision=decision,
                threshold=threshold,
                probs=dict(zip(labels, row, strict=True)),
            )
    return rows


class Predictor:
    """Wraps a model and its card; `predict` takes raw texts and decoded images."""

    def __init__(
        self,
        model: MultimodalModel,
        tokenizer: Any,
        card: ModelCard,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.text = TextPreprocessor(tokenizer, card.config.max_text_length)
        enc = model.image_encoder
        self.images = ImagePreprocessor(enc.image_size, enc.mean, enc.std)

    @property
    def version(self) -> str:
        return self.card.version

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> list[Prediction]:
        if len(texts) != len(images):
            raise ValueError("texts and images must have the same length")
        if not texts:
            return []
        input_ids, attention_mask = self.text(texts)
        pixels, present = self.images(images)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ):
            out = self.model(
                input_ids.to(self.device),
                attention_mask.to(self.device),
                pixels.to(self.device),
                present.to(self.device),
            )
        match = torch.sigmoid(out.itm_logits.float()).tolist()
        return [
            Prediction(
                tasks=tasks,
                itm_match=match[i] if bool(present[i]) else None,
                model_version=self.card.version,
            )
            for i, tasks in enumerate(task_predictions(out, self.card))
        ]
