"""Train a model on a manifest, calibrate it on validation, and register it.

By default every task is served by the blend of the fusion head and a linear probe on the
frozen pooled features (trainer.probe): on small data the head alone loses to the probe.
Everything the card reports and calibrates is measured on the validation split with the
probe fitted on the training split only; the probe that serves is then refitted on
training + validation (at 300 posts that alone was worth +0.006 / +0.014 macro-F1 to the probe).
"""

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
from models.routing.gate import GateFloors, decide_itm_routing
from modstream.manifest import Example
from trainer.calibration import Calibration, calibrate, score
from trainer.curves import write_curves
from trainer.features import FeatureStore, LiveFeatures, LoadedInputs, build_features, load_inputs, subset
from trainer.neighbour_fit import build_index, pooled_features
from trainer.probe import BlendEvidence, LinearProbe, fit_probes, macro_f1
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
        head_temperatures={t: v for t, v in model.config.head_temperatures.items() if t in tasks},
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
    macro-F1 on average (studies/small_data_recipe.py). Returns those tasks."""
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


def set_probes(
    model: MultimodalModel, probes: Mapping[str, LinearProbe], head_temperatures: Mapping[str, float]
) -> None:
    """Serve the blend of the fusion head (at `head_temperatures[task]`) and `probes[task]` for
    the tasks in `probes` (config.probe_mode "blend"), the fusion head alone for every other."""
    device = next(model.head.parameters()).device
    probe_tasks = [t for t in model.config.tasks if t in probes]
    config = replace(
        model.config,
        probe_tasks=probe_tasks,
        probe_mode="blend",
        head_temperatures={t: float(head_temperatures[t]) for t in probe_tasks},
    )
    model.head.probes = nn.ModuleDict({t: probes[t].to_linear().to(device) for t in probe_tasks})
    model.config = model.head.config = config


def install_probes(
    model: MultimodalModel,
    x_train: np.ndarray,
    train_labels: Mapping[str, Tensor],
    head_val: EvalOutput,
) -> dict[str, LinearProbe]:
    """Fit a probe per task on the training split and install its blend with the trained head,
    whose temperature is fitted on the head's own validation logits (trainer.calibration), so
    neither side's confidence dominates the mean. Returns the probes (tasks the training rows
    cannot fit a probe for keep the head alone)."""
    tasks = model.config.tasks
    probes = fit_probes(x_train, {t: y.numpy() for t, y in train_labels.items()}, tasks)
    head_temperatures = calibrate(head_val, tasks).temperatures
    set_probes(model, probes, head_temperatures)
    if probes:
        log.info(
            "serving the blend of the fusion head and a linear probe for %s (head temperatures %s)",
            model.config.probe_tasks,
            {t: round(v, 3) for t, v in model.config.head_temperatures.items()},
        )
    return probes


def blend_evidence(
    tasks: Mapping[str, Sequence[str]],
    head_val: EvalOutput,
    blend_val: EvalOutput,
    probe_val: Mapping[str, np.ndarray],
) -> dict[str, BlendEvidence]:
    """Validation macro-F1 per task of the head, the training-split probe (logits `probe_val`)
    and the served blend, all by argmax of uncalibrated logits."""
    out = {}
    for task, names in tasks.items():
        y = head_val.labels[task]
        head = macro_f1(head_val.logits[task], y, names)
        if task not in probe_val:
            out[task] = BlendEvidence(head, None, None)
        else:
            out[task] = BlendEvidence(
                head, macro_f1(probe_val[task], y, names), macro_f1(blend_val.logits[task], y, names)
            )
    return out


def refit_probes(
    model: MultimodalModel, x: np.ndarray, labels: Mapping[str, Tensor], probes: Mapping[str, LinearProbe]
) -> None:
    """Refit the installed probes on (x, labels), i.e. training + validation, keeping the head
    temperatures; a task the rows could not refit (cannot happen: they include the training
    rows) keeps `probes[task]`."""
    config = model.config
    tasks = {t: config.tasks[t] for t in config.probe_tasks}
    refit = fit_probes(x, {t: labels[t].numpy() for t in tasks}, tasks)
    set_probes(model, {t: refit.get(t, probes[t]) for t in tasks}, config.head_temperatures)


def probe_metrics(
    evidence: Mapping[str, BlendEvidence], enabled: bool, config: ModelConfig, n_refit: int
) -> dict[str, Any]:
    """The card's account of the head + probe blend: its validation evidence per task (the
    probe fitted on the training split, as when the card's other metrics were computed) and
    what the served probe was refitted on."""
    return {
        "enabled": enabled,
        "blend": "mean of softmax(head logits / head temperature) and softmax(probe logits)",
        "head_temperatures": dict(config.head_temperatures),
        "decision": "argmax of the uncalibrated logits on the validation split, probe fitted on the training split",
        "validation_macro_f1": {t: e.to_dict() for t, e in evidence.items()},
        "refit_on": "training + validation" if config.probe_tasks else None,
        "n_refit": n_refit if config.probe_tasks else 0,
    }


@dataclass
class FitResult:
    model: MultimodalModel
    tokenizer: Any
    card: ModelCard
    result: TrainResult
    calibration: Calibration
    # What the card was measured on: the served model's validation outputs before the probes
    # were refitted on validation, and the validation posts' neighbour shares (an index of the
    # training split). Benchmarks score review policies on them (studies/routing_eval.py).
    validation: EvalOutput | None = None
    validation_shares: dict[str, dict[str, np.ndarray]] | None = None


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
    probe_blend: bool = True,
) -> FitResult:
    """Train on `examples` (a 15% stratified validation split chooses the checkpoint and
    calibrates), and return the model with its card. Tasks the examples never label are left
    out of the model (see `trainable_tasks`). `probe_blend`: serve every task by the blend of
    the head and a linear probe (see `fit_features`); False serves the heads alone."""
    dev = pick_device(device)
    inputs = load_inputs(examples, on_bad_image)
    if len(inputs.examples) < 4:
        raise ValueError(f"need at least 4 usable examples to train, got {len(inputs.examples)}")
    tasks = trainable_tasks(inputs.examples, model_config.tasks)
    model_config = replace(
        model_config,
        tasks=tasks,
        probe_tasks=[t for t in model_config.probe_tasks if t in tasks],
        head_temperatures={t: v for t, v in model_config.head_temperatures.items() if t in tasks},
    )
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
        probe_blend=probe_blend,
    )


def validation_by_source(
    model: MultimodalModel,
    inputs: LoadedInputs,
    features: LiveFeatures,
    val_idx: Sequence[int],
    labels: dict[str, Tensor],
    tasks: dict[str, list[str]],
    cal: Calibration,
) -> dict[str, Any]:
    """Validation metrics of the base examples and of the reviewed ones (those carrying a
    decision id) apart, when both are there: reviewed posts are the model's hardest, so a
    card whose F1 mixes them in cannot be compared with one that did not (issue 24)."""
    groups: dict[str, list[int]] = {"base": [], "reviewed": []}
    for i in val_idx:
        groups["reviewed" if "decision_id" in inputs.examples[i].meta else "base"].append(int(i))
    if not groups["base"] or not groups["reviewed"]:
        return {}
    out: dict[str, Any] = {}
    for name, idx in groups.items():
        part = evaluate_split(model, subset(features, idx), {t: y[idx] for t, y in labels.items()})
        scored = score(part, tasks, cal)
        out[name] = {
            "n": len(idx),
            "macro_f1": scored["macro_f1"],
            "itm_auroc": scored["itm_auroc"],
            "itm_auroc_ci": scored["itm_auroc_ci"],
        }
    return out


def fit_features(
    model: MultimodalModel,
    tokenizer: Any,
    inputs: LoadedInputs,
    features: LiveFeatures,
    train_config: TrainConfig,
    *,
    val_fraction: float = 0.15,
    out_dir: Path | None = None,
    probe_blend: bool = True,
) -> FitResult:
    """fit() on inputs whose features are already built (benchmarks reuse one encoding);
    trains every task of `model.config`. With `probe_blend`, each task that the training split
    can fit a linear probe for (trainer.probe) is served by the mean of the head's and the
    probe's probabilities. The order keeps validation honest: the probe is fitted on the
    training split, the blend is evaluated on validation, and temperatures, thresholds, the
    card's metrics and its routing policy are all fitted to that output; only then is the probe
    refitted on training + validation for serving (same head temperatures). A model that
    already serves probes (retraining) trains its heads for every task, and its probes are
    fitted afresh."""
    set_probes(model, {}, {})
    model.neighbours = None  # training sees the head alone; the index is rebuilt below
    tasks = model.config.tasks
    train_idx, val_idx = stratified_split(
        len(inputs.examples), strata(inputs.examples, tasks), val_fraction, train_config.seed
    )
    labels = label_tensors(inputs.examples, tasks)
    train_labels = {t: y[train_idx] for t, y in labels.items()}
    val_labels = {t: y[val_idx] for t, y in labels.items()}
    val_features = subset(features, val_idx)
    result = train(model, subset(features, train_idx), train_labels, val_features, val_labels, train_config)
    evidence: dict[str, BlendEvidence] = {}
    probes: dict[str, LinearProbe] = {}
    served_val = result.val
    # Pooled features of every post (the training and validation splits together are all of
    # them): what the probes and the neighbour index read.
    x, present = pooled_features(features, range(len(inputs.examples)))
    if probe_blend:
        probes = install_probes(model, x[train_idx], train_labels, result.val)
        if probes:
            served_val = evaluate_split(model, val_features, val_labels, amp=train_config.amp)
        probe_val = {t: p.logits(x[val_idx]) for t, p in probes.items()}
        evidence = blend_evidence(tasks, result.val, served_val, probe_val)
    # Review routing's labelled neighbours (and their vote, config.neighbour_vote) come from the
    # training split only: validation posts are scored against an index that never saw them,
    # as live posts will be.
    model.neighbours = build_index(model, x[train_idx], present[train_idx], train_labels)
    if model.config.neighbour_vote > 0:
        served_val = evaluate_split(model, val_features, val_labels, amp=train_config.amp)
    model_config = model.config
    cal = calibrate(served_val, tasks)
    untuned = keep_default_thresholds(cal, val_labels, train_config.threshold_min_per_class)
    val_eval = evaluate_split(model, val_features, val_labels)
    metrics = score(val_eval, tasks, cal)
    metrics["split"] = "validation (thresholds and temperatures were chosen on it)"
    metrics["thresholds_tuned"] = {t: t not in untuned for t in cal.thresholds}
    metrics["best_epoch"] = result.best_epoch
    metrics["probe_blend"] = probe_metrics(evidence, probe_blend, model_config, len(inputs.examples))
    metrics["task_source"] = {t: "blend" if t in model_config.probe_tasks else "head" for t in tasks}
    by_source = validation_by_source(model, inputs, features, val_idx, labels, tasks, cal)
    if by_source:
        metrics["by_source"] = by_source
    val_neighbours = model.neighbours.label_shares(x[val_idx], present[val_idx])
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
        routing=routing_block(val_eval, cal, list(tasks), neighbours=val_neighbours),
    )
    if probes:
        # Last, after everything above was measured with the training-split probe.
        refit_probes(model, x, labels, probes)
    if out_dir is not None:
        write_curves(result.history, out_dir)
    return FitResult(model, tokenizer, card, result, cal, val_eval, val_neighbours)
