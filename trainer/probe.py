"""The linear-probe fallback: where a logistic probe on the frozen pooled features validates
better than the fusion head, the model serves the probe for that task.

On CM-Off subsets of 300 / 600 training posts the default head lost 0.02-0.04 macro-F1 to a
class-balanced logistic regression on the standardised pooled features (bench/small_data_recipe.py,
notes D-bench). The probe is fitted by sklearn and folded into an `nn.Linear` over the raw
features (`MultimodalHead.probes`), so it is stored in the safetensors like every other weight.

Both are compared on the validation split by the decision `train` selects checkpoints with:
argmax of the uncalibrated logits (threshold 0.5 for binary tasks), before calibration.
Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from models.losses import IGNORE_INDEX
from trainer.evaluate import task_report

# trainer.ablation.linear_probe's bar: strong regularisation, classes weighted equally.
PROBE_C = 0.01
PROBE_MAX_ITER = 2000
# The probe must win by more than this (ties and noise keep the head, which also trains ITC/ITM).
PROBE_MARGIN = 0.005


@dataclass
class LinearProbe:
    """logits = x @ weight.T + bias over the raw (unstandardised) features; weight [C, D]."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weight.T + self.bias

    def to_linear(self) -> nn.Linear:
        n_out, n_in = self.weight.shape
        layer = nn.Linear(n_in, n_out)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(self.weight, dtype=torch.float32))
            layer.bias.copy_(torch.as_tensor(self.bias, dtype=torch.float32))
        return layer


def make_classifier() -> object:
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, class_weight="balanced")
    )


def fold_standardisation(scaler: StandardScaler, clf: LogisticRegression) -> LinearProbe:
    """The scaler folded into the classifier: coef · (x - mean) / scale + b = (coef / scale) · x
    + (b - coef · mean / scale). Binary sklearn gives one score z with P(class 1) = sigmoid(z):
    logits [0, z] have that softmax; multi-class gives one (softmax) row per class."""
    mean = np.zeros(clf.coef_.shape[1]) if scaler.mean_ is None else np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.ones_like(mean) if scaler.scale_ is None else np.asarray(scaler.scale_, dtype=np.float64)
    weight = np.asarray(clf.coef_, dtype=np.float64) / scale
    bias = np.asarray(clf.intercept_, dtype=np.float64) - weight @ mean
    if weight.shape[0] == 1:
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([[0.0], bias])
    return LinearProbe(weight, bias)


def fit_probe(x: np.ndarray, y: np.ndarray, n_labels: int) -> LinearProbe | None:
    """The probe for one task on the labelled rows of (x, y); None when the rows do not have
    every class of the task (a probe could then never answer the missing one)."""
    keep = y != IGNORE_INDEX
    classes = np.unique(y[keep])
    if len(classes) != n_labels or not np.array_equal(classes, np.arange(n_labels)):
        return None
    pipeline = make_classifier()
    pipeline.fit(x[keep], y[keep])  # type: ignore[attr-defined]
    scaler, clf = pipeline[0], pipeline[1]  # type: ignore[index]
    return fold_standardisation(scaler, clf)


def fit_probes(
    x: np.ndarray, labels: Mapping[str, np.ndarray], tasks: Mapping[str, Sequence[str]]
) -> dict[str, LinearProbe]:
    """One probe per task that the training rows can fit (see `fit_probe`)."""
    out = {}
    for task, names in tasks.items():
        probe = fit_probe(x, labels[task], len(names))
        if probe is not None:
            out[task] = probe
    return out


@dataclass
class ProbeChoice:
    """Validation macro-F1 of the fusion head and of the probe (None: no probe was fitted),
    and whether the probe serves."""

    head_macro_f1: float
    probe_macro_f1: float | None
    serve_probe: bool

    @property
    def source(self) -> str:
        return "probe" if self.serve_probe else "head"


def macro_f1(logits: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> float:
    """Macro-F1 of the argmax decision on the labelled rows (NaN when none is labelled)."""
    return task_report(y, np.asarray(logits).argmax(1), labels).macro_f1


def choose(
    head_logits: Mapping[str, np.ndarray],
    probe_logits: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    tasks: Mapping[str, Sequence[str]],
    margin: float = PROBE_MARGIN,
) -> dict[str, ProbeChoice]:
    """Per task: serve the probe when its validation macro-F1 beats the head's by more than
    `margin`; a task without a probe, or without validation labels, keeps the head."""
    out = {}
    for task, names in tasks.items():
        head = macro_f1(head_logits[task], labels[task], names)
        if task not in probe_logits:
            out[task] = ProbeChoice(head, None, False)
            continue
        probe = macro_f1(probe_logits[task], labels[task], names)
        better = not (math.isnan(probe) or math.isnan(head)) and probe > head + margin
        out[task] = ProbeChoice(head, probe, better)
    return out
