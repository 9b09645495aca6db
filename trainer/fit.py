"""Train a model on a manifest, calibrate it on validation, and register it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from models.card import ModelCard
from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.devices import pick_device  # re-exported: trainer modules import it from here
from models.losses import IGNORE_INDEX
from models.registry import build_model
from models.routing_gate import GateFloors, decide_itm_routing
from trainer.calibration import Calibration, calibrate, score
from trainer.curves import write_curves
from trainer.features import FeatureStore, LiveFeatures, LoadedInputs, build_features, load_inputs, subset
from trainer.manifest import Example
from trainer.probe import PROBE_MARGIN, LinearProbe, ProbeChoice, choose, fit_probes
from trainer.routing_fit import routing_block
from trainer.train import EvalOutput, TrainConfig, TrainResult, evaluate_split, label_tensors, train

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.5


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


class TaskDataError(ValueError):
    """The training data cannot train one of the model's tasks (e.g. a single class)."""


def trainable_tasks(examples: Sequence[Example], tasks: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The tasks this data can train. A task no example labels is left out of the model
    (no head, absent from the card, so the worker never emits a decision for it) and logged;
    a task whose labels are all one class is refused: that is a data or mapping error, and
    a head trained on it would answer that class for every post."""
    kept: dict[str, list[str]] = {}
    for task, labels in tasks.items():
        seen = Counter(ex.labels[task] for ex in examples if ex.labels.get(task) is not None)
        if not seen:
            log.warning(
                "task %r: no training example is labelled for it, so the model is built without it "
                "(no head, not in the card's tasks, never in a label record)",
                task,
            )
            continue
        if len(seen) < 2:
            ((value, count),) = seen.items()
            raise TaskDataError(
                f"task {task!r}: all {count} labelled training example(s) are {value!r}; a classifier needs "
                f"examples of at least two of {list(labels)}. Label some posts of another class, or remove "
                f"the task's labels so that it is left out"
            )
        kept[task] = list(labels)
    if not kept:
        raise TaskDataError(f"no training example is labelled for any of the tasks {list(tasks)}")
    return kept


def keep_tasks(model: MultimodalModel, tasks: Mapping[str, Sequence[str]]) -> MultimodalModel:
    """`model` restricted to `tasks` (heads of other tasks removed, config updated in place);
    refuses a task the model has no head for."""
    missing = [t for t in tasks if t not in model.config.tasks]
    if missing:
        raise TaskDataError(f"the model has no head for task(s) {missing}; it has {list(model.config.tasks)}")
    if list(model.config.tasks) == list(tasks):
        return model
    config = replace(
        model.config,
        tasks={t: list(model.config.tasks[t]) for t in tasks},
        probe_tasks=[t for t in model.config.probe_tasks if t in tasks],
    )
    for task in [t for t in model.head.heads if t not in tasks]:
        del model.head.heads[task]
        if task in model.head.probes:
            del model.head.probes[task]
    model.config = model.head.config = config
    return model


def keep_default_thresholds(cal: Calibration, val_labels: Mapping[str, Tensor], min_per_class: int) -> list[str]:
    """A threshold tuned on a validation split with few examples of a class is fitted to
    noise (on 45 CM-Off posts it moved to 0.29 or 0.65): such tasks keep 0.5 on the
    calibrated probability, i.e. the most likely class, which class weighting in training
    already balances. On CM-Off subsets of 300, 600 and 1,046 posts (5 folds, 2 tasks) 0.5
    scored better than the tuned threshold in 14 of 24 cells, worse in 7, by +0.010
    macro-F1 on average (bench/small_data_recipe.py). Returns those tasks."""
    kept = []
    for task in list(cal.thresholds):
        y = val_labels[task]
        counts = torch.bincount(y[y != IGNORE_INDEX], minlength=2)
        if int(counts.min()) < min_per_class:
            cal.thresholds[task] = DEFAULT_THRESHOLD
            kept.append(task)
    if kept:
        log.info(
            "decision thresholds of %s stay at %.1f: the validation split has fewer than %d posts of a class",
            kept,
            DEFAULT_THRESHOLD,
            min_per_class,
        )
    return kept


def set_probes(model: MultimodalModel, probes: Mapping[str, LinearProbe]) -> None:
    """Serve `probes` for their tasks (and the fusion head for every other task)."""
    device = next(model.head.parameters()).device
    config = replace(model.config, probe_tasks=[t for t in model.config.tasks if t in probes])
    model.head.probes = nn.ModuleDict({t: probes[t].to_linear().to(device) for t in config.probe_tasks})
    model.config = model.head.config = config


@torch.no_grad()
def probe_inputs(
    model: MultimodalModel, features: LiveFeatures, idx: Sequence[int], batch_size: int = 256
) -> np.ndarray:
    """The probes' input features (MultimodalHead.probe_inputs) of posts `idx`, as float32."""
    model.eval()
    rows = []
    for start in range(0, len(idx), batch_size):
        text, image, present = features.batch(list(idx[start : start + batch_size]))
        rows.append(model.head.probe_inputs(text, image, present).cpu().numpy())
    return np.concatenate(rows)


def install_probes(
    model: MultimodalModel,
    features: LiveFeatures,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    train_labels: Mapping[str, Tensor],
    head_val: EvalOutput,
) -> dict[str, ProbeChoice]:
    """Fit a probe per task on the training split and install it where its validation
    macro-F1 beats the trained head's by more than PROBE_MARGIN (trainer.probe)."""
    tasks = model.config.tasks
    probes = fit_probes(
        probe_inputs(model, features, train_idx), {t: y.numpy() for t, y in train_labels.items()}, tasks
    )
    x_val = probe_inputs(model, features, val_idx)
    choices = choose(head_val.logits, {t: p.logits(x_val) for t, p in probes.items()}, head_val.labels, tasks)
    set_probes(model, {t: probes[t] for t, c in choices.items() if c.serve_probe})
    if model.config.probe_tasks:
        log.info(
            "serving the linear probe for %s: it validates better than the fusion head (%s)",
            model.config.probe_tasks,
            {t: f"{c.probe_macro_f1:.3f} vs {c.head_macro_f1:.3f}" for t, c in choices.items() if c.serve_probe},
        )
    return choices


def probe_metrics(choices: Mapping[str, ProbeChoice], enabled: bool) -> dict[str, Any]:
    """The card's validation evidence for the choice between head and probe per task."""
    return {
        "enabled": enabled,
        "margin": PROBE_MARGIN,
        "decision": "argmax of the uncalibrated logits on the validation split",
        "validation_macro_f1": {t: {"head": c.head_macro_f1, "probe": c.probe_macro_f1} for t, c in choices.items()},
    }


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
    probe_fallback: bool = True,
) -> FitResult:
    """Train on `examples` (a 15% stratified validation split chooses the checkpoint and
    calibrates), and return the model with its card. Tasks the examples never label are left
    out of the model (see `trainable_tasks`). `probe_fallback`: serve a linear probe for
    the tasks where it validates better than the head (see `fit_features`)."""
    dev = pick_device(device)
    inputs = load_inputs(examples, on_bad_image)
    if len(inputs.examples) < 4:
        raise ValueError(f"need at least 4 usable examples to train, got {len(inputs.examples)}")
    tasks = trainable_tasks(inputs.examples, model_config.tasks)
    model_config = replace(model_config, tasks=tasks, probe_tasks=[t for t in model_config.probe_tasks if t in tasks])
    if model_and_tokenizer is None:
        model, tokenizer = build_model(model_config)
    else:
        model, tokenizer = keep_tasks(model_and_tokenizer[0], tasks), model_and_tokenizer[1]
    model.to(dev)
    features = build_features(model, tokenizer, inputs, FeatureStore(cache_dir), dev, train_config.progress)
    return fit_features(
        model,
        tokenizer,
        inputs,
        features,
        train_config,
        val_fraction=val_fraction,
        out_dir=out_dir,
        probe_fallback=probe_fallback,
    )


def fit_features(
    model: MultimodalModel,
    tokenizer: Any,
    inputs: LoadedInputs,
    features: LiveFeatures,
    train_config: TrainConfig,
    *,
    val_fraction: float = 0.15,
    out_dir: Path | None = None,
    probe_fallback: bool = True,
) -> FitResult:
    """fit() on inputs whose features are already built (benchmarks reuse one encoding);
    trains every task of `model.config`. With `probe_fallback`, a task whose linear probe
    (trainer.probe) validates better than the trained head is served by the probe; that is
    decided before calibration, so temperatures, thresholds and routing fit the served logits.
    A model that already serves probes (retraining) trains its heads for every task, and
    the probes are fitted and chosen afresh."""
    set_probes(model, {})
    tasks = model.config.tasks
    train_idx, val_idx = stratified_split(
        len(inputs.examples), strata(inputs.examples, tasks), val_fraction, train_config.seed
    )
    labels = label_tensors(inputs.examples, tasks)
    train_labels = {t: y[train_idx] for t, y in labels.items()}
    val_labels = {t: y[val_idx] for t, y in labels.items()}
    val_features = subset(features, val_idx)
    result = train(model, subset(features, train_idx), train_labels, val_features, val_labels, train_config)
    choices: dict[str, ProbeChoice] = {}
    served_val = result.val
    if probe_fallback:
        choices = install_probes(model, features, train_idx, val_idx, train_labels, result.val)
        if model.config.probe_tasks:
            served_val = evaluate_split(model, val_features, val_labels, amp=train_config.amp)
    model_config = model.config
    cal = calibrate(served_val, tasks)
    untuned = keep_default_thresholds(cal, val_labels, train_config.threshold_min_per_class)
    val_eval = evaluate_split(model, val_features, val_labels)
    metrics = score(val_eval, tasks, cal)
    metrics["split"] = "validation (thresholds and temperatures were chosen on it)"
    metrics["thresholds_tuned"] = {t: t not in untuned for t in cal.thresholds}
    metrics["best_epoch"] = result.best_epoch
    metrics["probe_fallback"] = probe_metrics(choices, probe_fallback)
    metrics["task_source"] = {t: "probe" if t in model_config.probe_tasks else "head" for t in tasks}
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
        routing=routing_block(val_eval, cal, list(tasks)),
    )
    if out_dir is not None:
        write_curves(result.history, out_dir)
    return FitResult(model, tokenizer, card, result, cal)
