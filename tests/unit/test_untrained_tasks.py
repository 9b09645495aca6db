"""A task the training data never labels is not in the model, its card or any prediction;
a task labelled with one class only is refused; retraining ignores (and says so) reviewed
labels for a task the current model has no head for."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from models.inference import Predictor
from models.registry import ModelRegistry
from modstream.manifest import Example
from tests.tiny import tiny_config, tiny_model
from trainer.fit import TaskDataError, fit, keep_tasks, trainable_tasks
from trainer.retrain import warn_untrained_tasks
from trainer.train import TrainConfig


def only(examples: list[Example], task: str) -> list[Example]:
    return [Example(ex.id, ex.text, ex.image, {task: ex.labels[task]}, ex.meta) for ex in examples]


def test_a_model_trained_on_hate_labels_only_never_decides_sarcasm(tmp_path, synthetic_small, caplog):
    cfg = tiny_config()
    assert "sarcasm" in cfg.tasks  # the recipe asks for both tasks; the data labels one
    with caplog.at_level(logging.WARNING, logger="trainer.fit"):
        fitted = fit(
            only(synthetic_small, "hate"),
            cfg,
            TrainConfig(epochs=1, itm_finish_epochs=0),
            model_and_tokenizer=tiny_model(cfg),
        )
    assert "'sarcasm'" in caplog.text and "without it" in caplog.text
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.save(fitted.model, fitted.tokenizer, fitted.card)
    loaded = registry.load(version)  # rebuilt from the card: a kept head would fail strict loading or reappear
    assert list(loaded.card.tasks) == ["hate"]
    assert list(json.loads((loaded.path / "card.json").read_text())["tasks"]) == ["hate"]
    assert set(loaded.card.thresholds) == {"hate"}
    predictor = Predictor(loaded.model, loaded.tokenizer, loaded.card)
    image = Image.open(synthetic_small[0].image) if synthetic_small[0].image else None
    predictions = predictor.predict(["a post", "another post"], [image, None])
    for prediction in predictions:
        assert set(prediction.tasks) == {"hate"}
        assert "sarcasm" not in prediction.to_dict()["labels"]


def test_a_task_labelled_with_one_class_only_is_refused_by_name(synthetic_small):
    examples = [
        Example(ex.id, ex.text, ex.image, {"hate": ex.labels["hate"], "sarcasm": "sarcastic"}) for ex in synthetic_small
    ]
    cfg = tiny_config()
    with pytest.raises(TaskDataError, match=r"'sarcasm'.*all 160 .*'sarcastic'"):
        fit(examples, cfg, TrainConfig(epochs=1), model_and_tokenizer=tiny_model(cfg))


def test_data_labelling_no_task_is_refused():
    examples = [Example(f"p{i}", "t", None, {}) for i in range(8)]
    with pytest.raises(TaskDataError, match="any of the tasks"):
        trainable_tasks(examples, {"hate": ["not_hateful", "hateful"]})


def test_keep_tasks_removes_heads_and_refuses_a_task_the_model_lacks():
    model, _ = tiny_model()
    keep_tasks(model, {"hate": ["not_hateful", "hateful"]})
    assert list(model.head.heads) == ["hate"] and list(model.config.tasks) == ["hate"]
    assert model.head.config is model.config
    with pytest.raises(TaskDataError, match="no head for task"):
        keep_tasks(model, {"sarcasm": ["not_sarcastic", "sarcastic"]})


def test_reviewed_labels_for_a_task_the_model_lacks_are_counted_and_logged(tmp_path, caplog):
    rows = [
        {"id": "a", "text": "x", "image": None, "labels": {"hate": "hateful", "sarcasm": "sarcastic"}},
        {"id": "b", "text": "y", "image": None, "labels": {"sarcasm": "not_sarcastic"}},
        {"id": "c", "text": "z", "image": None, "labels": {"hate": "not_hateful", "sarcasm": None}},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="trainer.retrain"):
        ignored = warn_untrained_tasks(tmp_path, {"hate": ["not_hateful", "hateful"]})
    assert dict(ignored) == {"sarcasm": 2}
    assert "ignored" in caplog.text and "'sarcasm': 2" in caplog.text
