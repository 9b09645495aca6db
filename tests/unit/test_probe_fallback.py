"""The linear-probe fallback: the folded probe is sklearn's probe, a model serving it
round-trips through the registry and the Predictor, and `fit` serves it exactly where it
validates better than the head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.card import ModelCard
from models.config import ModelConfig
from models.inference import Predictor
from models.registry import ModelRegistry
from tests.tiny import tiny_config, tiny_model
from trainer.features import FrozenSequences, LiveFeatures, LoadedInputs
from trainer.fit import fit_features
from trainer.manifest import Example
from trainer.probe import choose, fit_probe, fold_standardisation, make_classifier
from trainer.train import TrainConfig

TASKS = {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]}


@pytest.mark.parametrize("n_classes", [2, 3])
def test_the_folded_linear_layer_reproduces_sklearns_predict_proba(n_classes):
    rng = np.random.default_rng(0)
    # Features far from standard (offsets, scales from 0.01 to 100), so a wrong fold shows.
    x = rng.normal(size=(300, 12)) * np.logspace(-2, 2, 12) + rng.normal(size=12) * 5
    z = (x - x.mean(0)) / x.std(0)
    y = (z[:, 0] + z[:, 5] + rng.normal(size=300) * 0.5 > 0).astype(int)
    if n_classes == 3:
        y = y + (x[:, 11] > np.median(x[:, 11])).astype(int)
    pipeline = make_classifier()
    pipeline.fit(x, y)  # type: ignore[attr-defined]
    expected = pipeline.predict_proba(x)  # type: ignore[attr-defined]
    probe = fold_standardisation(pipeline[0], pipeline[1])  # type: ignore[index]
    layer = probe.to_linear()
    with torch.no_grad():
        served = torch.softmax(layer(torch.as_tensor(x, dtype=torch.float32)), dim=-1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)
    refit = fit_probe(x, y, n_classes)
    assert refit is not None
    np.testing.assert_allclose(refit.weight, probe.weight)


def test_no_probe_when_the_training_rows_lack_a_class():
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert fit_probe(x, np.array([0, 1] * 10), 3) is None
    assert fit_probe(x, np.array([-100] * 10 + [0] * 10), 2) is None  # unlabelled rows do not count


def test_the_probe_must_win_by_more_than_the_margin():
    labels = {"hate": np.array([0, 0, 1, 1])}
    right, wrong = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), np.zeros((4, 2))
    tasks = {"hate": TASKS["hate"]}
    assert choose({"hate": wrong}, {"hate": right}, labels, tasks)["hate"].serve_probe
    assert not choose({"hate": right}, {"hate": right}, labels, tasks)["hate"].serve_probe  # a tie keeps the head
    assert not choose({"hate": right}, {}, labels, tasks)["hate"].serve_probe


def test_probe_tasks_must_be_tasks_of_the_model():
    with pytest.raises(ValueError, match="probe_tasks"):
        tiny_config(probe_tasks=["spam"])
    with pytest.raises(ValueError, match="probe_tasks"):
        tiny_config(probe_tasks=["hate", "hate"])


def _posts(n: int = 4) -> tuple[list[str], list[Image.Image | None]]:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n - 1)]
    return [f"post number {i}" for i in range(n)], [*images, None]


def test_a_model_serving_a_probe_round_trips_through_the_registry_and_the_predictor(tmp_path):
    model, tokenizer = tiny_model(tiny_config(probe_tasks=["hate"]))
    registry = ModelRegistry(tmp_path)
    version = registry.save(model, tokenizer, ModelCard(config=model.config))
    loaded = registry.load(version)
    assert loaded.card.config.probe_tasks == ["hate"]
    assert json.loads((loaded.path / "card.json").read_text())["config"]["probe_tasks"] == ["hate"]
    texts, images = _posts()
    before = Predictor(model, tokenizer, loaded.card).predict(texts, images)
    predictor = Predictor(loaded.model, loaded.tokenizer, loaded.card)
    after = predictor.predict(texts, images)
    for a, b in zip(before, after, strict=True):
        for task in TASKS:
            assert a.tasks[task].probs == pytest.approx(b.tasks[task].probs, abs=1e-6)
    # The probe decides hate, the fusion head's hate output is not read: biases pulling the
    # two opposite ways give the probe's answer, both ways round.
    head, probe = loaded.model.head.heads["hate"][1], loaded.model.head.probes["hate"]
    for answer, push in (("hateful", 50.0), ("not_hateful", -50.0)):
        with torch.no_grad():
            head.bias.copy_(torch.tensor([push, -push]))
            probe.bias.copy_(torch.tensor([-push, push]))
        assert {p.tasks["hate"].label for p in predictor.predict(texts, images)} == {answer}


def test_a_text_only_post_reads_zeros_as_image_features():
    model, tokenizer = tiny_model(tiny_config(probe_tasks=["hate"]))
    model.eval()
    ids = tokenizer(["a post"], return_tensors="pt")
    pixels = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    absent = torch.tensor([False])
    with torch.no_grad():
        out = [model(ids["input_ids"], ids["attention_mask"], p, absent).task_logits["hate"] for p in pixels]
        text, image = model.encode(ids["input_ids"], ids["attention_mask"], pixels[0])
        x = model.head.probe_inputs(text, image, absent)
    torch.testing.assert_close(out[0], out[1])
    assert torch.all(x[:, text.pooled.shape[1] :] == 0)


def test_a_card_from_before_probe_tasks_loads(tmp_path):
    model, tokenizer = tiny_model()
    registry = ModelRegistry(tmp_path)
    version = registry.save(model, tokenizer, ModelCard(config=model.config))
    card_path = tmp_path / version / "card.json"
    card = json.loads(card_path.read_text())
    del card["config"]["probe_tasks"]
    card_path.write_text(json.dumps(card))
    loaded = registry.load(version)  # strict state-dict loading: no probe weights expected
    assert loaded.card.config.probe_tasks == [] and len(loaded.model.head.probes) == 0


def _separable_features(model, tokenizer, n: int = 120) -> tuple[LoadedInputs, LiveFeatures]:
    """Frozen features where pooled text dimension 0 carries sarcasm and dimension 1 hate
    (both linearly separable), half the posts with an image; text-only posts' image tokens are noise."""
    g = torch.Generator().manual_seed(0)
    sarcasm = torch.arange(n) % 2
    hate = (torch.arange(n) // 2) % 2
    text = torch.randn(n, 5, 24, generator=g) * 0.1
    text[:, :, 0] += (sarcasm * 2 - 1).unsqueeze(1).float()
    text[:, :, 1] += (hate * 2 - 1).unsqueeze(1).float()
    image = torch.randn(n, 4, 20, generator=g)
    blank = Image.new("RGB", (32, 32))
    examples = [
        Example(
            f"p{i}",
            f"post {i}",
            None,
            {"hate": TASKS["hate"][int(hate[i])], "sarcasm": TASKS["sarcasm"][int(sarcasm[i])]},
        )
        for i in range(n)
    ]
    images: list[Image.Image | None] = [blank if i % 4 < 2 else None for i in range(n)]
    inputs = LoadedInputs(examples, images, [None] * n)
    frozen_text = FrozenSequences(text.half(), torch.ones(n, 5, dtype=torch.bool))
    frozen_image = FrozenSequences(image.half(), torch.ones(n, 4, dtype=torch.bool))
    features = LiveFeatures(
        model, tokenizer, inputs, torch.device("cpu"), frozen_text=frozen_text, frozen_image=frozen_image
    )
    return inputs, features


def _wire_heads(model) -> None:
    """Hate's head answers a constant (all weights 0); sarcasm's reads pooled text dimension 0
    through its ITC projection, so it is already perfect. lr 0 keeps both as they are."""
    head = model.head
    d = model.config.fusion_dim
    with torch.no_grad():
        head.text_itc.weight.zero_()
        head.text_itc.bias.zero_()
        head.text_itc.weight[0, 0] = 1.0
        for task in TASKS:
            head.heads[task][1].weight.zero_()
            head.heads[task][1].bias.zero_()
        head.heads["sarcasm"][1].weight[1, d] = 5.0
        head.heads["sarcasm"][1].weight[0, d] = -5.0


def test_fit_serves_the_probe_only_where_it_validates_better(tmp_path):
    # The model starts out serving a probe for sarcasm (a retrained model): fit chooses afresh.
    config = tiny_config(probe_tasks=["sarcasm"])
    model, tokenizer = tiny_model(config)
    _wire_heads(model)
    inputs, features = _separable_features(model, tokenizer)
    cfg = TrainConfig(epochs=1, lr=0.0, itm_finish_epochs=0, modality_dropout=0.0)
    fitted = fit_features(model, tokenizer, inputs, features, cfg)
    card = fitted.card
    assert card.metrics["task_source"] == {"hate": "probe", "sarcasm": "head"}
    assert fitted.model.config.probe_tasks == ["hate"] and list(fitted.model.head.probes) == ["hate"]
    f1 = card.metrics["probe_fallback"]["validation_macro_f1"]
    assert f1["hate"]["probe"] == 1.0 and f1["hate"]["head"] < 0.5  # the constant head answers one class
    assert f1["sarcasm"]["head"] == 1.0 >= f1["sarcasm"]["probe"]  # not better: the head serves
    # Calibration and the card's scores were computed on the served (probe) logits.
    assert card.metrics["macro_f1"]["hate"] == 1.0
    # The card and weights round-trip, and the reloaded model scores what fit served.
    loaded = ModelRegistry(tmp_path).load(ModelRegistry(tmp_path).save(fitted.model, tokenizer, card))
    assert loaded.card.config.probe_tasks == ["hate"]
    every = list(range(len(inputs.examples)))
    text, image, present = features.batch(every)
    with torch.no_grad():
        served = loaded.model.head(text, image, present).task_logits["hate"]
        torch.testing.assert_close(served, fitted.model.head(text, image, present).task_logits["hate"])
    truth = torch.tensor([TASKS["hate"].index(ex.labels["hate"]) for ex in inputs.examples])
    assert (served.argmax(1) == truth).float().mean() > 0.9  # the constant head is right on half


def test_fit_without_the_fallback_keeps_every_head():
    model, tokenizer = tiny_model(tiny_config())
    _wire_heads(model)
    inputs, features = _separable_features(model, tokenizer)
    cfg = TrainConfig(epochs=1, lr=0.0, itm_finish_epochs=0, modality_dropout=0.0)
    fitted = fit_features(model, tokenizer, inputs, features, cfg, probe_fallback=False)
    assert fitted.card.metrics["task_source"] == {"hate": "head", "sarcasm": "head"}
    assert fitted.model.config.probe_tasks == [] and not fitted.card.metrics["probe_fallback"]["enabled"]
    assert isinstance(fitted.model.config, ModelConfig)
