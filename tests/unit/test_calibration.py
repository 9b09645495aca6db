import numpy as np
import pytest

from trainer.calibration import Calibration, calibrate, decisions, score
from trainer.train import EvalOutput


def _split(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Over-confident logits (x4) whose positive class needs a low threshold.
    margin = np.where(y == 1, rng.normal(0.3, 1.0, n), rng.normal(-1.5, 1.0, n)) * 4
    logits = np.stack([np.zeros(n), margin], axis=1)
    itm = rng.uniform(0, 1, n)
    itm[:5] = np.nan  # text-only posts
    return EvalOutput({"hate": logits}, {"hate": y}, itm, rng.uniform(0, 0.5, n))


def test_calibrate_fits_temperature_threshold_and_itm_quantile():
    split = _split()
    cal = calibrate(split, {"hate": ["not_hateful", "hateful"]}, review_fraction=0.1)
    assert cal.temperatures["hate"] > 1.5  # the logits were scaled up 4x
    assert 0 < cal.thresholds["hate"] < 1
    matched = split.itm_match[~np.isnan(split.itm_match)]
    assert cal.itm_threshold == pytest.approx(np.quantile(matched, 0.1))
    tuned = score(split, {"hate": ["not_hateful", "hateful"]}, cal)["macro_f1"]["hate"]
    plain = score(split, {"hate": ["not_hateful", "hateful"]}, Calibration())["macro_f1"]["hate"]
    assert tuned >= plain


def test_decisions_use_threshold_on_calibrated_probability():
    logits = np.array([[0.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    probs, pred = decisions(logits, 2.0, 0.55)
    assert np.allclose(probs[0], [0.5, 0.5])
    assert pred.tolist() == [0, 1, 0]


def test_score_reports_routing_lift_on_lowest_itm_posts():
    y = np.zeros(10, dtype=int)
    logits = np.tile([[5.0, -5.0]], (10, 1))
    logits[0] = [-5.0, 5.0]  # the one wrong prediction ...
    itm = np.linspace(0.05, 0.95, 10)  # ... has the lowest match score
    split = EvalOutput({"hate": logits}, {"hate": y}, itm, np.zeros(0))
    out = score(split, {"hate": ["not_hateful", "hateful"]}, Calibration(), review_fraction=0.1)
    routing = out["tasks"]["hate"]["routing"]
    assert routing["low_itm_error_rate"] == 1.0 and routing["overall_error_rate"] == pytest.approx(0.1)
    assert out["routing_lift"]["hate"] == pytest.approx(10.0)
