"""The recipe's variants: whole text encoder fine-tuned, the image encoder's last blocks, and
the loss-weight sweep. One tiny grid runs once; each test checks one claim about it."""

import json
import logging

import pytest
import torch

from models.encoders import layer_stack
from tests.tiny import tiny_config, tiny_model
from trainer.ablation import AblationConfig, run_ablation

WHOLE_TASK, WHOLE_AUX = "task (text encoder fine-tuned)", "task+itc+itm (text encoder fine-tuned)"
IMAGE_TASK, IMAGE_AUX = "task (image last 1 blocks fine-tuned)", "task+itc+itm (image last 1 blocks fine-tuned)"
SWEEP = ("task+itc+itm (aux 0.05)", "task+itc+itm (aux 0.3)")


def _trainable(module: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for p in module.parameters()]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, synthetic_small):
    """Runs the grid with `train` wrapped to record what each run trained and how."""
    import trainer.ablation
    from trainer.train import TrainConfig

    seen: list[dict] = []
    real = trainer.ablation.train

    def recording(model, train_features, *args, **kwargs):
        cfg = args[-1]
        text_layers = model.text_encoder.layers()
        seen.append(
            {
                "text_layers": model.config.text_trainable_layers,
                "image_blocks": model.config.image_trainable_blocks,
                "weights": dict(cfg.objective.weights),
                "text_all_trainable": all(_trainable(model.text_encoder)),
                "text_top_trainable": all(_trainable(text_layers[-1])),
                "text_bottom_trainable": any(_trainable(text_layers[0])),
                "image_layers": [any(_trainable(layer)) for layer in layer_stack(model.image_encoder.backbone)],
                "image_embeddings_trainable": any(_trainable(model.image_encoder.backbone.embeddings)),
                "text_cached": train_features.frozen_text is not None,
                "text_prefix": train_features.text_prefix is not None,
                "image_cached": train_features.frozen_image is not None,
            }
        )
        return real(model, train_features, *args, **kwargs)

    cfg = tiny_config()
    model, tok = tiny_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if "encoder" in k}
    ablation = AblationConfig(
        folds=2,
        seeds=(0,),
        task_weight=0.7,
        itc_weight=0.2,
        itm_weight=0.15,
        unfreeze_text_layers=-1,
        unfreeze_image_blocks=1,
        aux_weights=(0.05, 0.3),
        only=(WHOLE_AUX, IMAGE_AUX, *SWEEP),
        train=TrainConfig(epochs=1, itm_finish_epochs=0),
    )
    out = tmp_path_factory.mktemp("variants") / "abl"
    mp = pytest.MonkeyPatch()
    mp.setattr("trainer.ablation.train", recording)
    logger = logging.getLogger("trainer.features")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        summary = run_ablation(synthetic_small, cfg, ablation, out, model_and_tokenizer=(model, tok))
    finally:
        mp.undo()
        logger.removeHandler(handler)
    after = model.state_dict()
    return {
        "summary": summary,
        "seen": seen,
        "warnings": [r.getMessage() for r in records],
        "base_unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "results": json.loads((out / "results.json").read_text()),
    }


def _runs(grid, **match):
    return [s for s in grid["seen"] if all(s[k] == v for k, v in match.items())]


def test_references_are_added_and_every_variant_is_paired(grid):
    rows = grid["summary"]["variants"]
    assert set(rows) == {"task", WHOLE_TASK, WHOLE_AUX, IMAGE_TASK, IMAGE_AUX, *SWEEP}
    expected = {WHOLE_TASK: "task", WHOLE_AUX: WHOLE_TASK, IMAGE_TASK: "task", IMAGE_AUX: IMAGE_TASK}
    expected.update({name: "task" for name in SWEEP})
    for name, reference in expected.items():
        assert rows[name]["reference"] == reference
        assert rows[name]["tasks"]["hate"]["diff"]["n"] == 2  # both folds paired
    assert len(grid["seen"]) == 7 * 2


def test_whole_text_encoder_variant_trains_all_of_a_live_copy_without_a_split_warning(grid):
    whole = _runs(grid, text_layers=-1)
    assert len(whole) == 4
    for run in whole:
        assert run["text_all_trainable"]  # embeddings included
        assert not run["text_cached"] and not run["text_prefix"]  # text runs live
        assert run["image_cached"]  # the frozen image encoder still reads its cache
    # The tiny ViT image tower cannot split (its warning is expected); the whole text encoder must not try.
    assert not [w for w in grid["warnings"] if "text encoder cannot be split" in w]
    assert grid["base_unchanged"]  # each run fine-tuned its own copy


def test_image_blocks_variant_trains_only_the_last_blocks_live(grid):
    image = _runs(grid, image_blocks=1)
    assert len(image) == 4
    for run in image:
        assert run["image_layers"][-1] and not any(run["image_layers"][:-1])
        assert not run["image_embeddings_trainable"]
        assert not run["image_cached"] and run["text_cached"]
    frozen = _runs(grid, image_blocks=0, text_layers=0)
    assert frozen and all(r["image_cached"] and not any(r["image_layers"]) for r in frozen)


def test_given_weights_reach_each_variant_and_the_sweep_sets_its_own(grid):
    def weights_of(**match):
        return {json.dumps(r["weights"], sort_keys=True) for r in _runs(grid, **match)}

    aux = {"task_loss": 0.7, "itc_loss": 0.2, "itm_loss": 0.15}
    assert weights_of(text_layers=-1) == {json.dumps(w, sort_keys=True) for w in ({"task_loss": 0.7}, aux)}
    assert weights_of(image_blocks=1) == {json.dumps(w, sort_keys=True) for w in ({"task_loss": 0.7}, aux)}
    frozen = {w for w in weights_of(text_layers=0, image_blocks=0)}
    sweep = [{"task_loss": 0.7, "itc_loss": w, "itm_loss": w} for w in (0.05, 0.3)]
    assert frozen == {json.dumps(w, sort_keys=True) for w in [{"task_loss": 0.7}, *sweep]}
    setup = grid["results"]["summary"]["setup"]
    assert setup["loss_weights"] == {"task": 0.7, "itc": 0.2, "itm": 0.15}
    assert setup["variant_loss_weights"][SWEEP[1]] == {"task_loss": 0.7, "itc_loss": 0.3, "itm_loss": 0.3}
    assert setup["aux_weights"] == [0.05, 0.3]
