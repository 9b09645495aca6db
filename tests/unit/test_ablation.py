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


def test_partly_unfrozen_variant_fine_tunes_a_copy_of_the_text_encoder(tmp_path, synthetic_small):
    import torch

    cfg = tiny_config()
    model, tok = tiny_model(cfg)
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    name = "task+itc+itm (text top 1 unfrozen)"
    ablation = AblationConfig(
        folds=2, seeds=(0,), unfreeze_text_layers=1, only=(name,), train=TrainConfig(epochs=2, itm_finish_epochs=0)
    )
    summary = run_ablation(synthetic_small, cfg, ablation, tmp_path / "abl", model_and_tokenizer=(model, tok))
    assert summary["variants"][name]["runs"] == 2
    # The shared base encoder stays frozen and untouched; each run trained its own copy.
    after = model.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_each_variant_is_paired_with_task_only_on_the_same_encoders():
    from trainer.ablation import reference_of, summarise, variants

    assert reference_of("task") is None
    assert reference_of("task+itc") == "task"
    assert reference_of("task (text top 2 unfrozen)") == "task"
    assert reference_of("task+itc+itm (random neg) (text top 2 unfrozen)") == "task (text top 2 unfrozen)"
    names = [v.name for v in variants(2)]
    assert all(reference_of(n) in (None, *names) for n in names)

    def run(variant, fold, hate):
        return {
            "variant": variant,
            "fold": fold,
            "seed": 0,
            "macro_f1": {"hate": hate},
            "routing_lift": {},
            "itm_auroc": float("nan"),
            "seconds": 1.0,
        }

    frozen, unfrozen, aux = "task", "task (text top 2 unfrozen)", "task+itc+itm (text top 2 unfrozen)"
    runs = [run(frozen, f, 0.60) for f in range(3)] + [run(unfrozen, f, 0.70) for f in range(3)]
    runs += [run(aux, f, 0.70 + 0.01 * f) for f in range(3)]
    rows = summarise(runs, [frozen, unfrozen, aux], ["hate"], n_train=80, n_test=20)["variants"]
    assert "diff" not in rows[frozen]["tasks"]["hate"]
    assert abs(rows[unfrozen]["tasks"]["hate"]["diff"]["mean"] - 0.10) < 1e-9
    assert abs(rows[aux]["tasks"]["hate"]["diff"]["mean"] - 0.01) < 1e-9  # against unfrozen task-only, not frozen


def test_a_top_n_split_that_leaves_nothing_frozen_is_refused_before_encoding(tmp_path, synthetic_small):
    import pytest

    from trainer.ablation import AblationSetupError

    cfg = tiny_config()
    ablation = AblationConfig(folds=2, seeds=(0,), unfreeze_text_layers=2, only=("task",))
    with pytest.raises(AblationSetupError, match=r"has 2 layers.*'all'"):
        run_ablation(synthetic_small, cfg, ablation, tmp_path / "abl", model_and_tokenizer=tiny_model(cfg))
    assert not (tmp_path / "abl" / "grid.json").exists()


def test_parallel_jobs_on_a_gpu_are_refused_before_touching_it(tmp_path, synthetic_small):
    import pytest

    from trainer.ablation import AblationSetupError

    cfg = tiny_config()
    ablation = AblationConfig(folds=2, seeds=(0,), only=("task",), jobs=2)
    with pytest.raises(AblationSetupError, match="--jobs 1 on a GPU"):  # raised before any CUDA call
        run_ablation(synthetic_small, cfg, ablation, tmp_path / "abl", device="cuda", model_and_tokenizer=tiny_model())
    assert not (tmp_path / "abl").exists()
