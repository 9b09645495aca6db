import json

from tests.tiny import tiny_config, tiny_model
from trainer.ablation import AblationConfig, run_ablation
from trainer.train import TrainConfig


def test_tiny_ablation_writes_tables_and_resumes(tmp_path, synthetic_small, monkeypatch):
    cfg = tiny_config()
    ablation = AblationConfig(
        folds=2, seeds=(0,), only=("task", "task+itc+itm"), train=TrainConfig(epochs=2, itm_finish_epochs=1)
    )
    out = tmp_path / "abl"
    summary = run_ablation(synthetic_small, cfg, ablation, out, model_and_tokenizer=tiny_model(cfg))
    assert set(summary["variants"]) == {"task", "task+itc+itm"}
    diff = summary["variants"]["task+itc+itm"]["tasks"]["hate"]["diff"]
    assert diff["n"] == 2
    md = (out / "results.md").read_text()
    assert "task+itc+itm" in md and "ITM AUROC" in md and "routing lift" in md
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4
    assert (out / "results.png").stat().st_size > 1000

    # A second call finds every run in runs.jsonl and trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("resumed ablation retrained a finished run")

    monkeypatch.setattr("trainer.ablation.train", no_training)
    again = run_ablation(synthetic_small, cfg, ablation, out, model_and_tokenizer=tiny_model(cfg))
    assert again["variants"]["task"]["tasks"]["hate"]["mean"] == summary["variants"]["task"]["tasks"]["hate"]["mean"]
