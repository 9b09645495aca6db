"""The ablation grid: its variants and their names, its configuration, its folds, and its
resume (grid.json says what the runs in runs.jsonl depend on; a resume with anything else is
refused, naming what differs)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.losses import NegativeSampling
from models.objectives import ObjectiveConfig
from modstream.manifest import Example
from trainer.features import (
    LoadedInputs,
    encoder_key,
)
from trainer.fit import data_digest, merge_rare, strata
from trainer.train import TrainConfig

log = logging.getLogger(__name__)


BASELINE = "task"


class AblationSetupError(ValueError):
    """A grid that cannot run as asked (a weight a variant needs is 0, an unknown variant
    name, a folder made for another grid); the message says what to change."""


@dataclass(frozen=True)
class LossWeights:
    task: float = 0.8
    itc: float = 0.1
    itm: float = 0.1


@dataclass(frozen=True)
class Variant:
    name: str
    itc: bool
    itm: bool
    negatives: NegativeSampling = "hard"
    # 0: frozen (cached); N: the top N text layers / last N image blocks; -1: all of it.
    text_trainable_layers: int = 0
    image_trainable_blocks: int = 0
    aux_weight: float | None = None  # the loss-weight sweep: this weight for ITC and ITM alike

    def loss_weights(self, weights: LossWeights) -> dict[str, float]:
        out = {"task_loss": weights.task}
        if self.itc:
            out["itc_loss"] = weights.itc if self.aux_weight is None else self.aux_weight
        if self.itm:
            out["itm_loss"] = weights.itm if self.aux_weight is None else self.aux_weight
        return out

    def objective(self, weights: LossWeights) -> ObjectiveConfig:
        return ObjectiveConfig(weights=self.loss_weights(weights), negatives=self.negatives)


# +ITM alone mines no hard negatives: without ITC its embedding space is untrained, so
# "hard" would be random anyway; it is labelled honestly as random.
CORE_VARIANTS = (
    Variant("task", itc=False, itm=False),
    Variant("task+itc", itc=True, itm=False),
    Variant("task+itm", itc=False, itm=True, negatives="random"),
    Variant("task+itc+itm", itc=True, itm=True, negatives="hard"),
    Variant("task+itc+itm (random neg)", itc=True, itm=True, negatives="random"),
)

WHOLE_TEXT = " (text encoder fine-tuned)"

# Suffixes naming which encoder parts train; a variant is paired with task-only on the same encoders.
_ENCODER_SUFFIX = re.compile(
    r" \((text top \d+ unfrozen|text encoder fine-tuned|image last \d+ blocks fine-tuned|image encoder fine-tuned)\)$"
)

_AUX_SUFFIX = re.compile(r" \(aux [0-9.e-]+\)$")


def _text_suffix(layers: int) -> str:
    return WHOLE_TEXT if layers < 0 else f" (text top {layers} unfrozen)"


def _image_suffix(blocks: int) -> str:
    return " (image encoder fine-tuned)" if blocks < 0 else f" (image last {blocks} blocks fine-tuned)"


def aux_name(weight: float) -> str:
    return f"task+itc+itm (aux {weight:g})"


def reference_of(name: str) -> str | None:
    """The run each variant is paired with: task-only with the same encoders, and for that
    task-only variant, the frozen one (so the table also shows what unfreezing alone does).
    The loss-weight sweep's variants are paired with frozen task-only."""
    if name == BASELINE:
        return None
    if _AUX_SUFFIX.search(name):
        return BASELINE
    match = _ENCODER_SUFFIX.search(name)
    suffix = match.group(0) if match else ""
    return BASELINE if name == BASELINE + suffix else BASELINE + suffix


def variants(
    unfreeze_text_layers: int = 0, unfreeze_image_blocks: int = 0, aux_weights: Sequence[float] = ()
) -> list[Variant]:
    """Every variant the grid can run: the core five with frozen encoders; with
    `unfreeze_text_layers` N, task-only and task+ITC+ITM with the text encoder's top N layers
    (-1: all of it) fine-tuned; likewise the image encoder's last N blocks; and one
    task+ITC+ITM per auxiliary weight of the loss-weight sweep (frozen encoders)."""
    out = list(CORE_VARIANTS)
    text = unfreeze_text_layers
    if text:
        suffix = _text_suffix(text)
        out += [
            Variant(BASELINE + suffix, itc=False, itm=False, text_trainable_layers=text),
            Variant("task+itc+itm" + suffix, itc=True, itm=True, text_trainable_layers=text),
        ]
        if text > 0:
            name = "task+itc+itm (random neg)" + suffix
            out.append(Variant(name, itc=True, itm=True, negatives="random", text_trainable_layers=text))
    if unfreeze_image_blocks:
        suffix = _image_suffix(unfreeze_image_blocks)
        out += [
            Variant(BASELINE + suffix, itc=False, itm=False, image_trainable_blocks=unfreeze_image_blocks),
            Variant("task+itc+itm" + suffix, itc=True, itm=True, image_trainable_blocks=unfreeze_image_blocks),
        ]
    out += [Variant(aux_name(w), itc=True, itm=True, aux_weight=w) for w in dict.fromkeys(aux_weights)]
    return out


@dataclass
class AblationConfig:
    folds: int = 5
    seeds: Sequence[int] = (0, 1, 2)
    task_weight: float = 0.8
    itc_weight: float = 0.1  # for the variants that train ITC (the sweep sets its own)
    itm_weight: float = 0.1
    val_fraction: float = 0.15
    review_fraction: float = 0.1
    unfreeze_text_layers: int = 0  # N: top N layers; -1: the whole text encoder
    unfreeze_image_blocks: int = 0  # N: the image encoder's last N blocks; -1: all of it
    aux_weights: Sequence[float] = ()  # the loss-weight sweep
    only: Sequence[str] = ()  # restrict to these variant names (their references are added)
    jobs: int = 1  # worker processes (CPU: one per core, each single-threaded)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.task_weight, self.itc_weight, self.itm_weight)


def _check_weight(name: str, value: float, positive: bool) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise AblationSetupError(f"{name} must be a finite number {need}, got {value}")


def select_variants(cfg: AblationConfig) -> list[Variant]:
    """The variants this grid runs, in table order: `only` (or all) plus the task-only
    variant each is paired with. Refuses weights a chosen variant cannot train with."""
    _check_weight("--task-weight (every variant trains the task)", cfg.task_weight, positive=True)
    _check_weight("--itc-weight", cfg.itc_weight, positive=False)
    _check_weight("--itm-weight", cfg.itm_weight, positive=False)
    for w in cfg.aux_weights:
        _check_weight("each of --aux-weights", w, positive=True)
    if cfg.unfreeze_text_layers < -1 or cfg.unfreeze_image_blocks < -1:
        raise AblationSetupError("--unfreeze-text-layers / --unfreeze-image-blocks take N >= 0 or 'all'")
    available = variants(cfg.unfreeze_text_layers, cfg.unfreeze_image_blocks, cfg.aux_weights)
    by_name = {v.name: v for v in available}
    unknown = [name for name in cfg.only if name not in by_name]
    if unknown:
        raise AblationSetupError(
            f"unknown variant(s) {unknown}; with these options the grid has: {', '.join(repr(n) for n in by_name)}"
        )
    wanted = set(cfg.only or by_name)
    for name in list(wanted):
        ref = reference_of(name)
        while ref is not None:  # a difference needs its reference run (and that one its own)
            wanted.add(ref)
            ref = reference_of(ref)
    chosen = [v for v in available if v.name in wanted]
    for v in chosen:
        if v.aux_weight is not None:
            continue
        for loss, uses, value, flag in (
            ("ITC", v.itc, cfg.itc_weight, "--itc-weight"),
            ("ITM", v.itm, cfg.itm_weight, "--itm-weight"),
        ):
            if uses and value == 0:
                raise AblationSetupError(
                    f"variant {v.name!r} trains {loss} but {flag} is 0; give {flag} > 0, "
                    "or leave that variant out with --only"
                )
    return chosen


def _fold_indices(
    examples: Sequence[Example], tasks: dict[str, list[str]], k: int
) -> list[tuple[list[int], list[int]]]:
    keys = merge_rare(strata(examples, tasks), k)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
    return [(tr.tolist(), te.tolist()) for tr, te in splitter.split(np.zeros(len(keys)), keys)]


def _run_key(variant: str, fold: int, seed: int) -> str:
    return f"{variant}|{fold}|{seed}"


GRID_FILE = "grid.json"

# Training options that do not change what a run computes (seeds and objectives are per run).
_NOT_IDENTITY = ("seed", "progress", "objective")


def grid_identity(
    model_config: ModelConfig, cfg: AblationConfig, inputs: LoadedInputs, model: MultimodalModel
) -> dict[str, Any]:
    """What a finished run in runs.jsonl depends on besides its (variant, fold, seed) key:
    the model and its encoder weights, the training options and loss weights, the folds and
    splits, and the data. Seeds and variants are not part of it: adding either to a grid
    reuses the runs already done."""
    train = {k: v for k, v in cfg.train.to_dict().items() if k not in _NOT_IDENTITY}
    identity = {
        "model": model_config.to_dict(),
        "encoders": {"text": encoder_key(model, "text"), "image": encoder_key(model, "image")},
        "train": train,
        "loss_weights": asdict(cfg.weights),
        "folds": cfg.folds,
        "val_fraction": cfg.val_fraction,
        "review_fraction": cfg.review_fraction,
        "data_digest": data_digest(inputs),
    }
    return dict(json.loads(json.dumps(identity)))  # as it reads back from grid.json


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def grid_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`train.lr: 0.001 -> 0.002` for every setting that differs."""
    old, new = _flatten(stored), _flatten(current)
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys if old.get(k) != new.get(k)]


def check_grid(out_dir: Path, identity: dict[str, Any]) -> None:
    """Records the grid's identity in out_dir/grid.json, or refuses to resume into a folder
    whose runs were made with another configuration or other data."""
    path, runs = out_dir / GRID_FILE, out_dir / "runs.jsonl"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            stored_identity = stored["identity"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AblationSetupError(
                f"{path} is unreadable, so the runs in {out_dir} cannot be checked; give a new --out"
            ) from None
        differences = grid_differences(stored_identity, identity)
        if differences:
            raise AblationSetupError(
                f"{out_dir} holds runs of another grid ({'; '.join(differences)}); resuming would mix them "
                "into this table: give a new --out (or put the options back to resume)"
            )
        return
    if runs.is_file() and runs.stat().st_size:
        raise AblationSetupError(
            f"{runs} was written without a {GRID_FILE} (an older modstream), so its configuration and data "
            "cannot be checked; give a new --out"
        )
    path.write_text(json.dumps({"digest": digest, "identity": identity}, indent=1) + "\n")


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    """Finished runs by key. A last line cut off mid-write (a killed run) is dropped with a
    warning and the file rewritten without it, so that run is done again and appends start
    on a fresh line; an unreadable line before the last is refused (the file was edited)."""
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.splitlines()
    done: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            key = _run_key(run["variant"], run["fold"], run["seed"])
            run["macro_f1"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise AblationSetupError(
                    f"{path}: line {number} is not a run record; remove that line to rerun the run, or give a new --out"
                ) from None
            log.warning("%s: dropping its unreadable last line (a run cut off mid-write); that run runs again", path)
            break
        done[key] = run
        kept.append(line)
    rewritten = "".join(line + "\n" for line in kept)
    if rewritten != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rewritten)
        tmp.replace(path)
    return done
