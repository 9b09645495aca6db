"""The neighbour index from the registry to the worker's routing decision."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.card import ModelCard
from models.inference import Predictor
from models.neighbours import NeighbourIndex, disagreement
from models.preprocess import ImagePreprocessor, TextPreprocessor
from models.registry import NEIGHBOURS_FILE, ModelRegistry, RegistryError
from models.routing.policy import NEIGHBOURS_DISAGREE, RoutingPolicySpec
from models.routing.route import RoutingPolicy, route, route_scores
from tests.tiny import tiny_model

TEXTS = ["a cat on a mat", "the dog barks", "hello world", "memes everywhere"]
COLOURS = ["red", "blue", "green", "white"]


def _pooled(model, tokenizer, texts, images):
    ids, mask = TextPreprocessor(tokenizer, model.config.max_text_length)(texts)
    enc = model.image_encoder
    pixels, present = ImagePreprocessor(enc.image_size, enc.mean, enc.std)(images)
    with torch.no_grad():
        return model.eval()(ids, mask, pixels, present).pooled.numpy(), present.numpy()


def _model_with_index():
    model, tok = tiny_model()
    images = [Image.new("RGB", (24, 24), c) for c in COLOURS]
    x, present = _pooled(model, tok, TEXTS, images)
    labels = {"hate": np.array([1, 1, 0, 0]), "sarcasm": np.array([0, 1, 0, 1])}
    model.neighbours = NeighbourIndex.build(x, present, labels, {"hate": 2, "sarcasm": 2}, model.text_encoder.dim, k=2)
    return model, tok, images


def _card(model, routing=None):
    card = ModelCard(config=model.config, thresholds={"hate": 0.5, "sarcasm": 0.5}, routing=routing or {})
    card.version = "v1"
    return card


def test_predictions_carry_the_neighbours_disagreement_with_their_label():
    model, tok, images = _model_with_index()
    queries, query_images = ["a cat on a mat", "just text"], [images[0], None]
    preds = Predictor(model, tok, _card(model)).predict(queries, query_images)
    x, present = _pooled(model, tok, queries, query_images)
    shares = model.neighbours.label_shares(x, present)
    for task in ("hate", "sarcasm"):
        decided = np.array([int(p.tasks[task].decision) for p in preds])
        expected = disagreement(shares, {task: decided})[task]
        got = [p.tasks[task].neighbour_disagreement for p in preds]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert preds[0].tasks[task].to_dict()["neighbour_disagreement"] == got[0]
    model.neighbours = None
    plain = Predictor(model, tok, _card(model)).predict(queries, query_images)
    assert plain[0].tasks["hate"].neighbour_disagreement is None
    assert "neighbour_disagreement" not in plain[0].tasks["hate"].to_dict()


def test_the_registry_keeps_the_index_with_the_weights(tmp_path):
    model, tok, images = _model_with_index()
    registry = ModelRegistry(tmp_path)
    version = registry.save(model, tok, _card(model))
    assert (tmp_path / version / NEIGHBOURS_FILE).is_file()
    loaded = registry.load(version)
    assert loaded.model.neighbours is not None and len(loaded.model.neighbours) == 4
    a = Predictor(model, tok, loaded.card).predict(TEXTS[:2], images[:2])
    b = Predictor(loaded.model, loaded.tokenizer, loaded.card).predict(TEXTS[:2], images[:2])
    for p, q in zip(a, b, strict=True):
        assert p.tasks["hate"].neighbour_disagreement == pytest.approx(q.tasks["hate"].neighbour_disagreement, abs=1e-3)
    # A model without an index stores none and loads without one.
    model.neighbours = None
    bare = registry.save(model, tok, _card(model))
    assert not (tmp_path / bare / NEIGHBOURS_FILE).exists() and registry.load(bare).model.neighbours is None


def test_a_version_whose_policy_reads_neighbours_must_have_them(tmp_path):
    model, tok, _ = _model_with_index()
    policy = RoutingPolicySpec(kind="uncertainty", neighbour_weight=2.0, cut=1.0, budget=0.1).to_dict()
    registry = ModelRegistry(tmp_path)
    version = registry.save(model, tok, _card(model, policy))
    (tmp_path / version / NEIGHBOURS_FILE).unlink()
    with pytest.raises(RegistryError, match=NEIGHBOURS_FILE):
        registry.load(version)
    (tmp_path / version / NEIGHBOURS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(RegistryError, match="cannot be read"):
        registry.load(version)


def test_the_worker_routes_a_confident_post_its_neighbours_contradict():
    model, tok, images = _model_with_index()
    policy = RoutingPolicySpec(
        kind="uncertainty", task_combine="sum", neighbour_weight=2.0, neighbour_fill=0.5, cut=1.5, budget=0.1
    ).to_dict()
    card = _card(model, policy)
    confident = {"hate": (0.99, 0.5), "sarcasm": (0.01, 0.5)}
    agreed = route_scores(0.9, confident, card, RoutingPolicy(), True, {"hate": 0.0, "sarcasm": 0.0})
    contradicted = route_scores(0.9, confident, card, RoutingPolicy(), True, {"hate": 1.0, "sarcasm": 0.0})
    assert agreed.route == "auto"
    assert contradicted.route == "review" and contradicted.reasons[0] == f"{NEIGHBOURS_DISAGREE}_hate"
    # From a Prediction, the same path the worker's pipeline takes.
    (pred,) = Predictor(model, tok, card).predict(["a cat on a mat"], [images[0]])
    decision = route(pred, card, RoutingPolicy(), True)
    expected = RoutingPolicySpec.from_dict(policy).score_post(
        pred.itm_match,
        {t: (p.score, p.threshold) for t, p in pred.tasks.items()},
        {t: p.neighbour_disagreement for t, p in pred.tasks.items()},
    )
    assert (decision.route == "review") == (expected >= 1.5)
