import json

import pytest
import torch
from PIL import Image

from models.card import ModelCard
from models.config import ModelConfig
from models.inference import Predictor
from models.objectives import ObjectiveConfig, compute_losses
from models.preprocess import ImagePreprocessor, TextPreprocessor
from models.registry import ModelRegistry, RegistryError
from tests.tiny import tiny_config, tiny_model


def _inputs(model, tokenizer, texts, images):
    ids, mask = TextPreprocessor(tokenizer, model.config.max_text_length)(texts)
    enc = model.image_encoder
    pixels, present = ImagePreprocessor(enc.image_size, enc.mean, enc.std)(images)
    return ids, mask, pixels, present


def test_forward_shapes_and_normalised_embeddings():
    model, tok = tiny_model()
    model.eval()
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    out = model(*_inputs(model, tok, ["a", "b c", "d e f"], images))
    assert out.task_logits["hate"].shape == (3, 2) and out.task_logits["sarcasm"].shape == (3, 2)
    assert out.itm_logits.shape == (3,)
    assert torch.allclose(out.text_embed.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.image_embed.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_text_only_posts_ignore_pixels_and_report_no_itm():
    model, tok = tiny_model()
    model.eval()
    ids, mask, pixels, present = _inputs(model, tok, ["hello", "world"], [None, Image.new("RGB", (8, 8), "red")])
    assert present.tolist() == [False, True]
    a = model(ids, mask, pixels, present)
    noisy = pixels.clone()
    noisy[0] = torch.randn_like(noisy[0])  # garbage where there is no image must not matter
    b = model(ids, mask, noisy, present)
    assert torch.allclose(a.task_logits["hate"][0], b.task_logits["hate"][0], atol=1e-6)
    card = ModelCard(config=model.config, version="t1")
    preds = Predictor(model, tok, card).predict(["hello", "world"], [None, Image.new("RGB", (8, 8), "red")])
    assert preds[0].itm_match is None
    assert preds[1].itm_match is not None and 0 <= preds[1].itm_match <= 1
    assert set(preds[0].tasks) == {"hate", "sarcasm"}
    assert preds[0].to_dict()["labels"]["hate"].keys() >= {"score", "decision", "threshold"}


def test_losses_with_mixed_text_only_batch_backpropagate():
    model, tok = tiny_model(tiny_config(text_trainable_layers=-1, image_trainable_blocks=-1))
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")] + [None, Image.new("RGB", (16, 16), "green")]
    ids, mask, pixels, present = _inputs(model, tok, ["a", "b", "c", "d"], images)
    text, image = model.encode(ids, mask, pixels)
    labels = {"hate": torch.tensor([0, 1, 1, -100]), "sarcasm": torch.tensor([1, -100, 0, 0])}
    total, losses, _ = compute_losses(model.head, text, image, present, labels, ObjectiveConfig())
    assert {"task_loss", "itc_loss", "itm_loss", "hate_loss", "sarcasm_loss"} <= set(losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.head.itm_head[0].weight.grad is not None
    assert model.text_encoder.backbone.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_both_fusions_run(fusion):
    model, tok = tiny_model(tiny_config(fusion=fusion))
    out = model(*_inputs(model, tok, ["a", "b"], [Image.new("RGB", (8, 8)), None]))
    assert out.task_logits["hate"].shape == (2, 2)


def test_freezing_options():
    frozen, _ = tiny_model(tiny_config())
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())
    assert not any(p.requires_grad for p in frozen.image_encoder.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())
    top1, _ = tiny_model(tiny_config(text_trainable_layers=1))
    layers = top1.text_encoder.layers()
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not top1.text_encoder.backbone.embeddings.word_embeddings.weight.requires_grad


def test_config_validation():
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two distinct labels"):
        ModelConfig(tasks={"hate": ["only"]})
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"nope": 1})


def test_registry_round_trip_is_exact(tmp_path):
    model, tok = tiny_model(seed=3)
    card = ModelCard(
        config=model.config, thresholds={"hate": 0.4}, temperatures={"hate": 1.7}, metrics={"itm_auroc": float("nan")}
    )
    registry = ModelRegistry(tmp_path)
    v1 = registry.save(model, tok, card)
    assert v1 == "v0001" and registry.current() == "v0001"
    loaded = registry.load("current")
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.card.thresholds == {"hate": 0.4} and loaded.card.temperatures == {"hate": 1.7}
    assert loaded.card.metrics["itm_auroc"] is None  # NaN is stored as null: card.json stays valid JSON
    json.loads((tmp_path / v1 / "card.json").read_text())
    files = {p.name for p in (tmp_path / v1).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".pt", ".pth", ".bin", ".pkl")) for f in files)
    model.eval()
    images = [Image.new("RGB", (20, 20), "red"), None]
    a = Predictor(model, tok, loaded.card).predict(["x y", "z"], images)
    b = Predictor(loaded.model, loaded.tokenizer, loaded.card).predict(["x y", "z"], images)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]


def test_registry_versions_and_current_pointer(tmp_path):
    model, tok = tiny_model()
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RegistryError):
        registry.load()
    registry.save(model, tok, ModelCard(config=model.config))
    v2 = registry.save(model, tok, ModelCard(config=model.config), make_current=False)
    assert registry.versions() == ["v0001", "v0002"] and registry.current() == "v0001"
    registry.set_current(v2)
    assert registry.card().version == "v0002"
    with pytest.raises(RegistryError):
        registry.set_current("v0009")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_text_encoder_split_reproduces_the_whole_forward():
    from models.preprocess import TextPreprocessor

    model, tok = tiny_model()
    encoder = model.text_encoder.eval()
    ids, mask = TextPreprocessor(tok, 16)(["short", "a somewhat longer caption over the picture", "x y"])
    whole = encoder(ids, mask)
    split = encoder.forward_from(encoder.hidden_states_at(ids, mask, 1), mask, 1)
    real = mask.bool()
    assert torch.allclose(whole.tokens[real], split.tokens[real], atol=1e-5)
    assert torch.allclose(whole.pooled, split.pooled, atol=1e-5)
    assert encoder.supports_split(ids, mask, 1)
    # Layer 0 leaves nothing to cache; layer 2 (of 2) leaves nothing to train.
    assert not encoder.supports_split(ids, mask, 0) and not encoder.supports_split(ids, mask, 2)


def test_itm_targets_make_a_known_mismatch_a_negative_and_leave_an_unknown_pair_out():
    """Reviewed pairs are not ITM positives by default (issue 24): a pair the reviewer called
    unrelated pushes its match score down, an unanswered one is not pushed at all."""
    from models.objectives import itm_objective

    model, tok = tiny_model()
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green", "white")]
    ids, mask, pixels, present = _inputs(model, tok, ["a", "b", "c", "d"], images)
    text, image = model.encode(ids, mask, pixels)

    def own_pair_gradient(target: torch.Tensor | None) -> torch.Tensor:
        out = model.head(text, image, present)
        out.itm_logits.retain_grad()
        losses = itm_objective(model.head, out, "random", torch.Generator().manual_seed(0), None, target)
        losses["itm_loss"].backward()
        assert out.itm_logits.grad is not None
        return out.itm_logits.grad

    g = own_pair_gradient(torch.tensor([1.0, 1.0, 0.0, float("nan")]))
    assert g[0] < 0 and g[1] < 0, "a known match is pushed towards 'match'"
    assert g[2] > 0, "a pair the reviewer called unrelated is pushed towards 'mismatch'"
    assert g[3] == 0, "an unanswered reviewed pair is trained as neither"
    old = own_pair_gradient(None)  # without targets every own pair is a positive
    assert (old < 0).all()
