from __future__ import annotations

import math

import pytest
from scipy import stats as st

from trainer.stats import (
    PairedDiff,
    corrected_paired_t,
    format_diff,
    format_mean_std,
    mean_std,
    paired_difference,
)

T_975_DF2 = 4.302652729911275  # t quantile 0.975, 2 degrees of freedom (tables)


def test_mean_std() -> None:
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert s == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, ddof=1
    assert mean_std([0.7]) == (0.7, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_paired_difference_hand_numbers() -> None:
    # d = a - b = [1, 2, 3]: mean 2, std 1, SE 1/sqrt(3).
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = T_975_DF2 / math.sqrt(3)
    assert (d.mean, d.std, d.n, d.wins) == (pytest.approx(2.0), pytest.approx(1.0), 3, 3)
    assert d.ci_low == pytest.approx(2 - half)
    assert d.ci_high == pytest.approx(2 + half)
    assert d.p_value == pytest.approx(2 * st.t.sf(2 * math.sqrt(3), 2))


def test_paired_difference_matches_ttest_rel() -> None:
    a = [0.70, 0.72, 0.69, 0.71, 0.73]
    b = [0.68, 0.70, 0.70, 0.66, 0.69]
    d = paired_difference(a, b, confidence=0.9)
    ref = st.ttest_rel(a, b)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert d.ci_low == pytest.approx(ci.low)
    assert d.ci_high == pytest.approx(ci.high)
    assert d.p_value == pytest.approx(ref.pvalue)
    assert d.wins == 4


def test_paired_difference_degenerate() -> None:
    one = paired_difference([0.8], [0.7])
    assert one.n == 1 and one.mean == pytest.approx(0.1) and one.std == 0.0
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high) and math.isnan(one.p_value)
    const = paired_difference([1.0, 1.0], [0.0, 0.0])
    assert (const.ci_low, const.ci_high, const.p_value) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_corrected_t_hand_numbers_and_wider() -> None:
    a, b = [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]
    # Nadeau-Bengio: SE^2 = s^2 * (1/J + n_test/n_train) = 1 * (1/3 + 1/2).
    c = corrected_paired_t(a, b, n_train=200, n_test=100)
    se = math.sqrt(1 / 3 + 1 / 2)
    assert c.ci_low == pytest.approx(2 - T_975_DF2 * se)
    assert c.ci_high == pytest.approx(2 + T_975_DF2 * se)
    assert c.p_value == pytest.approx(2 * st.t.sf(2 / se, 2))
    plain = paired_difference(a, b)
    assert c.mean == plain.mean and c.wins == plain.wins
    assert c.ci_high - c.ci_low > plain.ci_high - plain.ci_low
    assert c.p_value > plain.p_value
    with pytest.raises(ValueError):
        corrected_paired_t(a, b, n_train=0, n_test=10)


def test_formatting() -> None:
    assert format_mean_std(0.6924, 0.0261) == "0.692 ± 0.026"
    assert format_mean_std(0.6924, 0.0261, digits=2) == "0.69 ± 0.03"
    d = PairedDiff(mean=0.029, std=0.01, ci_low=0.004, ci_high=0.053, n=5, wins=4, p_value=0.03)
    assert format_diff(d) == "+0.029 [+0.004, +0.053]"
    neg = PairedDiff(mean=-0.01, std=0.01, ci_low=-0.02, ci_high=0.001, n=5, wins=1, p_value=0.2)
    assert format_diff(neg) == "-0.010 [-0.020, +0.001]"
    one = paired_difference([0.8], [0.7])
    assert format_diff(one) == "+0.100 [nan, nan]"
    assert d.to_dict()["wins"] == 4
