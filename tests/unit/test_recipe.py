"""Checkpoint selection and decision thresholds of the default recipe."""

from __future__ import annotations

import math

import numpy as np
import torch

from models.losses import IGNORE_INDEX
from models.objectives import ObjectiveConfig
from tests.tiny import tiny_model
from trainer.features import FeatureStore, build_features, load_inputs, subset
from trainer.train import EvalOutput, TrainConfig, balanced_loss, label_tensors, selection_score, train


def test_default_selection_is_task_f1_with_itm_only_breaking_ties():
    cfg = TrainConfig()
    assert cfg.objective.uses_itm
    assert cfg.selection == "task>itm"
    assert TrainConfig(objective=ObjectiveConfig(weights={"task_loss": 1.0})).selection == "task"
    assert TrainConfig(select_on="task+itm").selection == "task+itm"


def _val(pred_hate: list[int], itm_match: list[float], itm_swapped: list[float]) -> EvalOutput:
    y = np.array([0, 0, 1, 1])
    logits = np.eye(2)[pred_hate] * 3.0
    return EvalOutput({"hate": logits}, {"hate": y}, np.array(itm_match), np.array(itm_swapped))


def test_itm_decides_only_between_epochs_whose_f1_ties():
    tasks = {"hate": ["n", "p"]}
    better_f1_weak_itm = _val([0, 0, 1, 1], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9])  # F1 1.0, AUROC 0
    worse_f1_strong_itm = _val([0, 1, 1, 1], [0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1])  # F1 < 1, AUROC 1
    same_f1_strong_itm = _val([0, 0, 1, 1], [0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1])
    score = lambda v: selection_score(v, tasks, "task>itm")  # noqa: E731
    assert score(better_f1_weak_itm) > score(worse_f1_strong_itm)
    assert score(same_f1_strong_itm) > score(better_f1_weak_itm)
    # The older mean of F1 and ITM AUROC lets ITM outweigh the task:
    mean = lambda v: selection_score(v, tasks, "task+itm")  # noqa: E731
    assert mean(worse_f1_strong_itm) > mean(better_f1_weak_itm)


def test_balanced_loss_weighs_each_class_equally_and_skips_unlabelled_rows():
    # 3 negatives predicted perfectly-ish, 1 positive predicted badly; one unlabelled row.
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 9.0]])
    labels = np.array([0, 0, 0, 1, IGNORE_INDEX])
    val = EvalOutput({"hate": logits}, {"hate": labels}, np.zeros(0), np.zeros(0))
    nll_right = math.log1p(math.exp(-2.0))
    nll_wrong = math.log1p(math.exp(2.0))
    assert math.isclose(balanced_loss(val, ["hate"]), (nll_right + nll_wrong) / 2, rel_tol=1e-9)
    # Unweighted it would be dominated by the majority class; balanced it is not.
    assert balanced_loss(val, ["hate"]) > (3 * nll_right + nll_wrong) / 4
    assert math.isclose(selection_score(val, {"hate": ["n", "p"]}, "loss"), -balanced_loss(val, ["hate"]))


def test_loss_selection_keeps_the_epoch_with_the_lowest_validation_loss(synthetic_small):
    model, tok = tiny_model()
    inputs = load_inputs(synthetic_small)
    features = build_features(model, tok, inputs, FeatureStore(None), torch.device("cpu"))
    labels = label_tensors(inputs.examples, model.config.tasks)
    tr, va = list(range(120)), list(range(120, 160))
    cfg = TrainConfig(epochs=6, patience=6, itm_finish_epochs=0, objective=ObjectiveConfig(), lr=3e-3, select_on="loss")
    result = train(
        model,
        subset(features, tr),
        {t: y[tr] for t, y in labels.items()},
        subset(features, va),
        {t: y[va] for t, y in labels.items()},
        cfg,
    )
    losses = [row["val_task_loss"] for row in result.history if "epoch" in row]
    assert len(losses) == 6
    assert result.best_epoch == int(np.argmin(losses)) + 1
    # The restored checkpoint is that epoch's: its validation loss is the minimum.
    assert math.isclose(balanced_loss(result.val, model.config.tasks), min(losses), rel_tol=1e-4)


def test_thresholds_stay_at_half_where_validation_has_few_posts_of_a_class():
    from trainer.calibration import Calibration
    from trainer.fit import keep_default_thresholds

    cal = Calibration(thresholds={"hate": 0.29, "sarcasm": 0.71})
    val = {
        "hate": torch.tensor([0] * 120 + [1] * 99 + [IGNORE_INDEX] * 5),  # 99 positives: too few
        "sarcasm": torch.tensor([0] * 100 + [1] * 100 + [IGNORE_INDEX] * 24),
    }
    assert keep_default_thresholds(cal, val, min_per_class=100) == ["hate"]
    assert cal.thresholds == {"hate": 0.5, "sarcasm": 0.71}
    assert TrainConfig().threshold_min_per_class == 100


def test_task_auroc_ranks_posts_whatever_the_threshold_and_skips_unlabelled_rows():
    from trainer.train import mean_task_auroc

    # Every positive scores above every negative, though all sit below P = 0.5.
    logits = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [9.0, 0.0]])
    labels = np.array([0, 0, 1, 1, IGNORE_INDEX])
    one_class = np.array([0, 0, 0, 0, 0])
    val = EvalOutput(
        {"hate": logits, "sarcasm": logits}, {"hate": labels, "sarcasm": one_class}, np.zeros(0), np.zeros(0)
    )
    tasks = {"hate": ["n", "p"], "sarcasm": ["n", "p"]}
    assert mean_task_auroc(val, tasks) == 1.0  # sarcasm (one class) has no AUROC and is left out
    assert selection_score(val, tasks, "auroc") == 1.0
    reversed_val = EvalOutput({"hate": -logits}, {"hate": labels}, np.zeros(0), np.zeros(0))
    assert mean_task_auroc(reversed_val, {"hate": ["n", "p"]}) == 0.0
