"""Turning raw posts into model inputs: tokenised text and normalised pixels (no I/O).

Images are prepared in two steps so the expensive part can leave the device's critical
path: `to_uint8` (CPU: resize to the model's square, 1 byte per channel) and `normalize`
(float conversion and mean/std, on whatever device the batch is sent to). Training and
serving share both steps, so they see identical pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.images import model_input


class PostText(str):
    """A post's text carrying the text read from its image (`ocr`, None when not read).

    A str, so it travels unchanged through code that batches plain texts (the device pool's
    queue, the dedupe cache); only `TextPreprocessor` looks at `ocr`."""

    ocr: str | None

    def __new__(cls, text: str, ocr: str | None = None) -> PostText:
        obj = super().__new__(cls, text)
        obj.ocr = ocr
        return obj


def ocr_of(text: str) -> str | None:
    return text.ocr if isinstance(text, PostText) else None


class TextPreprocessor:
    """Tokenises posts for the text encoder; the one place training and serving share.

    With `ocr_segment`, every post is a pair: its text, then the text read from its image
    (empty when there is none, or OCR failed), truncated longest-first so neither segment
    crowds the other out. The model always sees the same layout it was trained with."""

    def __init__(self, tokenizer: Any, max_length: int, ocr_segment: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ocr_segment = ocr_segment

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenises the whole batch in one call (the fast tokenizer batches in Rust)."""
        firsts = [str(t) for t in texts]
        seconds = [ocr_of(t) or "" for t in texts] if self.ocr_segment else None
        batch = self.tokenizer(
            firsts,
            seconds,
            padding=True,
            truncation="longest_first" if self.ocr_segment else True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]


class ImagePreprocessor:
    """Resize the whole image to a square (`model_input`) and normalise. Missing images
    become zeros with `present = False`."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(list(mean), dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).reshape(1, 3, 1, 1)
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def uint8_one(self, image: Image.Image) -> np.ndarray:
        """[3, size, size] uint8; a copy alone when the decode pool already made the image the
        model's input (stream.media FetchConfig.model_side)."""
        resized = model_input(image, self.size)
        return np.array(resized, dtype=np.uint8).transpose(2, 0, 1)  # a writable copy torch may share

    def to_uint8(
        self, images: Sequence[Image.Image | None], pin: bool = False, pool: Executor | None = None
    ) -> tuple[Tensor, Tensor]:
        """([B, 3, size, size] uint8, [B] bool present); `pin` allocates page-locked memory
        so the copy to a GPU can run asynchronously; `pool` resizes on several threads
        (Pillow releases the GIL while resizing)."""
        pixels = torch.zeros(len(images), 3, self.size, self.size, dtype=torch.uint8, pin_memory=pin)
        present = torch.zeros(len(images), dtype=torch.bool, pin_memory=pin)
        rows = [i for i, image in enumerate(images) if image is not None]

        def fill(i: int) -> None:
            image = images[i]
            assert image is not None
            pixels[i] = torch.from_numpy(self.uint8_one(image))

        if pool is None or len(rows) < 2:
            for i in rows:
                fill(i)
        else:
            list(pool.map(fill, rows))  # list(): re-raises the first error
        present[rows] = True
        return pixels, present

    def normalize(self, pixels: Tensor, present: Tensor | None = None) -> Tensor:
        """uint8 [B, 3, H, W] on any device -> float32 normalised on the same device. Rows
        whose image is missing stay all zeros, as the model was trained with."""
        device = pixels.device
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        mean, std = self._on[device]
        out = (pixels.float() / 255.0 - mean) / std
        if present is not None:
            out = out * present.to(device=device, dtype=out.dtype).reshape(-1, 1, 1, 1)
        return out

    def one(self, image: Image.Image) -> Tensor:
        return self.normalize(torch.from_numpy(self.uint8_one(image)).unsqueeze(0))[0]

    def __call__(self, images: Sequence[Image.Image | None]) -> tuple[Tensor, Tensor]:
        pixels, present = self.to_uint8(images)
        return self.normalize(pixels, present), present
