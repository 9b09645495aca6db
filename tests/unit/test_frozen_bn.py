"""Frozen encoder parts stay in eval mode: BatchNorm statistics move only where weights train."""

import pytest
import torch

from models.classifier import MultimodalModel
from models.encoders import EfficientNetLiteEncoder
from tests.tiny import tiny_config, tiny_model
from trainer.features import LiveFeatures, load_inputs
from trainer.train import TrainConfig, evaluate_split, finish_itm, label_tensors, train


def _bn_model(image_trainable_blocks: int) -> tuple[MultimodalModel, object]:
    """The tiny text encoder with a randomly initialised EfficientNet-Lite0 (it has BatchNorm) on 32 px."""
    cfg = tiny_config(image_backbone="efficientnet_lite0", image_trainable_blocks=image_trainable_blocks)
    base, tok = tiny_model(cfg)
    torch.manual_seed(0)
    return MultimodalModel(cfg, base.text_encoder, EfficientNetLiteEncoder(pretrained=False, image_size=32)), tok


def _live(model, tok, examples):
    inputs = load_inputs(examples)
    return LiveFeatures(model, tok, inputs, torch.device("cpu")), label_tensors(inputs.examples, model.config.tasks)


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in module.named_buffers() if name.endswith(("running_mean", "running_var"))}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_train_mode_leaves_frozen_parts_in_eval():
    model, _ = _bn_model(image_trainable_blocks=1)
    model.train()
    net = model.image_encoder.net
    assert all(not m.training for m in net.blocks.modules()) and not net.bn1.training
    assert net.bn2.training and net.conv_head.training  # the unfrozen top unit trains
    assert not any(m.training for m in model.text_encoder.modules())  # frozen text encoder
    assert model.head.training and model.training
    model.eval()
    assert not net.bn2.training and not model.head.training


def test_a_training_step_moves_bn_statistics_of_trainable_blocks_only(synthetic_small):
    model, tok = _bn_model(image_trainable_blocks=1)
    feats, labels = _live(model, tok, synthetic_small[:24])
    net = model.image_encoder.net
    frozen_before, top_before = _bn_stats(net.blocks), _bn_stats(net.bn2)
    assert frozen_before  # the frozen blocks do have BatchNorm statistics to protect
    cfg = TrainConfig(epochs=1, batch_size=8, itm_finish_epochs=0, modality_dropout=0.0)
    train(model, feats, labels, feats, labels, cfg)
    assert _changed(frozen_before, _bn_stats(net.blocks)) == set()
    assert _changed(top_before, _bn_stats(net.bn2)) == set(top_before)


@pytest.mark.parametrize("blocks", [0, 2])
def test_itm_finishing_leaves_task_logits_unchanged(synthetic_small, blocks):
    model, tok = _bn_model(image_trainable_blocks=blocks)
    feats, labels = _live(model, tok, synthetic_small[:24])
    before = evaluate_split(model, feats, labels)
    itm_before = model.head.itm_head[0].weight.clone()
    stats_before = _bn_stats(model)
    cfg = TrainConfig(itm_finish_epochs=1, batch_size=8)
    rows = finish_itm(model, feats, labels, feats, labels, cfg, torch.Generator().manual_seed(0))
    assert len(rows) == 1
    assert not torch.equal(itm_before, model.head.itm_head[0].weight)  # the ITM head did train
    assert _changed(stats_before, _bn_stats(model)) == set()
    after = evaluate_split(model, feats, labels)
    for task in before.logits:
        assert torch.equal(torch.from_numpy(before.logits[task]), torch.from_numpy(after.logits[task]))
    # requires_grad is restored: the unfrozen blocks train again afterwards.
    assert model.image_encoder.net.bn2.weight.requires_grad == (blocks > 0)
