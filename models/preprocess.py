"""Turning raw posts into model inputs: tokenised text and normalised pixels (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class TextPreprocessor:
    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]


class ImagePreprocessor:
    """Resize the whole image to a square (no crop: text printed on memes sits at the
    edges) and normalise. Missing images become zeros with `present = False`."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def one(self, image: Image.Image) -> Tensor:
        resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std)

    def __call__(self, images: Sequence[Image.Image | None]) -> tuple[Tensor, Tensor]:
        pixels = torch.zeros(len(images), 3, self.size, self.size)
        present = torch.zeros(len(images), dtype=torch.bool)
        for i, image in enumerate(images):
            if image is not None:
                pixels[i] = self.one(image)
                present[i] = True
        return pixels, present
