import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import (
    IGNORE_INDEX,
    hard_negatives,
    itc_loss,
    itm_loss,
    random_negatives,
    task_loss,
    weighted_total,
)


def test_itc_matches_hand_computed_two_pair_case():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(10.0)
    # logits = 10 * T @ I^T = [[10, 6], [0, 8]]
    row0 = -math.log(math.exp(10) / (math.exp(10) + math.exp(6)))
    row1 = -math.log(math.exp(8) / (math.exp(0) + math.exp(8)))
    col0 = -math.log(math.exp(10) / (math.exp(10) + math.exp(0)))
    col1 = -math.log(math.exp(8) / (math.exp(6) + math.exp(8)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    got = itc_loss(text, image, scale)["itc_loss"]
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_itc_ignores_rows_without_image_and_is_zero_below_two_pairs():
    text = F.normalize(torch.randn(3, 4), dim=-1)
    image = F.normalize(torch.randn(3, 4), dim=-1)
    valid = torch.tensor([True, False, True])
    full = itc_loss(text[[0, 2]], image[[0, 2]], torch.tensor(5.0))["itc_loss"]
    masked = itc_loss(text, image, torch.tensor(5.0), valid)["itc_loss"]
    assert masked.item() == pytest.approx(full.item())
    single = itc_loss(text, image, torch.tensor(5.0), torch.tensor([True, False, False]))["itc_loss"]
    assert single.item() == 0.0


def test_itm_loss_is_bce_with_matches_as_ones():
    pos, neg = torch.tensor([2.0]), torch.tensor([-1.0, 0.5])
    expected = (
        -math.log(1 / (1 + math.exp(-2.0)))
        - math.log(1 - 1 / (1 + math.exp(1.0)))
        - math.log(1 - 1 / (1 + math.exp(-0.5)))
    ) / 3
    assert itm_loss(pos, neg)["itm_loss"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 8, 33])
def test_negatives_never_equal_the_positive(n):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert (random_negatives(n, g) != torch.arange(n)).all()
        sim = torch.randn(n, n) * 5 + torch.eye(n) * 100  # the positive is by far the most similar
        assert (hard_negatives(sim, g) != torch.arange(n)).all()


def test_hard_negatives_follow_similarity_and_respect_exclusions():
    g = torch.Generator().manual_seed(1)
    sim = torch.tensor([[0.0, 20.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 20.0], [0.0, 0.0, 20.0, 0.0]])
    picks = torch.stack([hard_negatives(sim, g) for _ in range(20)])
    assert (picks == torch.tensor([1, 0, 3, 2])).all()  # the hardest candidate dominates
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[0, 1] = True  # e.g. posts 0 and 1 carry the same image
    picks = torch.stack([hard_negatives(sim, g, exclude) for _ in range(50)])
    assert not (picks[:, 0] == 1).any() and not (picks[:, 0] == 0).any()


def test_hard_negatives_fall_back_when_everything_is_excluded():
    g = torch.Generator().manual_seed(2)
    exclude = torch.ones(3, 3, dtype=torch.bool)
    picks = hard_negatives(torch.zeros(3, 3), g, exclude)
    assert (picks != torch.arange(3)).all()


def test_task_loss_ignores_missing_labels():
    logits = {"hate": torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]), "sarcasm": torch.zeros(3, 2)}
    labels = {"hate": torch.tensor([0, IGNORE_INDEX, 1]), "sarcasm": torch.full((3,), IGNORE_INDEX)}
    out = task_loss(logits, labels)
    expected = F.cross_entropy(logits["hate"][[0, 2]], torch.tensor([0, 1]))
    assert out["hate_loss"].item() == pytest.approx(expected.item())
    assert "sarcasm_loss" not in out  # a task nobody labelled contributes nothing, not NaN
    assert out["task_loss"].item() == pytest.approx(expected.item())


def test_task_loss_class_weights_change_the_weighting():
    logits = {"hate": torch.tensor([[2.0, 0.0], [2.0, 0.0]])}
    labels = {"hate": torch.tensor([0, 1])}
    plain = task_loss(logits, labels)["task_loss"].item()
    weighted = task_loss(logits, labels, {"hate": torch.tensor([1.0, 3.0])})["task_loss"].item()
    l0, l1 = F.cross_entropy(logits["hate"], labels["hate"], reduction="none").tolist()
    assert plain == pytest.approx((l0 + l1) / 2)
    assert weighted == pytest.approx((l0 + 3 * l1) / 4)


def test_weighted_total_uses_the_papers_weights():
    losses = {"task_loss": torch.tensor(1.0), "itc_loss": torch.tensor(2.0), "itm_loss": torch.tensor(4.0)}
    total = weighted_total(losses, {"task_loss": 0.8, "itc_loss": 0.1, "itm_loss": 0.1})
    assert total.item() == pytest.approx(0.8 + 0.2 + 0.4)
    with pytest.raises(ValueError):
        weighted_total({"x": torch.tensor(1.0)}, {"task_loss": 1.0})
