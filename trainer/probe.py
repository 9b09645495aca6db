"""The linear probe blended with the fusion head.

On small data the fusion head loses to a class-balanced logistic regression on the frozen,
standardised pooled features: on CM-Off subsets of 300 / 600 training posts (5 folds, test
macro-F1 paired against that probe fitted on the whole subset) the head alone lost 19 of 20
cells, by -0.021 / -0.025 (hate / sarcasm) at 300 posts and -0.016 / -0.011 at 600. The
earlier fix served the probe instead of the head where it validated better, but choosing on
a ~45-post validation split (the one that also chose the head's checkpoint) is noisy and
favours the head: still -0.014 / -0.026 at 300. Serving the mean of the two probabilities
(the head's at its validation temperature), with the probe refitted on training +
validation, was level with the bar: +0.001 / +0.001 at 300, +0.005 / -0.002 at 600, and
needs no choice (notes in BENCHMARKS.md, studies/small_data_recipe.py).

The probe is fitted by sklearn and folded into an `nn.Linear` over the raw features
(`MultimodalHead.probes`), so it is stored in the safetensors like every other weight;
`MultimodalHead.blend` mixes it with the head. Pure functions, no I/O.
"""

from __future__ import annotations

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
class BlendEvidence:
    """Validation macro-F1 (argmax of the uncalibrated logits) of the fusion head, of the
    probe fitted on the training split (None: no probe could be fitted) and of their blend
    (None without a probe)."""

    head_macro_f1: float
    probe_macro_f1: float | None
    blend_macro_f1: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"head": self.head_macro_f1, "probe": self.probe_macro_f1, "blend": self.blend_macro_f1}


def macro_f1(logits: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> float:
    """Macro-F1 of the argmax decision on the labelled rows (NaN when none is labelled)."""
    return task_report(y, np.asarray(logits).argmax(1), labels).macro_f1
