import json

import pytest

from models.objectives import ObjectiveConfig
from modstream.manifest import Example
from tests.tiny import tiny_config, tiny_model
from trainer.fit import fit
from trainer.train import TrainConfig, label_tensors


def test_fit_trains_calibrates_and_writes_curves(tmp_path, synthetic_small):
    cfg = tiny_config()
    result = fit(
        synthetic_small,
        cfg,
        TrainConfig(epochs=3, itm_finish_epochs=2),
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        model_and_tokenizer=tiny_model(cfg),
    )
    card = result.card
    assert set(card.thresholds) == set(card.temperatures) == {"hate", "sarcasm"}
    assert card.itm["trained"] and card.itm["threshold"] is not None
    assert {"itm_auroc", "routing_lift", "macro_f1", "tasks"} <= set(card.metrics)
    assert len(card.training["data_digest"]) == 64
    history = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert any("itc_loss" in row for row in history) and any("itm_finish_epoch" in row for row in history)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_itm_finishing_leaves_task_outputs_unchanged(tmp_path, synthetic_small):
    """The finishing phase trains only the ITM head: task logits must not move."""
    import torch

    from trainer.features import FeatureStore, build_features, load_inputs, subset
    from trainer.train import evaluate_split, finish_itm

    model, tok = tiny_model()
    inputs = load_inputs(synthetic_small[:64])
    features = build_features(model, tok, inputs, FeatureStore(None), torch.device("cpu"))
    labels = label_tensors(inputs.examples, model.config.tasks)
    before = evaluate_split(model, features, labels)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    cfg = TrainConfig(itm_finish_epochs=2, objective=ObjectiveConfig())
    finish_itm(model, subset(features, range(64)), labels, features, labels, cfg, torch.Generator().manual_seed(0))
    after = evaluate_split(model, features, labels)
    assert all((before.logits[t] == after.logits[t]).all() for t in before.logits)
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert changed and all(k.startswith("itm_head.") for k in changed)
    assert all(p.requires_grad for p in model.head.parameters())  # trainability restored


def test_unknown_label_value_names_the_example():
    with pytest.raises(ValueError, match=r"'p7'.*'maybe'"):
        label_tensors([Example("p7", "t", None, {"hate": "maybe"})], {"hate": ["not_hateful", "hateful"]})


def test_fit_ships_a_neighbour_index_of_the_training_split_and_a_policy_that_reads_it(tmp_path, synthetic_small):
    from models.registry import ModelRegistry
    from trainer.routing_fit import CHOSEN_POLICY

    cfg = tiny_config()
    # One epoch and a 40% validation split: a tiny model that errs on >= 20 validation decisions,
    # so the card ships a policy.
    result = fit(
        synthetic_small,
        cfg,
        TrainConfig(epochs=1, itm_finish_epochs=0),
        val_fraction=0.4,
        model_and_tokenizer=tiny_model(cfg),
    )
    index = result.model.neighbours
    assert index is not None and len(index) == result.card.training["n_train"]  # validation left out
    assert set(index.n_labels) == {"hate", "sarcasm"}
    routing = result.card.routing  # non-empty: a policy needs >= 20 validation errors
    assert routing["name"] == CHOSEN_POLICY and routing["neighbour_weight"] > 0
    loaded = ModelRegistry(tmp_path).load(ModelRegistry(tmp_path).save(result.model, result.tokenizer, result.card))
    assert loaded.model.neighbours is not None and len(loaded.model.neighbours) == len(index)


def test_a_model_with_a_neighbour_vote_is_calibrated_and_served_with_it(tmp_path, synthetic_small):
    import numpy as np
    import torch

    from models.inference import Predictor
    from models.registry import ModelRegistry
    from trainer.features import FeatureStore, build_features, load_inputs

    cfg = tiny_config(neighbour_vote=0.5)
    result = fit(synthetic_small, cfg, TrainConfig(epochs=1, itm_finish_epochs=0), model_and_tokenizer=tiny_model(cfg))
    model = result.model
    assert model.config.neighbour_vote == 0.5 and model.neighbours is not None
    inputs = load_inputs(synthetic_small)
    features = build_features(model, result.tokenizer, inputs, FeatureStore(None), torch.device("cpu"))
    text, image, present = features.batch(list(range(16)))
    with torch.no_grad():
        head = model.head(text, image, present)
        served = model.served_head(text, image, present)
    vote = np.nanmean(
        np.stack([s["hate"] for s in model.neighbours.label_shares(head.pooled, present).values()]), axis=0
    )
    expected = np.log(0.5 * torch.softmax(head.task_logits["hate"], -1).numpy() + 0.5 * vote)
    np.testing.assert_allclose(served.task_logits["hate"].numpy(), expected, atol=1e-5)
    # The registry keeps the vote: a reloaded model serves the same probabilities.
    registry = ModelRegistry(tmp_path)
    loaded = registry.load(registry.save(model, result.tokenizer, result.card))
    texts, images = [e.text for e in synthetic_small[:4]], [None] * 4
    a = Predictor(model, result.tokenizer, result.card).predict(texts, images)
    b = Predictor(loaded.model, loaded.tokenizer, loaded.card).predict(texts, images)
    assert [p.tasks["hate"].score for p in a] == pytest.approx([p.tasks["hate"].score for p in b], abs=1e-4)
