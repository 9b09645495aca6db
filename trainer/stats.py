"""Summary statistics for repeated runs (folds x seeds) and paired comparisons between models.

Caveat on `paired_difference`: the per-run differences are treated as independent samples, but
runs from different folds share most of their training data (and seeds share folds), so the
differences are positively correlated and the plain t-interval is too narrow (optimistic).
`corrected_paired_t` applies the Nadeau & Bengio (2003) variance correction for this; prefer it
when claiming that one model beats another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _st


@dataclass
class PairedDiff:
    """Summary of the paired differences a - b."""

    mean: float
    std: float  # sample std (ddof=1) of the differences
    ci_low: float
    ci_high: float
    n: int
    wins: int  # number of pairs with a > b
    p_value: float  # two-sided, H0: mean difference = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1); std is 0.0 for one value, both NaN for none."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1))


def _paired_t(a: Sequence[float], b: Sequence[float], confidence: float, variance_factor: float | None) -> PairedDiff:
    """t-interval and two-sided p-value on d = a - b with SE^2 = s^2 * variance_factor.

    variance_factor None means the textbook 1/n.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a has {x.size} values but b has {y.size}; they must be paired")
    d = x - y
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return PairedDiff(nan, nan, nan, nan, 0, 0, nan)
    mean, std = mean_std(d.tolist())
    wins = int(np.sum(x > y))
    if n == 1:
        # No spread to estimate from one pair.
        return PairedDiff(mean, std, nan, nan, 1, wins, nan)
    factor = 1.0 / n if variance_factor is None else variance_factor
    se = std * math.sqrt(factor)
    df = n - 1
    if se == 0.0:
        # Identical differences: the interval collapses; t is infinite unless the mean is 0.
        return PairedDiff(mean, std, mean, mean, n, wins, nan if mean == 0.0 else 0.0)
    half = float(_st.t.ppf((1.0 + confidence) / 2.0, df)) * se
    t_stat = mean / se
    p = float(2.0 * _st.t.sf(abs(t_stat), df))
    return PairedDiff(mean, std, mean - half, mean + half, n, wins, p)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Plain paired t-interval on a - b (same numbers as scipy.stats.ttest_rel).

    Optimistic for folds x seeds runs, whose differences are not independent (see module doc).
    n == 1 gives ci = (nan, nan) and p_value = nan.
    """
    return _paired_t(a, b, confidence, None)


def corrected_paired_t(
    a: Sequence[float],
    b: Sequence[float],
    n_train: int,
    n_test: int,
    confidence: float = 0.95,
) -> PairedDiff:
    """Nadeau & Bengio (2003) corrected resampled t-test on a - b.

    The variance of the mean difference over J runs is inflated from s^2 / J to
    s^2 * (1/J + n_test/n_train), accounting for the overlap of training sets between runs.
    n_train / n_test are the per-run training and test set sizes.
    """
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be > 0, got {n_train} and {n_test}")
    j = len(a)
    factor = 1.0 / j + n_test / n_train if j > 0 else None
    return _paired_t(a, b, confidence, factor)


def _fmt(x: float, digits: int, sign: bool) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """E.g. "0.692 ± 0.026"."""
    return f"{_fmt(mean, digits, False)} ± {_fmt(std, digits, False)}"


def format_diff(d: PairedDiff, digits: int = 3) -> str:
    """E.g. "+0.029 [+0.004, +0.053]" (mean difference and its confidence interval)."""
    lo, hi = _fmt(d.ci_low, digits, True), _fmt(d.ci_high, digits, True)
    return f"{_fmt(d.mean, digits, True)} [{lo}, {hi}]"
