"""Evaluation metrics, calibration and decision thresholds: pure functions on numpy arrays.

Class labels are integer indices into a task's label list; a negative index means "unlabelled"
and is dropped wherever labels are consumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _scipy_softmax
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Search range for the temperature; optimised in log space so the bound T > 0 is implicit.
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


@dataclass
class TaskReport:
    macro_f1: float
    # label name -> {"precision", "recall", "f1", "support"}
    per_class: dict[str, dict[str, float]]
    # rows = true label, columns = predicted label, both in label-list order
    confusion: list[list[int]]
    accuracy: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_report(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, labels: Sequence[str]) -> TaskReport:
    """Macro-F1, per-class P/R/F1/support, confusion matrix and accuracy for one task."""
    yt = np.asarray(y_true, dtype=np.int64).ravel()
    yp = np.asarray(y_pred, dtype=np.int64).ravel()
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} rows but y_pred has {yp.size}")
    keep = yt >= 0
    yt, yp = yt[keep], yp[keep]
    idx = list(range(len(labels)))
    n = int(yt.size)
    if n == 0:
        # sklearn rejects empty input; an empty split has no meaningful scores.
        nan = float("nan")
        return TaskReport(
            macro_f1=nan,
            per_class={name: {"precision": nan, "recall": nan, "f1": nan, "support": 0.0} for name in labels},
            confusion=[[0] * len(labels) for _ in labels],
            accuracy=nan,
            n=0,
        )
    # Passing labels=idx keeps classes absent from this split in the average (as F1 = 0),
    # so macro-F1 is comparable across folds.
    macro = float(f1_score(yt, yp, labels=idx, average="macro", zero_division=0))
    prec, rec, f1, sup = precision_recall_fscore_support(yt, yp, labels=idx, average=None, zero_division=0)
    per_class = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": float(sup[i]),
        }
        for i, name in enumerate(labels)
    }
    cm = confusion_matrix(yt, yp, labels=idx)
    return TaskReport(
        macro_f1=macro,
        per_class=per_class,
        confusion=[[int(v) for v in row] for row in cm],
        accuracy=float(np.mean(yt == yp)),
        n=n,
    )


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Row-wise softmax of logits / temperature (last axis = classes)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.asarray(_scipy_softmax(z, axis=-1), dtype=np.float64)


def fit_temperature(logits: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the NLL of softmax(logits/T).

    Returns 1.0 (no rescaling) when there is nothing to fit: no labelled rows, or a single class
    (the NLL then keeps falling as T -> 0 and the fit would only sharpen blindly).
    """
    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[0] != yy.size:
        raise ValueError(f"logits must be [N, C] with N = len(y); got {z.shape} and {yy.size}")
    keep = yy >= 0
    z, yy = z[keep], yy[keep]
    if yy.size == 0 or np.unique(yy).size < 2:
        return 1.0
    rows = np.arange(yy.size)

    def nll(log_t: float) -> float:
        return float(-np.mean(log_softmax(z / math.exp(log_t), axis=1)[rows, yy]))

    res = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded")
    return float(math.exp(res.x))


def _binary_macro_f1(p: FloatArray, y: IntArray, thresholds: FloatArray) -> FloatArray:
    """Macro-F1 of (p >= t) against y for every t, from cumulative counts.

    Equivalent to calling f1_score(average="macro") per threshold, but O(N log N) overall
    instead of O(N) per candidate (there can be ~N candidates).
    """
    order = np.argsort(p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    # Number of positives / negatives with p >= t, via suffix sums over the sorted scores.
    pos_suffix = np.concatenate([np.cumsum(y_sorted[::-1])[::-1], [0]])
    neg_suffix = np.concatenate([np.cumsum(1 - y_sorted[::-1])[::-1], [0]])
    first = np.searchsorted(p_sorted, thresholds, side="left")
    tp = pos_suffix[first].astype(np.float64)
    fp = neg_suffix[first].astype(np.float64)
    n_pos, n_neg = float(pos_suffix[0]), float(neg_suffix[0])
    fn = n_pos - tp
    tn = n_neg - fp
    # Both classes are present (checked by the caller), so neither denominator can be 0.
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    return np.asarray((f1_pos + f1_neg) / 2, dtype=np.float64)


def choose_threshold(p_positive: npt.ArrayLike, y: npt.ArrayLike, *, default: float = 0.5) -> float:
    """The decision threshold on P(positive) that maximises validation macro-F1 (binary tasks).

    Candidates are the midpoints between consecutive distinct probabilities, plus `default`;
    ties go to the candidate closest to 0.5 (then the lower one), which keeps the choice stable
    when validation data cannot tell thresholds apart. Returns `default` when y is empty or has
    a single class.
    """
    p = np.asarray(p_positive, dtype=np.float64).ravel()
    yy = np.asarray(y, dtype=np.int64).ravel()
    if p.shape != yy.shape:
        raise ValueError(f"p_positive has {p.size} rows but y has {yy.size}")
    keep = (yy >= 0) & np.isfinite(p)
    p, yy = p[keep], yy[keep]
    if yy.size == 0 or np.unique(yy).size < 2:
        return default
    if not np.isin(yy, (0, 1)).all():
        raise ValueError("choose_threshold expects binary labels 0/1")
    uniq = np.unique(p)
    candidates = np.unique(np.concatenate([(uniq[:-1] + uniq[1:]) / 2, [default]]))
    scores = _binary_macro_f1(p, yy, candidates)
    best = candidates[np.isclose(scores, scores.max(), rtol=0.0, atol=1e-12)]
    # lexsort: primary key distance to 0.5, secondary key the threshold itself.
    pick = np.lexsort((best, np.abs(best - 0.5)))[0]
    return float(best[pick])


def decide(p_positive: npt.ArrayLike, threshold: float) -> IntArray:
    """Hard binary decisions: 1 where P(positive) >= threshold."""
    return (np.asarray(p_positive, dtype=np.float64) >= threshold).astype(np.int64)


def expected_calibration_error(probs: npt.ArrayLike, y: npt.ArrayLike, n_bins: int = 10) -> float:
    """Top-label ECE with `n_bins` equal-width confidence bins (lo, hi] (Guo et al., 2017).

    NaN for empty input.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    pr = np.asarray(probs, dtype=np.float64)
    yy = np.asarray(y, dtype=np.int64).ravel()
    if pr.ndim != 2 or pr.shape[0] != yy.size:
        raise ValueError(f"probs must be [N, C] with N = len(y); got {pr.shape} and {yy.size}")
    keep = yy >= 0
    pr, yy = pr[keep], yy[keep]
    if yy.size == 0:
        return float("nan")
    conf = pr.max(axis=1)
    correct = (pr.argmax(axis=1) == yy).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges makes bins right-closed; confidence 0 falls in bin 0.
    bin_idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    conf_sum = np.bincount(bin_idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bin_idx, weights=correct, minlength=n_bins)
    # sum_b |acc_b - conf_b| * n_b / N, written with sums so empty bins contribute 0.
    return float(np.abs(acc_sum - conf_sum).sum() / yy.size)


def itm_auroc(match_scores_pos: npt.ArrayLike, match_scores_neg: npt.ArrayLike) -> float:
    """AUROC of the ITM head: matched pairs (label 1) vs mismatched/swapped pairs (label 0).

    NaN scores are dropped; NaN if either side is then empty.
    """
    pos = np.asarray(match_scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(match_scores_neg, dtype=np.float64).ravel()
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    y = np.concatenate([np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)])
    return float(roc_auc_score(y, np.concatenate([pos, neg])))


def routing_lift(errors: npt.ArrayLike, itm_scores: npt.ArrayLike, fraction: float = 0.1) -> dict[str, Any]:
    """Error rate among the `fraction` of posts with the lowest ITM match probability, vs overall.

    Tests whether "image and text don't match" is a useful signal for routing posts to human
    review. Posts with a NaN score (text-only) are excluded from both rates and from n.
    Returns {"low_itm_error_rate", "overall_error_rate", "lift", "n_low", "n", "n_errors",
    "lift_ci"}; lift is NaN when the overall error rate is 0, and the rates are NaN when no
    post has a score. `lift_ci` is a 95% percentile-bootstrap interval over posts (NaN bounds
    when undefined); `n_errors` says how much evidence stands behind the estimate.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    err = np.asarray(errors, dtype=bool).ravel()
    s = np.asarray(itm_scores, dtype=np.float64).ravel()
    if err.shape != s.shape:
        raise ValueError(f"errors has {err.size} rows but itm_scores has {s.size}")
    keep = ~np.isnan(s)
    err, s = err[keep], s[keep]
    n = int(s.size)
    nan = float("nan")
    if n == 0:
        return {
            "low_itm_error_rate": nan,
            "overall_error_rate": nan,
            "lift": nan,
            "n_low": 0.0,
            "n": 0.0,
            "n_errors": 0.0,
            "lift_ci": [nan, nan],
        }
    # Round before ceil: 0.7 * 10 == 7.000000000000001 in floating point and would give 8.
    n_low = min(n, math.ceil(round(fraction * n, 9)))
    low = np.argsort(s, kind="stable")[:n_low]
    low_rate = float(err[low].mean())
    overall = float(err.mean())
    return {
        "low_itm_error_rate": low_rate,
        "overall_error_rate": overall,
        "lift": low_rate / overall if overall > 0 else nan,
        "n_low": float(n_low),
        "n": float(n),
        "n_errors": float(err.sum()),
        "lift_ci": _lift_interval(err, s, fraction),
    }


def _lift(err: np.ndarray, s: np.ndarray, fraction: float) -> float:
    n_low = min(len(s), math.ceil(round(fraction * len(s), 9)))
    overall = err.mean()
    return float(err[np.argsort(s, kind="stable")[:n_low]].mean() / overall) if overall > 0 else math.nan


def _lift_interval(err: np.ndarray, s: np.ndarray, fraction: float, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap over posts; resamples without any error are left out."""
    if not err.any():
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    lifts = np.array([_lift(err[i], s[i], fraction) for i in rng.integers(0, len(s), size=(n_boot, len(s)))])
    lifts = lifts[np.isfinite(lifts)]
    if not lifts.size:
        return [math.nan, math.nan]
    return [float(np.quantile(lifts, 0.025)), float(np.quantile(lifts, 0.975))]


def auroc_drop_interval(
    current: tuple[npt.ArrayLike, npt.ArrayLike],
    candidate: tuple[npt.ArrayLike, npt.ArrayLike],
    n_boot: int = 500,
    seed: int = 0,
) -> list[float]:
    """95% interval of current AUROC minus candidate AUROC on the same pairs: (true-pair scores,
    non-pair scores) of each model, in the same order; the pairs are resampled together for
    both models (a paired, stratified bootstrap), so what the two share cancels out."""
    cur_pos, cur_neg = (np.asarray(x, dtype=np.float64).ravel() for x in current)
    cand_pos, cand_neg = (np.asarray(x, dtype=np.float64).ravel() for x in candidate)
    if cur_pos.shape != cand_pos.shape or cur_neg.shape != cand_neg.shape or cur_pos.size < 2 or cur_neg.size < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(n_boot):
        i, j = rng.integers(0, cur_pos.size, cur_pos.size), rng.integers(0, cur_neg.size, cur_neg.size)
        drop = itm_auroc(cur_pos[i], cur_neg[j]) - itm_auroc(cand_pos[i], cand_neg[j])
        if math.isfinite(drop):
            drops.append(drop)
    if not drops:
        return [math.nan, math.nan]
    return [float(np.quantile(drops, 0.025)), float(np.quantile(drops, 0.975))]


def itm_auroc_interval(
    match_scores_pos: npt.ArrayLike, match_scores_neg: npt.ArrayLike, n_boot: int = 500, seed: int = 0
) -> list[float]:
    """95% percentile bootstrap interval of `itm_auroc`, resampling the true pairs and the
    non-pairs each within its own group (a stratified bootstrap: the two groups need not have
    the same size, as they do not once text-only posts, known mismatches or unknown pairs are
    in the split; the paired version returned no interval at all then)."""
    pos = np.asarray(match_scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(match_scores_neg, dtype=np.float64).ravel()
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if pos.size < 2 or neg.size < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        value = itm_auroc(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return [math.nan, math.nan]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def fast_macro_f1(y_true: IntArray, y_pred: IntArray, n_classes: int) -> float:
    """`task_report`'s macro-F1 (absent classes count as F1 0) from one bincount: sklearn's
    per-call checks cost ~1 ms, too slow for a bootstrap of hundreds of resamples."""
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, -1)
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(f1.mean())


def macro_f1_drop_interval(
    y: npt.ArrayLike,
    pred_current: npt.ArrayLike,
    pred_candidate: npt.ArrayLike,
    n_classes: int,
    n_boot: int = 500,
    seed: int = 0,
) -> list[float]:
    """95% interval of current macro-F1 minus candidate macro-F1 on the same labelled posts,
    resampled together (a paired bootstrap); unlabelled rows (y < 0) are left out."""
    yt = np.asarray(y, dtype=np.int64).ravel()
    cur = np.asarray(pred_current, dtype=np.int64).ravel()
    cand = np.asarray(pred_candidate, dtype=np.int64).ravel()
    if not yt.shape == cur.shape == cand.shape:
        raise ValueError(f"labels and predictions differ in length: {yt.size}, {cur.size}, {cand.size}")
    keep = yt >= 0
    yt, cur, cand = yt[keep], cur[keep], cand[keep]
    if yt.size < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(n_boot):
        i = rng.integers(0, yt.size, yt.size)
        drops.append(fast_macro_f1(yt[i], cur[i], n_classes) - fast_macro_f1(yt[i], cand[i], n_classes))
    return [float(np.quantile(drops, 0.025)), float(np.quantile(drops, 0.975))]
