"""Acceptance on synthetic data with the default backbones (MiniLM-L6 + EfficientNet-Lite0,
both frozen): +ITC+ITM learns labels that need both modalities, and its ITM head tells the
generator's mismatched pairs from matched ones. Takes about two minutes on two cores."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from models.config import ModelConfig
from models.inference import Predictor
from stream.demo import synthetic_training
from trainer.fit import fit
from trainer.images import load_image
from trainer.manifest import read_manifest
from trainer.synthetic import write_synthetic

pytestmark = pytest.mark.slow


def test_default_model_learns_cross_modal_labels_and_itm(tmp_path):
    train = read_manifest(write_synthetic(tmp_path / "train", n=1000, seed=0))
    test = read_manifest(write_synthetic(tmp_path / "test", n=400, seed=1))
    fitted = fit(train, ModelConfig(), synthetic_training(), cache_dir=tmp_path / "cache")
    predictor = Predictor(fitted.model, fitted.tokenizer, fitted.card)
    preds = []
    for start in range(0, len(test), 64):
        chunk = test[start : start + 64]
        preds += predictor.predict([e.text for e in chunk], [load_image(e.image) for e in chunk])

    for task, labels in ModelConfig().tasks.items():
        truth = [labels.index(e.labels[task]) for e in test]
        guess = [int(p.tasks[task].decision) for p in preds]
        f1 = f1_score(truth, guess, average="macro")
        # Chance is about 0.5; text alone cannot exceed ~0.89 accuracy on sarcasm and the
        # image alone carries no hate signal, so this needs the pair.
        assert f1 > 0.8, f"{task}: macro-F1 {f1:.3f}"

    mismatched = np.array([e.meta["mismatched"] for e in test])
    match = np.array([p.itm_match for p in preds], dtype=float)
    auroc = roc_auc_score(~mismatched, match)
    assert mismatched.sum() >= 20
    assert auroc > 0.9, f"ITM AUROC on matched vs mismatched pairs: {auroc:.3f}"
