"""The training loop: AdamW, early stopping on validation macro-F1 (ties broken by ITM
AUROC when ITM trains), then an ITM finishing phase so early stopping on the task never
leaves the ITM head untrained."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from models.classifier import MultimodalModel
from models.losses import IGNORE_INDEX
from models.objectives import ObjectiveConfig, compute_losses
from modstream.manifest import Example
from trainer.evaluate import itm_auroc, task_report
from trainer.features import LiveFeatures

log = logging.getLogger(__name__)
Selection = Literal["auto", "auroc", "loss", "task", "task>itm", "task+itm"]
# Weight of ITM AUROC in "task>itm": small enough to decide only between epochs whose
# macro-F1 ties (a few posts' decisions move F1 by more than 0.001).
ITM_TIE_BREAK = 1e-3


@dataclass
class TrainConfig:
    epochs: int = 25
    batch_size: int = 32
    lr: float = 1e-3  # the new layers (projections, fusion, heads)
    encoder_lr: float = 2e-5  # encoder layers being fine-tuned
    weight_decay: float = 0.01
    patience: int = 4
    grad_clip: float = 1.0
    modality_dropout: float = 0.1  # share of image posts shown text-only while training
    class_weighting: bool = True
    seed: int = 0
    # Early stopping on the task can stop before ITM has learned; these epochs train the
    # ITM head alone (everything else frozen) after the best checkpoint is restored.
    itm_finish_epochs: int = 3
    # Checkpoint selection (and early stopping): "task" = mean validation macro-F1 (at
    # threshold 0.5); "task>itm" = the same, ties broken by ITM AUROC; "task+itm" = ITM AUROC
    # as one more term of the mean; "loss" = class-balanced validation cross-entropy;
    # "auroc" = mean validation task AUROC. "auto" = "task>itm" when the objective trains
    # ITM, else "task". On CM-Off subsets (studies/small_data_recipe.py) "task+itm" let an ITM
    # AUROC that wanders near 0.5 carry training to epoch 25 at 600 posts, and "loss" /
    # "auroc" stopped at epoch 2-3 on some folds with a head that barely separated the
    # classes; "task" did best at 300 posts. On synthetic data the task saturates (F1 1.0
    # from epoch 2), so the tie-break is what lets training go on while ITM learns.
    select_on: Selection = "auto"
    # Decision thresholds are tuned on validation only where every class of the task has
    # at least this many validation posts; elsewhere they stay at 0.5 (trainer.fit).
    threshold_min_per_class: int = 100
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    amp: bool = True  # bf16 autocast, on CUDA only

    @property
    def selection(self) -> Selection:
        if self.select_on == "auto":
            return "task>itm" if self.objective.uses_itm else "task"
        return self.select_on

    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class EvalOutput:
    """logits: task -> [N, C]; labels: task -> [N] (IGNORE_INDEX where unknown);
    itm_match: [N] match probability of the actual pair (NaN without image);
    itm_swapped: match probability of pairs with a swapped image;
    itm_target: [N] whether each actual pair is a match (1), a known mismatch (0) or unknown
    (NaN); None: every actual pair is a match."""

    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    itm_match: np.ndarray
    itm_swapped: np.ndarray
    itm_target: np.ndarray | None = None

    def itm_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores of true pairs, scores of non-pairs): the actual pairs known to match, and
        the swapped pairs plus the actual pairs known not to (an unknown pair is neither)."""
        if self.itm_target is None:
            return self.itm_match, self.itm_swapped
        target = self.itm_target
        return self.itm_match[target == 1], np.concatenate([self.itm_swapped, self.itm_match[target == 0]])

    def macro_f1(self, task: str, labels: Sequence[str]) -> float:
        y = self.labels[task]
        keep = y != IGNORE_INDEX
        return task_report(y[keep], self.logits[task][keep].argmax(1), labels).macro_f1

    def itm_auroc(self) -> float:
        return itm_auroc(*self.itm_pairs())


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    val: EvalOutput
    seconds: float


def label_tensors(examples: Sequence[Example], tasks: Mapping[str, Sequence[str]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for task, labels in tasks.items():
        index = {label: i for i, label in enumerate(labels)}
        values = []
        for ex in examples:
            value = ex.labels.get(task)
            if value is not None and value not in index:
                raise ValueError(f"example {ex.id!r}: label {value!r} is not one of {list(labels)} for task {task!r}")
            values.append(IGNORE_INDEX if value is None else index[value])
        out[task] = torch.tensor(values, dtype=torch.long)
    return out


def class_weights(labels: Mapping[str, Tensor], tasks: Mapping[str, Sequence[str]]) -> dict[str, Tensor]:
    """Inverse class frequency, normalised to mean 1 (a missing class gets weight 1)."""
    out = {}
    for task, y in labels.items():
        counts = torch.bincount(y[y != IGNORE_INDEX], minlength=len(tasks[task])).float()
        weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), 1.0)
        out[task] = weights / weights.mean()
    return out


def _batches(n: int, size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, size):
        yield order[start : start + size].tolist()


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_split(
    model: MultimodalModel,
    features: LiveFeatures,
    labels: Mapping[str, Tensor],
    batch_size: int = 64,
    amp: bool = True,
    with_swapped: bool = True,
) -> EvalOutput:
    """Task logits and ITM scores on a split. Swapped pairs for ITM AUROC use a fixed
    derangement of the posts that have an image, so every evaluation sees the same pairs
    (`with_swapped=False` skips them when no one reads ITM AUROC)."""
    model.eval()
    device = features.device
    logits: dict[str, list[Tensor]] = defaultdict(list)
    match: list[Tensor] = []
    n = len(features)
    with _autocast(device, amp):
        for idx in _batches(n, batch_size, None):
            text, image, present = features.batch(idx)
            out = model.served_head(text, image, present)
            for task, value in out.task_logits.items():
                logits[task].append(value.float().cpu())
            prob = torch.sigmoid(out.itm_logits.float()).cpu()
            match.append(torch.where(present.cpu(), prob, torch.nan))
        with_image = features.present.nonzero().squeeze(1).tolist()
        swapped: list[Tensor] = []
        if with_swapped and len(with_image) >= 2:
            g = torch.Generator().manual_seed(1234)
            shift = torch.randint(1, len(with_image), (len(with_image),), generator=g)
            partner = [with_image[(k + int(s)) % len(with_image)] for k, s in enumerate(shift)]
            for start in range(0, len(with_image), batch_size):
                t_idx, i_idx = (
                    with_image[start : start + batch_size],
                    partner[start : start + batch_size],
                )
                ones = torch.ones(len(t_idx), dtype=torch.bool, device=device)
                pair = model.head(features.text(t_idx), features.image(i_idx), ones)
                swapped.append(torch.sigmoid(pair.itm_logits.float()).cpu())
    return EvalOutput(
        logits={task: torch.cat(v).numpy() for task, v in logits.items()},
        labels={task: y.numpy() for task, y in labels.items()},
        itm_match=torch.cat(match).numpy() if match else np.zeros(0),
        itm_swapped=torch.cat(swapped).numpy() if swapped else np.zeros(0),
        itm_target=features.targets.numpy(),
    )


def balanced_loss(val: EvalOutput, tasks: Iterable[str]) -> float:
    """Mean over tasks of the class-balanced cross-entropy (each class's mean NLL, averaged):
    like macro-F1 it weighs classes equally, unlike it it moves smoothly between epochs."""
    from scipy.special import log_softmax

    per_task = []
    for task in tasks:
        y = val.labels[task]
        keep = y != IGNORE_INDEX
        if not keep.any():
            continue
        nll = -np.take_along_axis(log_softmax(val.logits[task][keep], axis=1), y[keep][:, None], axis=1)[:, 0]
        per_task.append(np.mean([nll[y[keep] == c].mean() for c in np.unique(y[keep])]))
    return float(np.mean(per_task)) if per_task else 0.0


def mean_task_auroc(val: EvalOutput, tasks: Mapping[str, Sequence[str]]) -> float:
    """Mean over tasks of the one-vs-rest macro AUROC of the validation logits: how well each
    head ranks posts, whatever the threshold (set later by calibration) and confidence."""
    from scipy.special import softmax
    from sklearn.metrics import roc_auc_score

    per_task = []
    for task in tasks:
        y = val.labels[task]
        keep = y != IGNORE_INDEX
        if len(np.unique(y[keep])) < 2:
            continue
        probs = softmax(val.logits[task][keep], axis=1)
        score = probs[:, 1] if probs.shape[1] == 2 else probs
        per_task.append(float(roc_auc_score(y[keep], score, multi_class="ovr", labels=list(range(probs.shape[1])))))
    return float(np.mean(per_task)) if per_task else 0.0


def selection_score(val: EvalOutput, tasks: Mapping[str, Sequence[str]], select_on: Selection) -> float:
    """Higher is better."""
    if select_on == "loss":
        return -balanced_loss(val, tasks)
    if select_on == "auroc":
        return mean_task_auroc(val, tasks)
    scores = [val.macro_f1(task, labels) for task, labels in tasks.items() if (val.labels[task] != IGNORE_INDEX).any()]
    task = float(np.mean(scores)) if scores else 0.0
    if select_on in ("task+itm", "task>itm"):
        auroc = val.itm_auroc()
        auroc = 0.5 if math.isnan(auroc) else auroc
        return float(np.mean([*scores, auroc])) if select_on == "task+itm" else task + ITM_TIE_BREAK * auroc
    return task


def _optimizer(model: MultimodalModel, cfg: TrainConfig, params_filter: str | None = None) -> torch.optim.Optimizer:
    head = [
        p
        for n, p in model.head.named_parameters()
        if p.requires_grad and (params_filter is None or n.startswith(params_filter))
    ]
    groups: list[dict[str, Any]] = [{"params": head, "lr": cfg.lr}]
    if params_filter is None:
        encoders = [
            p for module in (model.text_encoder, model.image_encoder) for p in module.parameters() if p.requires_grad
        ]
        if encoders:
            groups.append({"params": encoders, "lr": cfg.encoder_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _modality_dropout(present: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    if rate <= 0:
        return present
    drop = torch.rand(present.shape, generator=generator) < rate
    return present & ~drop.to(present.device)


def _run_epoch(
    model: MultimodalModel,
    features: LiveFeatures,
    labels: Mapping[str, Tensor],
    objective: ObjectiveConfig,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    weights: Mapping[str, Tensor] | None,
    generator: torch.Generator,
    modality_dropout: float,
) -> dict[str, float]:
    model.train()
    device = features.device
    sums: dict[str, float] = defaultdict(float)
    batches = 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx in _batches(len(features), cfg.batch_size, generator):
        if len(idx) < 2:  # in-batch contrastive losses need pairs
            continue
        text, image, present = features.batch(idx)
        present = _modality_dropout(present, modality_dropout, generator)
        batch_labels = {task: y[idx].to(device) for task, y in labels.items()}
        with _autocast(device, cfg.amp):
            total, losses, _ = compute_losses(
                model.head,
                text,
                image,
                present,
                batch_labels,
                objective,
                weights,
                generator,
                features.same_content(idx),
                features.pair_target(idx),
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        sums["total_loss"] += total.item()
        for name, value in losses.items():
            sums[name] += value.item()
        batches += 1
    return {name: value / max(batches, 1) for name, value in sums.items()}


def train(
    model: MultimodalModel,
    train_features: LiveFeatures,
    train_labels: Mapping[str, Tensor],
    val_features: LiveFeatures,
    val_labels: Mapping[str, Tensor],
    cfg: TrainConfig,
) -> TrainResult:
    """Trains `model` in place and leaves it at the best validation checkpoint."""
    from tqdm import tqdm

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    tasks = model.config.tasks
    weights = class_weights(train_labels, tasks) if cfg.class_weighting else None
    optimizer = _optimizer(model, cfg)
    history: list[dict[str, float]] = []
    best_score, best_epoch, best_state = -math.inf, 0, copy.deepcopy(model.state_dict())
    # Per-epoch ITM AUROC costs a second pass; only worth it when ITM trains or selects.
    track_itm = cfg.objective.uses_itm or cfg.selection in ("task+itm", "task>itm")
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", disable=not cfg.progress)
    for epoch in bar:
        row = _run_epoch(
            model,
            train_features,
            train_labels,
            cfg.objective,
            optimizer,
            cfg,
            weights,
            generator,
            cfg.modality_dropout,
        )
        val = evaluate_split(model, val_features, val_labels, amp=cfg.amp, with_swapped=track_itm)
        score = selection_score(val, tasks, cfg.selection)
        row.update({"epoch": epoch, "val_score": score, "val_itm_auroc": val.itm_auroc()})
        row["val_task_loss"] = balanced_loss(val, tasks)
        row["val_task_auroc"] = mean_task_auroc(val, tasks)
        row.update({f"val_{t}_macro_f1": val.macro_f1(t, labels) for t, labels in tasks.items()})
        history.append(row)
        bar.set_postfix(loss=f"{row.get('total_loss', 0):.3f}", val=f"{score:.3f}")
        if score > best_score:
            best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    if cfg.objective.uses_itm and cfg.itm_finish_epochs > 0:
        history.extend(finish_itm(model, train_features, train_labels, val_features, val_labels, cfg, generator))
    val = evaluate_split(model, val_features, val_labels, amp=cfg.amp)
    return TrainResult(best_epoch, best_score, history, val, time.perf_counter() - started)


def finish_itm(
    model: MultimodalModel,
    train_features: LiveFeatures,
    train_labels: Mapping[str, Tensor],
    val_features: LiveFeatures,
    val_labels: Mapping[str, Tensor],
    cfg: TrainConfig,
    generator: torch.Generator,
) -> list[dict[str, float]]:
    """Train only the ITM head on the (now fixed) fused representation; task outputs are
    untouched, so task metrics of the selected checkpoint stay as they were."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    model.head.itm_head.requires_grad_(True)
    objective = ObjectiveConfig(weights={"itm_loss": 1.0}, negatives=cfg.objective.negatives)
    optimizer = _optimizer(model, cfg, params_filter="itm_head.")
    rows: list[dict[str, float]] = []
    try:
        for k in range(1, cfg.itm_finish_epochs + 1):
            row = _run_epoch(model, train_features, train_labels, objective, optimizer, cfg, None, generator, 0.0)
            val = evaluate_split(model, val_features, val_labels, amp=cfg.amp)
            row.update({"itm_finish_epoch": k, "val_itm_auroc": val.itm_auroc()})
            rows.append(row)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return rows
