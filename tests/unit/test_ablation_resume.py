"""Resuming an ablation: only into a folder made by the same grid, and past a run cut off mid-write."""

import json
import logging

import pytest

from tests.tiny import tiny_config, tiny_model
from trainer.ablation import AblationConfig, AblationSetupError, run_ablation
from trainer.train import TrainConfig


def _grid(**overrides) -> AblationConfig:
    base = dict(folds=2, seeds=(0,), only=("task",), train=TrainConfig(epochs=1, itm_finish_epochs=0))
    base.update(overrides)
    return AblationConfig(**base)


def _run(examples, out, ablation, model_seed=0):
    cfg = tiny_config()
    return run_ablation(examples, cfg, ablation, out, model_and_tokenizer=tiny_model(cfg, seed=model_seed))


def _count_training(monkeypatch) -> list[str]:
    """Wraps the real training, recording each run's variant objective."""
    import trainer.ablation

    calls: list[str] = []
    real = trainer.ablation.train

    def counted(model, *args, **kwargs):
        calls.append("run")
        return real(model, *args, **kwargs)

    monkeypatch.setattr("trainer.ablation.train", counted)
    return calls


def test_resume_refuses_a_folder_made_with_another_config_or_data(tmp_path, synthetic_small):
    out = tmp_path / "abl"
    _run(synthetic_small, out, _grid())
    identity = json.loads((out / "grid.json").read_text())["identity"]
    assert identity["train"]["epochs"] == 1 and identity["loss_weights"]["task"] == 0.8
    assert len(identity["data_digest"]) == 64
    mismatches = [
        (dict(train=TrainConfig(epochs=2, itm_finish_epochs=0)), "train.epochs: 1 -> 2"),
        (dict(task_weight=0.5), "loss_weights.task: 0.8 -> 0.5"),
        (dict(itc_weight=0.3), "loss_weights.itc: 0.1 -> 0.3"),
        (dict(folds=3), "folds: 2 -> 3"),
        (dict(val_fraction=0.2), "val_fraction"),
        (dict(review_fraction=0.2), "review_fraction"),
    ]
    for overrides, message in mismatches:
        with pytest.raises(AblationSetupError, match="another grid") as exc:
            _run(synthetic_small, out, _grid(**overrides))
        assert message in str(exc.value) and "new --out" in str(exc.value)
    with pytest.raises(AblationSetupError, match="data_digest"):
        _run(synthetic_small[:150], out, _grid())
    with pytest.raises(AblationSetupError, match=r"encoders\.text"):
        _run(synthetic_small, out, _grid(), model_seed=1)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2  # nothing was added


def test_more_seeds_or_variants_resume_the_same_grid(tmp_path, synthetic_small, monkeypatch):
    out = tmp_path / "abl"
    _run(synthetic_small, out, _grid())
    calls = _count_training(monkeypatch)
    summary = _run(synthetic_small, out, _grid(seeds=(0, 1)))
    assert len(calls) == 2  # only seed 1 of both folds trains
    assert summary["variants"]["task"]["runs"] == 4


def test_a_run_cut_off_mid_write_is_dropped_and_run_again(tmp_path, synthetic_small, monkeypatch, caplog):
    out = tmp_path / "abl"
    _run(synthetic_small, out, _grid())
    runs = out / "runs.jsonl"
    lines = runs.read_text().splitlines()
    runs.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write, no newline
    calls = _count_training(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="trainer.ablation"):
        summary = _run(synthetic_small, out, _grid())
    assert len(calls) == 1
    assert "unreadable last line" in caplog.text
    records = [json.loads(line) for line in runs.read_text().splitlines()]
    assert sorted(r["fold"] for r in records) == [0, 1]
    assert summary["variants"]["task"]["runs"] == 2


def test_an_unreadable_line_before_the_last_is_refused(tmp_path, synthetic_small):
    out = tmp_path / "abl"
    _run(synthetic_small, out, _grid())
    runs = out / "runs.jsonl"
    lines = runs.read_text().splitlines()
    runs.write_text("{broken\n" + "\n".join(lines) + "\n")
    with pytest.raises(AblationSetupError, match="line 1 is not a run record"):
        _run(synthetic_small, out, _grid())


def test_a_folder_without_a_grid_record_is_refused(tmp_path, synthetic_small):
    out = tmp_path / "abl"
    _run(synthetic_small, out, _grid())
    (out / "grid.json").unlink()
    with pytest.raises(AblationSetupError, match=r"without a grid\.json"):
        _run(synthetic_small, out, _grid())
