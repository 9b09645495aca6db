"""Batched inference: calibrated per-task scores, decisions and the ITM match probability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.card import ModelCard
from models.classifier import ClassifierOutput, MultimodalModel
from models.device_decode import EncodedJpeg, ImageHook, call_hook, decode_jpegs_to
from models.images import ImageError, decode_for_model
from models.neighbours import NeighbourIndex, disagreement, shares_as_numpy
from models.preprocess import ImagePreprocessor, TextPreprocessor


@dataclass
class TaskPrediction:
    """score: calibrated P(positive label); decision: score >= threshold;
    neighbour_disagreement: how far the post's nearest labelled training posts disagree with
    `label` (models/neighbours.py; None when the model has no neighbour index)."""

    label: str
    score: float
    decision: bool
    threshold: float
    probs: dict[str, float]
    neighbour_disagreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "label": self.label,
            "score": self.score,
            "decision": self.decision,
            "threshold": self.threshold,
            "probs": self.probs,
        }
        if self.neighbour_disagreement is not None:
            out["neighbour_disagreement"] = self.neighbour_disagreement
        return out


@dataclass
class Prediction:
    """itm_match is None for text-only posts: ITM is undefined without an image. `image_error`:
    the post's JPEG was handed over undecoded (EncodedJpeg) and neither the device nor the host
    could decode it; the post was scored on its text alone. `image_found`: what the predictor's
    image hook computed from such a JPEG's pixels (the worker's bank hashes), None without one."""

    tasks: dict[str, TaskPrediction]
    itm_match: float | None
    model_version: str
    image_error: ImageError | None = None
    image_found: object | None = None

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


def add_neighbour_disagreement(
    rows: list[dict[str, TaskPrediction]], out: ClassifierOutput, index: NeighbourIndex, card: ModelCard
) -> None:
    """Sets each prediction's `neighbour_disagreement` with the label it gives."""
    if out.pooled is None or not rows:
        return
    decided = {
        task: np.array([card.tasks[task].index(row[task].label) for row in rows])
        for task in index.n_labels
        if task in card.tasks
    }
    # On the model's device; looked up once per batch (already, when the model votes with them).
    shares = (
        shares_as_numpy(out.neighbour_shares)
        if out.neighbour_shares is not None
        else index.label_shares(out.pooled, out.image_present)
    )
    for task, values in disagreement(shares, decided).items():
        for row, value in zip(rows, values.tolist(), strict=True):
            row[task].neighbour_disagreement = None if math.isnan(value) else round(value, 4)


@dataclass
class PreparedBatch:
    """A batch ready for the device: token ids and uint8 pixels on the CPU (pinned when the
    predictor runs on a GPU). Made by `Predictor.prepare`, consumed by `Predictor.run`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixels: torch.Tensor  # [B, 3, S, S] uint8
    present: torch.Tensor  # [B] bool
    # (row, JPEG bytes) of the posts handed over undecoded: `run` decodes them on the device
    # (models/device_decode.py); their rows of `pixels` are zeros and `present` False until then.
    jpegs: list[tuple[int, EncodedJpeg]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.present)


@dataclass
class DevicePixels:
    """A batch's images on the device ([B, 3, S, S] uint8 and [B] bool), with what decoding its
    JPEGs there found: the rows that failed (`errors`) and the image hook's results (`found`)."""

    pixels: torch.Tensor
    present: torch.Tensor
    errors: dict[int, ImageError] = field(default_factory=dict)
    found: dict[int, object] = field(default_factory=dict)


class Predictor:
    """Wraps a model and its card; `predict` takes raw texts and decoded images.

    `predict` = `run(prepare(...))`: `prepare` is CPU work (tokenising, resizing to uint8)
    and `run` the device work (copy, normalise, forward), so a caller can prepare the next
    batch on another thread while this one computes (see stream.device_pool)."""

    def __init__(
        self,
        model: MultimodalModel,
        tokenizer: Any,
        card: ModelCard,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        image_hook: ImageHook | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.text = TextPreprocessor(tokenizer, card.config.max_text_length, card.config.ocr_segment)
        enc = model.image_encoder
        self.images = ImagePreprocessor(enc.image_size, enc.mean, enc.std)
        self._pin = self.device.type == "cuda"
        # Given each JPEG this predictor decodes (on its device, or on the host when the device
        # refuses it) at the host decode's size; its results come back as Prediction.image_found.
        self.image_hook = image_hook

    @property
    def version(self) -> str:
        return self.card.version

    def prepare(
        self,
        texts: Sequence[str],
        images: Sequence[Image.Image | EncodedJpeg | None],
        pool: Executor | None = None,
    ) -> PreparedBatch:
        """CPU work for one batch; `pool` (never the calling thread's own pool) tokenises on one
        of its threads and resizes the images on the others. EncodedJpeg images are left to
        `run`, which decodes them on the device."""
        if len(texts) != len(images):
            raise ValueError("texts and images must have the same length")
        jpegs = [(i, image) for i, image in enumerate(images) if isinstance(image, EncodedJpeg)]
        decoded = [image if isinstance(image, Image.Image) else None for image in images]
        if pool is None:
            input_ids, attention_mask = self.text(texts)
            pixels, present = self.images.to_uint8(decoded, pin=self._pin)
        else:
            tokens = pool.submit(self.text, texts)
            pixels, present = self.images.to_uint8(decoded, pin=self._pin, pool=pool)
            input_ids, attention_mask = tokens.result()
        if self._pin:
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
        return PreparedBatch(input_ids, attention_mask, pixels, present, jpegs)

    def _device_pixels(self, batch: PreparedBatch) -> DevicePixels:
        """The prepared pixels on the device, with the batch's undecoded JPEGs decoded there. A
        JPEG the device cannot decode is decoded on the host alone (models/device_decode.py); one
        the host cannot decode either leaves its row without an image, and its error is returned
        by row. Every JPEG decoded either way goes through the image hook, if any."""
        dev, nb = self.device, self._pin
        # A copy even on the CPU (where .to() is a no-op) when rows are filled in: a PreparedBatch
        # is never changed by running it.
        copy = bool(batch.jpegs)
        pixels = batch.pixels.to(dev, non_blocking=nb, copy=copy)
        present = batch.present.to(dev, non_blocking=nb, copy=copy)
        out = DevicePixels(pixels, present)
        if not batch.jpegs:
            return out
        rows = [row for row, _ in batch.jpegs]
        side = self.images.size
        decoded = decode_jpegs_to([jpeg for _, jpeg in batch.jpegs], side, dev, self.image_hook)
        pixels[rows] = decoded.pixels
        present[rows] = True
        out.found = {rows[k]: found for k, found in decoded.found.items()}
        for k in decoded.failed:
            row, jpeg = batch.jpegs[k]
            try:
                with decode_for_model(jpeg.data, side) as image:
                    rgb = np.array(image)  # a copy the hook may keep after the image closes
                    pixels[row] = torch.from_numpy(self.images.uint8_one(image)).to(dev)
            except ImageError as exc:
                present[row] = False
                out.errors[row] = exc
                continue
            if self.image_hook is not None:  # a JPEG the device refuses is hashed all the same
                (out.found[row],) = call_hook(self.image_hook, [torch.from_numpy(rgb).permute(2, 0, 1).to(dev)])
        return out

    @torch.inference_mode()
    def run(self, batch: PreparedBatch) -> list[Prediction]:
        if not len(batch):
            return []
        # From pinned memory the copies are asynchronous; the forward queues behind them.
        dev, nb = self.device, self._pin
        decoded = self._device_pixels(batch)
        present = decoded.present
        pixels = self.images.normalize(decoded.pixels, present)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ):
            out = self.model(
                batch.input_ids.to(dev, non_blocking=nb), batch.attention_mask.to(dev, non_blocking=nb), pixels, present
            )
        match = torch.sigmoid(out.itm_logits.float()).tolist()
        has_image = present.tolist()
        rows = task_predictions(out, self.card)
        if self.model.neighbours is not None:
            add_neighbour_disagreement(rows, out, self.model.neighbours, self.card)
        return [
            Prediction(
                tasks=tasks,
                itm_match=match[i] if has_image[i] else None,
                model_version=self.card.version,
                image_error=decoded.errors.get(i),
                image_found=decoded.found.get(i),
            )
            for i, tasks in enumerate(rows)
        ]

    def predict(self, texts: Sequence[str], images: Sequence[Image.Image | EncodedJpeg | None]) -> list[Prediction]:
        if len(texts) != len(images):
            raise ValueError("texts and images must have the same length")
        if not texts:
            return []
        return self.run(self.prepare(texts, images))
