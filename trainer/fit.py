"""Train a model on a manifest, calibrate it on validation, and register it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from models.card import ModelCard
from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.devices import pick_device  # re-exported: trainer modules import it from here
from models.registry import build_model
from models.routing_gate import GateFloors, decide_itm_routing
from trainer.calibration import Calibration, calibrate, score
from trainer.curves import write_curves
from trainer.features import FeatureStore, LoadedInputs, build_features, load_inputs, subset
from trainer.manifest import Example
from trainer.train import TrainConfig, TrainResult, evaluate_split, label_tensors, train

log = logging.getLogger(__name__)


def data_digest(inputs: LoadedInputs) -> str:
    """Identifies the training data: ids, texts, image content and labels."""
    h = hashlib.sha256()
    for ex, image_hash in zip(inputs.examples, inputs.image_hashes, strict=True):
        h.update(json.dumps([ex.id, ex.text, image_hash, ex.labels], sort_keys=True).encode())
    return h.hexdigest()


def strata(examples: Sequence[Example], tasks: dict[str, list[str]]) -> list[str]:
    """Stratify on the joint label of every task (and image presence)."""
    return ["|".join([str(ex.labels.get(t)) for t in tasks] + [str(ex.image is not None)]) for ex in examples]


def merge_rare(keys: Sequence[str], min_count: int) -> list[str]:
    """Strata too small to stratify on (e.g. the few posts missing a task's label) are
    folded into the largest stratum, which sklearn would otherwise refuse or warn about."""
    counts = Counter(keys)
    largest = counts.most_common(1)[0][0]
    return [k if counts[k] >= min_count else largest for k in keys]


def stratified_split(n: int, keys: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    train_idx, val_idx = train_test_split(
        np.arange(n), test_size=fraction, random_state=seed, stratify=merge_rare(keys, 2)
    )
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def itm_block(trained: bool, threshold: float | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's ITM section: the review threshold, its validation evidence, and whether
    that evidence lets ITM route posts (with the reason, for operators reading the card)."""
    itm: dict[str, Any] = {
        "trained": trained,
        "threshold": threshold,
        "auroc": metrics["itm_auroc"],
        "auroc_ci": metrics["itm_auroc_ci"],
        "routing_lift": metrics["routing_lift"],
        "routing_evidence": metrics["routing_evidence"],
    }
    enabled, why = decide_itm_routing(itm)
    itm["routing"] = {"enabled": enabled, "why": why, "floors": asdict(GateFloors())}
    return itm


@dataclass
class FitResult:
    model: MultimodalModel
    tokenizer: Any
    card: ModelCard
    result: TrainResult
    calibration: Calibration


def fit(
    examples: Sequence[Example],
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    val_fraction: float = 0.15,
    cache_dir: Path | None = None,
    out_dir: Path | None = None,
    device: str = "auto",
    on_bad_image: str = "text-only",
    model_and_tokenizer: tuple[MultimodalModel, Any] | None = None,
) -> FitResult:
    dev = pick_device(device)
    model, tokenizer = model_and_tokenizer or build_model(model_config)
    model.to(dev)
    inputs = load_inputs(examples, on_bad_image)
    if len(inputs.examples) < 4:
        raise ValueError(f"need at least 4 usable examples to train, got {len(inputs.examples)}")
    features = build_features(model, tokenizer, inputs, FeatureStore(cache_dir), dev, train_config.progress)
    tasks = model_config.tasks
    train_idx, val_idx = stratified_split(
        len(inputs.examples), strata(inputs.examples, tasks), val_fraction, train_config.seed
    )
    labels = label_tensors(inputs.examples, tasks)
    train_labels = {t: y[train_idx] for t, y in labels.items()}
    val_labels = {t: y[val_idx] for t, y in labels.items()}
    val_features = subset(features, val_idx)
    result = train(model, subset(features, train_idx), train_labels, val_features, val_labels, train_config)
    cal = calibrate(result.val, tasks)
    val_eval = evaluate_split(model, val_features, val_labels)
    metrics = score(val_eval, tasks, cal)
    metrics["split"] = "validation (thresholds and temperatures were chosen on it)"
    metrics["best_epoch"] = result.best_epoch
    card = ModelCard(
        config=model_config,
        thresholds=cal.thresholds,
        temperatures=cal.temperatures,
        itm=itm_block(train_config.objective.uses_itm, cal.itm_threshold, metrics),
        training={
            "data_digest": data_digest(inputs),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "image_errors": dict(inputs.image_errors),
            "config": train_config.to_dict(),
            "seconds": round(result.seconds, 1),
        },
        metrics=metrics,
    )
    if out_dir is not None:
        write_curves(result.history, out_dir)
    return FitResult(model, tokenizer, card, result, cal)
