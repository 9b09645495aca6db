"""The linear probe blended with the fusion head: the folded probe is sklearn's probe, the
blend is the mean of the two probabilities, cards from before the blend still serve the probe
alone, and `fit` measures everything on validation with the training-split probe before it
refits the served probe on training + validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.card import ModelCard
from models.config import ModelConfig
from models.inference import Predictor
from models.registry import ModelRegistry
from modstream.manifest import Example
from tests.tiny import tiny_config, tiny_model
from trainer.calibration import calibrate
from trainer.features import FrozenSequences, LiveFeatures, LoadedInputs, subset
from trainer.fit import fit_features, set_probes, strata, stratified_split
from trainer.probe import fit_probe, fit_probes, fold_standardisation, macro_f1, make_classifier
from trainer.train import TrainConfig, evaluate_split

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


def test_probe_tasks_must_be_tasks_of_the_model():
    with pytest.raises(ValueError, match="probe_tasks"):
        tiny_config(probe_tasks=["spam"])
    with pytest.raises(ValueError, match="probe_tasks"):
        tiny_config(probe_tasks=["hate", "hate"])


BLEND_HATE = dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": 2.5})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(probe_mode="mix"), "probe_mode must be one of"),
        (dict(probe_tasks=["hate"], probe_mode="blend"), r"missing \['hate'\]"),
        (
            dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": 1.0, "sarcasm": 1.0}),
            r"not a probe task \['sarcasm'\]",
        ),
        (dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": 0.0}), "finite number > 0"),
        (dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": -1.0}), "finite number > 0"),
        (dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": math.nan}), "finite number > 0"),
        (dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": math.inf}), "finite number > 0"),
        (dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": "2"}), "finite number > 0"),
        (dict(probe_tasks=["hate"], probe_mode="blend", head_temperatures={"hate": True}), "finite number > 0"),
        (dict(probe_mode="blend", head_temperatures=[1.0]), "must map task"),
        (dict(probe_tasks=["hate"], head_temperatures={"hate": 1.0}), "only read in probe_mode 'blend'"),
    ],
)
def test_bad_probe_modes_and_head_temperatures_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_head_temperatures_from_a_card_become_floats():
    config = ModelConfig.from_dict({**tiny_config().to_dict(), **BLEND_HATE, "head_temperatures": {"hate": 2}})
    assert config.head_temperatures == {"hate": 2.0} and isinstance(config.head_temperatures["hate"], float)


def _posts(n: int = 4) -> tuple[list[str], list[Image.Image | None]]:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n - 1)]
    return [f"post number {i}" for i in range(n)], [*images, None]


def _encoded(model, tokenizer):
    texts, _ = _posts()
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    pixels = torch.randn(len(texts), 3, 32, 32, generator=torch.Generator().manual_seed(2))
    present = torch.tensor([True, True, True, False])
    with torch.no_grad():
        text, image = model.encode(ids["input_ids"], ids["attention_mask"], pixels)
    return text, image, present


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_blend_logits_are_the_log_of_the_mean_of_the_head_and_probe_probabilities():
    model, tokenizer = tiny_model(tiny_config(**BLEND_HATE))
    model.eval()
    with torch.no_grad():
        model.head.probes["hate"].bias.copy_(torch.tensor([1.5, -0.5]))  # probe and head disagree
    seen: dict[str, torch.Tensor] = {}
    for name, module in (
        ("hate head", model.head.heads["hate"]),
        ("hate probe", model.head.probes["hate"]),
        ("sarcasm head", model.head.heads["sarcasm"]),
    ):
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    text, image, present = _encoded(model, tokenizer)
    with torch.no_grad():
        out = model.head(text, image, present)
    head = _softmax(seen["hate head"].double().numpy() / 2.5)
    probe = _softmax(seen["hate probe"].double().numpy())
    assert not np.allclose(head, probe, atol=0.05)  # a mean of two different distributions
    expected = np.log(0.5 * head + 0.5 * probe)
    np.testing.assert_allclose(out.task_logits["hate"].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.task_logits["sarcasm"], seen["sarcasm head"])  # no probe: the head alone


def test_the_blend_and_the_pooled_features_are_float32_under_autocast():
    model, tokenizer = tiny_model(tiny_config(**BLEND_HATE))
    model.eval()
    text, image, present = _encoded(model, tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.head(text, image, present)
    assert out.task_logits["hate"].dtype == torch.float32 and out.pooled is not None
    assert out.pooled.dtype == torch.float32
    assert torch.isfinite(out.task_logits["hate"]).all()


@pytest.mark.parametrize("overrides", [{}, BLEND_HATE, dict(probe_tasks=["hate"])])
def test_every_forward_returns_the_pooled_probe_inputs(overrides):
    model, tokenizer = tiny_model(tiny_config(**overrides))
    model.eval()
    text, image, present = _encoded(model, tokenizer)
    with torch.no_grad():
        out = model.head(text, image, present)
    assert out.pooled is not None and out.pooled.shape == (4, text.pooled.shape[1] + image.pooled.shape[1])
    torch.testing.assert_close(out.pooled, model.head.probe_inputs(text, image, present))
    assert torch.all(out.pooled[3, text.pooled.shape[1] :] == 0)  # the text-only post


def test_a_card_from_before_the_blend_still_serves_the_probe_alone(tmp_path):
    model, tokenizer = tiny_model(tiny_config(probe_tasks=["hate"]))
    registry = ModelRegistry(tmp_path)
    version = registry.save(model, tokenizer, ModelCard(config=model.config))
    card_path = tmp_path / version / "card.json"
    card = json.loads(card_path.read_text())
    assert card["config"]["probe_tasks"] == ["hate"]
    for key in ("probe_mode", "head_temperatures"):  # the code before the blend wrote neither
        del card["config"][key]
    card_path.write_text(json.dumps(card))
    loaded = registry.load(version)
    assert loaded.card.config.probe_mode == "replace" and loaded.card.config.head_temperatures == {}
    texts, images = _posts()
    before = Predictor(model, tokenizer, loaded.card).predict(texts, images)
    predictor = Predictor(loaded.model, loaded.tokenizer, loaded.card)
    after = predictor.predict(texts, images)
    for a, b in zip(before, after, strict=True):
        for task in TASKS:
            assert a.tasks[task].probs == pytest.approx(b.tasks[task].probs, abs=1e-6)
    loaded.model.eval()
    text, image, present = _encoded(loaded.model, loaded.tokenizer)
    with torch.no_grad():
        out = loaded.model.head(text, image, present)
        assert torch.equal(out.task_logits["hate"], loaded.model.head.probes["hate"](out.pooled))
    # The probe decides hate, the fusion head's hate output is not read: biases pulling the
    # two opposite ways give the probe's answer, both ways round.
    head, probe = loaded.model.head.heads["hate"][1], loaded.model.head.probes["hate"]
    for answer, push in (("hateful", 50.0), ("not_hateful", -50.0)):
        with torch.no_grad():
            head.bias.copy_(torch.tensor([push, -push]))
            probe.bias.copy_(torch.tensor([-push, push]))
        assert {p.tasks["hate"].label for p in predictor.predict(texts, images)} == {answer}


def test_a_blending_model_round_trips_through_the_registry_and_the_predictor(tmp_path):
    model, tokenizer = tiny_model(tiny_config(**BLEND_HATE))
    registry = ModelRegistry(tmp_path)
    loaded = registry.load(registry.save(model, tokenizer, ModelCard(config=model.config)))
    assert loaded.card.config == model.config
    assert json.loads((loaded.path / "card.json").read_text())["config"]["head_temperatures"] == {"hate": 2.5}
    texts, images = _posts()
    before = Predictor(model, tokenizer, loaded.card).predict(texts, images)
    after = Predictor(loaded.model, loaded.tokenizer, loaded.card).predict(texts, images)
    for a, b in zip(before, after, strict=True):
        for task in TASKS:
            assert a.tasks[task].probs == pytest.approx(b.tasks[task].probs, abs=1e-6)


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
    for key in ("probe_tasks", "probe_mode", "head_temperatures"):
        del card["config"][key]
    card_path.write_text(json.dumps(card))
    loaded = registry.load(version)  # strict state-dict loading: no probe weights expected
    assert loaded.card.config.probe_tasks == [] and len(loaded.model.head.probes) == 0


def _separable_features(
    model, tokenizer, n: int = 120, signal: float = 1.0, noise: float = 0.1
) -> tuple[LoadedInputs, LiveFeatures]:
    """Frozen features where pooled text dimension 0 carries sarcasm and dimension 1 hate
    (linearly separable unless `noise` drowns `signal`), half the posts with an image;
    text-only posts' image tokens are noise."""
    g = torch.Generator().manual_seed(0)
    sarcasm = torch.arange(n) % 2
    hate = (torch.arange(n) // 2) % 2
    text = torch.randn(n, 5, 24, generator=g) * noise
    text[:, :, 0] += signal * (sarcasm * 2 - 1).unsqueeze(1).float()
    text[:, :, 1] += signal * (hate * 2 - 1).unsqueeze(1).float()
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


def _probe_data(model, features, inputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every post's probe inputs and labels, computed apart from fit's own helpers."""
    text, image, present = features.batch(list(range(len(inputs.examples))))
    with torch.no_grad():
        x = model.head.probe_inputs(text, image, present).numpy()
    y = {t: np.array([names.index(ex.labels[t]) for ex in inputs.examples]) for t, names in TASKS.items()}
    return x, y


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


FROZEN = TrainConfig(epochs=1, lr=0.0, itm_finish_epochs=0, modality_dropout=0.0)


def test_fit_serves_the_blend_with_the_probe_refitted_on_training_and_validation(tmp_path):
    # The model starts out serving a probe instead of the sarcasm head (a model from before the
    # blend, retrained): fit trains the heads and blends every task afresh.
    model, tokenizer = tiny_model(tiny_config(probe_tasks=["sarcasm"]))
    _wire_heads(model)
    inputs, features = _separable_features(model, tokenizer)
    fitted = fit_features(model, tokenizer, inputs, features, FROZEN)
    card, config = fitted.card, fitted.model.config
    assert card.metrics["task_source"] == {"hate": "blend", "sarcasm": "blend"}
    assert config.probe_mode == "blend" and config.probe_tasks == ["hate", "sarcasm"]
    assert card.config == config and set(config.head_temperatures) == set(TASKS)
    blend = card.metrics["probe_blend"]
    assert blend["enabled"] and blend["refit_on"] == "training + validation" and blend["n_refit"] == 120
    assert blend["head_temperatures"] == config.head_temperatures
    f1 = blend["validation_macro_f1"]
    # The constant hate head answers one class; blended with a perfect probe it is perfect.
    assert f1["hate"]["head"] < 0.5 and f1["hate"]["probe"] == 1.0 and f1["hate"]["blend"] == 1.0
    assert card.metrics["macro_f1"]["hate"] == 1.0
    # The served probes are fitted on every post (training + validation), not the training split.
    x, y = _probe_data(fitted.model, features, inputs)
    train_idx, _ = stratified_split(len(x), strata(inputs.examples, TASKS), 0.15, FROZEN.seed)
    for task in TASKS:
        whole, train_only = fit_probe(x, y[task], 2), fit_probe(x[train_idx], y[task][train_idx], 2)
        assert whole is not None and train_only is not None
        served = fitted.model.head.probes[task].weight.detach().double().numpy()
        np.testing.assert_allclose(served, whole.weight, rtol=1e-4, atol=1e-6)
        assert not np.allclose(served, train_only.weight, rtol=1e-2, atol=1e-4)
    # The card and weights round-trip, and the reloaded model serves what fit served.
    registry = ModelRegistry(tmp_path)
    loaded = registry.load(registry.save(fitted.model, tokenizer, card))
    assert loaded.card.config == config
    text, image, present = features.batch(list(range(len(inputs.examples))))
    with torch.no_grad():
        out = loaded.model.head(text, image, present).task_logits
        for task in TASKS:
            torch.testing.assert_close(out[task], fitted.model.head(text, image, present).task_logits[task])


def test_fit_calibrates_and_scores_the_blend_with_the_training_split_probe():
    model, tokenizer = tiny_model(tiny_config())
    _wire_heads(model)
    inputs, features = _separable_features(model, tokenizer, signal=0.3, noise=1.0)
    fitted = fit_features(model, tokenizer, inputs, features, FROZEN)
    card = fitted.card
    x, y = _probe_data(fitted.model, features, inputs)
    train_idx, val_idx = stratified_split(len(x), strata(inputs.examples, TASKS), 0.15, FROZEN.seed)
    early = fit_probes(x[train_idx], {t: v[train_idx] for t, v in y.items()}, TASKS)
    late = fit_probes(x, y, TASKS)
    f1 = card.metrics["probe_blend"]["validation_macro_f1"]
    for task, names in TASKS.items():
        assert f1[task]["probe"] == macro_f1(early[task].logits(x[val_idx]), y[task][val_idx], names)

    def val_temperatures(probes):
        served = fitted.model
        set_probes(served, probes, served.config.head_temperatures)
        val_labels = {t: torch.as_tensor(v[val_idx]) for t, v in y.items()}
        return calibrate(evaluate_split(served, subset(features, val_idx), val_labels, amp=FROZEN.amp), TASKS)

    # The card's temperatures fit the blend with the training-split probe, not the refitted one.
    assert card.temperatures == pytest.approx(val_temperatures(early).temperatures, rel=1e-6)
    assert card.temperatures != pytest.approx(val_temperatures(late).temperatures, rel=1e-3)


def test_fit_without_the_blend_serves_every_head():
    model, tokenizer = tiny_model(tiny_config(probe_tasks=["hate"]))
    _wire_heads(model)
    inputs, features = _separable_features(model, tokenizer)
    fitted = fit_features(model, tokenizer, inputs, features, FROZEN, probe_blend=False)
    assert fitted.card.metrics["task_source"] == {"hate": "head", "sarcasm": "head"}
    assert fitted.model.config.probe_tasks == [] and len(fitted.model.head.probes) == 0
    assert not fitted.card.metrics["probe_blend"]["enabled"]
    assert fitted.card.metrics["probe_blend"]["validation_macro_f1"] == {}
    assert isinstance(fitted.model.config, ModelConfig)
