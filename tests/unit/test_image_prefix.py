"""An image encoder with only its last blocks trainable runs them on a cached feature map.

The stem and the frozen blocks of EfficientNet-Lite0 stay in eval mode and preprocessing is
deterministic, so their output for an image never changes: it is cached once (like a frozen
encoder's output) and training runs only the trainable units on it."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from models.classifier import MultimodalModel
from models.encoders import EfficientNetLiteEncoder
from models.preprocess import ImagePreprocessor
from tests.tiny import tiny_config, tiny_model
from trainer.features import FeatureStore, LiveFeatures, build_features, load_inputs, subset
from trainer.train import TrainConfig, label_tensors, train

CPU = torch.device("cpu")
SIZE = 64  # EfficientNet-Lite0 at 64 px: the last map is 2x2, enough to be a real map, fast on a CPU


def _model(blocks: int, seed: int = 0) -> tuple[MultimodalModel, object]:
    """The tiny text encoder with a randomly initialised EfficientNet-Lite0 whose last `blocks` units train."""
    cfg = tiny_config(image_backbone="efficientnet_lite0", image_trainable_blocks=blocks, image_size=SIZE)
    base, tok = tiny_model(cfg)
    torch.manual_seed(seed)
    return MultimodalModel(cfg, base.text_encoder, EfficientNetLiteEncoder(pretrained=False, image_size=SIZE)), tok


def _examples(synthetic_small, n: int, text_only: int = 0) -> list:
    """n posts with images, then `text_only` posts without one."""
    posts = list(synthetic_small[:n])
    return posts + [replace(p, id=f"{p.id}-text", image=None) for p in synthetic_small[n : n + text_only]]


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_split_at_every_unit_reproduces_the_whole_encoder():
    torch.manual_seed(0)
    encoder = EfficientNetLiteEncoder(pretrained=False, image_size=SIZE).eval()
    pixels = torch.randn(3, 3, SIZE, SIZE)
    whole = encoder(pixels)
    units = len(encoder.units())
    assert units == 8  # seven MBConv stages and the conv head
    for start in range(units):
        split = encoder.forward_from(encoder.maps_at(pixels, start), start)
        assert torch.allclose(split.tokens, whole.tokens, atol=1e-5), start
        assert torch.allclose(split.pooled, whole.pooled, atol=1e-5) and split.mask.all()
        assert encoder.supports_split(pixels, start)
    # The map at a deeper unit has more channels: the split really happens where it says.
    assert encoder.maps_at(pixels, 1).shape[1] != encoder.maps_at(pixels, 6).shape[1]
    for bad in (-1, units):
        assert not encoder.supports_split(pixels, bad)
        with pytest.raises(ValueError, match="split unit"):
            encoder.maps_at(pixels, bad)


def test_prefix_features_give_the_live_image_tokens(tmp_path, synthetic_small):
    model, tok = _model(blocks=2)
    inputs = load_inputs(_examples(synthetic_small, 10, text_only=2))
    cached = build_features(model, tok, inputs, FeatureStore(tmp_path / "cache"), CPU)
    assert cached.frozen_image is None and cached.image_prefix is not None
    assert cached.image_prefix.start == 6  # units 6 (the last MBConv stage) and 7 (the head) train
    live = LiveFeatures(model, tok, inputs, CPU)
    model.eval()
    idx = [0, 4, 9, 10, 11]  # 10 and 11 have no image: both paths feed the blank image
    with torch.no_grad():
        a, b = cached.image(idx), live.image(idx)
    assert a.tokens.shape == b.tokens.shape
    assert not torch.allclose(b.tokens[0], b.tokens[1], atol=1e-3)  # distinct posts, not a constant
    assert _relative_gap(a.tokens, b.tokens) < 1e-2  # the cache holds float16
    assert _relative_gap(a.pooled, b.pooled) < 1e-2
    # A split of the data carries the prefix along with the rows it keeps.
    part = subset(cached, [9, 0])
    assert part.image_prefix is not None
    with torch.no_grad():
        assert torch.equal(part.image([0, 1]).tokens, cached.image([9, 0]).tokens)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in module.named_buffers() if name.endswith(("running_mean", "running_var"))}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def _frozen_part(net: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.ModuleList([net.conv_stem, net.bn1, *net.blocks[:6]])


def _trained_part(net: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.ModuleList([net.blocks[6], net.conv_head, net.bn2])


def test_a_training_step_on_the_prefix_moves_only_the_trainable_units(tmp_path, synthetic_small):
    model, tok = _model(blocks=2)
    inputs = load_inputs(_examples(synthetic_small, 24))
    feats = build_features(model, tok, inputs, FeatureStore(tmp_path / "cache"), CPU)
    assert feats.image_prefix is not None
    labels = label_tensors(inputs.examples, model.config.tasks)
    net = model.image_encoder.net
    frozen, trained = _frozen_part(net), _trained_part(net)
    frozen_weights, frozen_stats = _params(frozen), _bn_stats(frozen)
    trained_weights, trained_stats = _params(trained), _bn_stats(trained)
    assert frozen_stats and trained_stats  # both sides have BatchNorm statistics to watch
    train(model, feats, labels, feats, labels, TrainConfig(epochs=1, batch_size=8, itm_finish_epochs=0))
    assert _changed(frozen_weights, _params(frozen)) == set()
    assert _changed(frozen_stats, _bn_stats(frozen)) == set()
    assert _changed(trained_weights, _params(trained)) == set(trained_weights)
    assert _changed(trained_stats, _bn_stats(trained)) == set(trained_stats)


def test_the_prefix_path_neither_preprocesses_nor_runs_the_frozen_blocks_per_batch(
    tmp_path, synthetic_small, monkeypatch
):
    model, tok = _model(blocks=2)
    inputs = load_inputs(_examples(synthetic_small, 16, text_only=2))
    feats = build_features(model, tok, inputs, FeatureStore(tmp_path / "cache"), CPU)
    labels = label_tensors(inputs.examples, model.config.tasks)

    def boom(*args, **kwargs):
        raise AssertionError("an image was preprocessed or run through the frozen blocks after the cache was built")

    monkeypatch.setattr(ImagePreprocessor, "__call__", boom)
    monkeypatch.setattr(ImagePreprocessor, "to_uint8", boom)
    monkeypatch.setattr(model.image_encoder, "maps_at", boom)
    for block in model.image_encoder.net.blocks[:6]:
        monkeypatch.setattr(block, "forward", boom)
    monkeypatch.setattr(model.image_encoder.net.conv_stem, "forward", boom)
    result = train(model, feats, labels, feats, labels, TrainConfig(epochs=1, batch_size=8, itm_finish_epochs=0))
    assert result is not None
    assert feats.image(range(18)).tokens.shape[0] == 18


def test_a_second_build_reads_the_prefix_from_the_cache(tmp_path, synthetic_small, monkeypatch):
    store = FeatureStore(tmp_path / "cache")
    inputs = load_inputs(_examples(synthetic_small, 12))
    model, tok = _model(blocks=2)
    first = build_features(model, tok, inputs, store, CPU)
    assert first.image_prefix is not None
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len([f for f in files if "-unit6" in str(f)]) == 12

    again, _ = _model(blocks=2)  # same seed: same weights, a new model object
    encoded: list[int] = []
    maps_at = again.image_encoder.maps_at

    def counting(pixels, start):
        encoded.append(int(pixels.shape[0]))
        return maps_at(pixels, start)

    def no_miss(*args, **kwargs):
        raise AssertionError("a prefix was computed again instead of read from the cache")

    monkeypatch.setattr(again.image_encoder, "maps_at", counting)
    monkeypatch.setattr(FeatureStore, "put", no_miss)
    second = build_features(again, tok, inputs, store, CPU)
    assert second.image_prefix is not None
    assert torch.equal(first.image_prefix.states.tokens, second.image_prefix.states.tokens)
    assert sum(encoded) <= 5  # only the split check on four probe images and the map's shape


def test_an_encoder_that_cannot_be_split_runs_live_with_a_warning(tmp_path, synthetic_small, caplog):
    model, tok = tiny_model(tiny_config(image_trainable_blocks=1))  # the tiny ViT: no split
    assert not model.image_encoder.supports_split(torch.zeros(1, 3, 32, 32), 0)
    with caplog.at_level(logging.WARNING, logger="trainer.features"):
        feats = build_features(model, tok, load_inputs(synthetic_small[:4]), FeatureStore(tmp_path), CPU)
    assert "cannot be split" in caplog.text
    assert feats.image_prefix is None and feats.frozen_image is None
    out = feats.image([0, 1])
    assert out.tokens.shape[0] == 2 and out.tokens.requires_grad  # live, through the trainable layer


def test_a_wholly_trainable_image_encoder_runs_live_without_a_prefix(tmp_path, synthetic_small, caplog):
    model, tok = _model(blocks=-1)
    with caplog.at_level(logging.WARNING, logger="trainer.features"):
        feats = build_features(model, tok, load_inputs(synthetic_small[:4]), FeatureStore(tmp_path), CPU)
    assert feats.image_prefix is None and feats.frozen_image is None
    assert "cannot be split" not in caplog.text
    assert not list(tmp_path.rglob("*-unit*"))
