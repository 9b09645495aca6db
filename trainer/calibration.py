"""Post-training calibration on validation data, and scoring with it.

Per task: a temperature (temperature scaling) and a decision threshold on the calibrated
positive-class probability that maximises macro-F1. For routing: the ITM match threshold
below which a post goes to review (the `review_fraction` quantile of validation match scores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.losses import IGNORE_INDEX
from trainer.evaluate import (
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    itm_auroc_interval,
    routing_lift,
    softmax,
    task_report,
)
from trainer.train import EvalOutput

DEFAULT_REVIEW_FRACTION = 0.1


@dataclass
class Calibration:
    temperatures: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    itm_threshold: float | None = None


def calibrate(
    val: EvalOutput,
    tasks: Mapping[str, Sequence[str]],
    review_fraction: float = DEFAULT_REVIEW_FRACTION,
) -> Calibration:
    cal = Calibration()
    for task, labels in tasks.items():
        y = val.labels[task]
        keep = y != IGNORE_INDEX
        logits = val.logits[task][keep]
        cal.temperatures[task] = fit_temperature(logits, y[keep])
        if len(labels) == 2:
            p = softmax(logits, cal.temperatures[task])[:, 1]
            cal.thresholds[task] = choose_threshold(p, y[keep])
    matched = val.itm_match[~np.isnan(val.itm_match)]
    if len(matched):
        cal.itm_threshold = float(np.quantile(matched, review_fraction))
    return cal


def decisions(logits: np.ndarray, temperature: float, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities, predicted class indices)."""
    probs = softmax(logits, temperature)
    if threshold is not None and probs.shape[1] == 2:
        return probs, (probs[:, 1] >= threshold).astype(np.int64)
    return probs, probs.argmax(1)


def score(
    split: EvalOutput,
    tasks: Mapping[str, Sequence[str]],
    cal: Calibration,
    review_fraction: float = DEFAULT_REVIEW_FRACTION,
) -> dict[str, Any]:
    """Metrics of a split under a calibration: per-task reports, ECE, ITM AUROC and the
    routing lift (error rate among the `review_fraction` lowest-ITM posts / overall)."""
    out: dict[str, Any] = {
        "itm_auroc": split.itm_auroc(),
        "itm_auroc_ci": itm_auroc_interval(*split.itm_pairs()),
        "tasks": {},
    }
    for task, labels in tasks.items():
        y = split.labels[task]
        keep = y != IGNORE_INDEX
        if not keep.any():
            continue
        probs, pred = decisions(split.logits[task][keep], cal.temperatures.get(task, 1.0), cal.thresholds.get(task))
        report = task_report(y[keep], pred, labels)
        lift = routing_lift(pred != y[keep], split.itm_match[keep], review_fraction)
        out["tasks"][task] = {
            **report.to_dict(),
            "ece": expected_calibration_error(probs, y[keep]),
            "routing": lift,
        }
    out["macro_f1"] = {t: r["macro_f1"] for t, r in out["tasks"].items()}
    out["routing_lift"] = {t: r["routing"]["lift"] for t, r in out["tasks"].items()}
    out["routing_evidence"] = {
        t: {k: r["routing"][k] for k in ("lift", "lift_ci", "n_errors", "n")} for t, r in out["tasks"].items()
    }
    return out
