"""`modstream ablate`: which auxiliary losses help, over stratified k folds x seeds.

Every variant trains on the same folds and seeds, so differences to task-only are paired.
Frozen encoders are encoded once (content-hash cache) and shared by every run; only the
small head trains per run, which keeps a 5x3 grid within minutes on a CPU. Variants that
fine-tune the text encoder's top layers share the cached output of its frozen layers; the
whole text encoder fine-tuned, or the image encoder's last blocks, run live on a copy per
run. A loss-weight sweep adds task+ITC+ITM variants with their own auxiliary weight.

Finished runs are appended to out_dir/runs.jsonl, so a stopped grid resumes; out_dir/grid.json
records what those runs depend on, and a resume with another configuration or data is refused.

This module runs the grid (a process pool, model surgery per variant, the linear probe);
its definition and resume are in trainer/ablation_grid.py, its report in
trainer/ablation_report.py. Their public names are re-exported here.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import f1_score

from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.losses import IGNORE_INDEX
from models.registry import build_model
from modstream.manifest import Example
from trainer.ablation_grid import (
    AblationConfig,
    AblationSetupError,
    Variant,
    _fold_indices,
    _run_key,
    check_grid,
    grid_differences,
    grid_identity,
    read_runs,
    reference_of,
    select_variants,
    variants,
)
from trainer.ablation_report import markdown, plot, summarise, write_outputs
from trainer.calibration import calibrate, score
from trainer.features import (
    FeatureStore,
    LiveFeatures,
    build_features,
    image_prefix,
    load_inputs,
    subset,
    text_prefix,
)
from trainer.fit import pick_device, strata, stratified_split
from trainer.stats import mean_std
from trainer.train import evaluate_split, label_tensors, train

__all__ = [
    "AblationConfig",
    "AblationSetupError",
    "check_grid",
    "grid_differences",
    "grid_identity",
    "linear_probe",
    "markdown",
    "plot",
    "read_runs",
    "reference_of",
    "run_ablation",
    "run_model",
    "select_variants",
    "summarise",
    "variants",
    "write_outputs",
]

log = logging.getLogger(__name__)


def run_ablation(
    examples: Sequence[Example],
    model_config: ModelConfig,
    cfg: AblationConfig,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    model_and_tokenizer: tuple[MultimodalModel, Any] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes, from out_dir/runs.jsonl) the grid and writes results.{json,md,png}."""
    started = time.perf_counter()
    chosen = select_variants(cfg)
    dev = pick_device(device)
    if dev.type == "cuda" and cfg.jobs > 1:
        # _execute forks its workers after this process has initialised CUDA, which a forked
        # child cannot use; one process keeps a GPU busy with these small runs anyway.
        raise AblationSetupError(f"--jobs {cfg.jobs} forks workers, which cannot use CUDA: use --jobs 1 on a GPU")
    out_dir.mkdir(parents=True, exist_ok=True)
    base_model, tokenizer = model_and_tokenizer or build_model(model_config)
    base_model.to(dev)
    _check_trainable_parts(base_model, cfg)
    inputs = load_inputs(examples)
    # Before encoding anything: a folder made for another grid is refused, not mixed in.
    check_grid(out_dir, grid_identity(model_config, cfg, inputs, base_model))
    features = build_features(base_model, tokenizer, inputs, FeatureStore(cache_dir), dev, cfg.train.progress)
    encode_seconds = time.perf_counter() - started
    tasks = model_config.tasks
    labels = label_tensors(inputs.examples, tasks)
    folds = _fold_indices(inputs.examples, tasks, cfg.folds)
    top_layers = {v.text_trainable_layers for v in chosen if v.text_trainable_layers > 0}
    if top_layers:
        # Variants that fine-tune the text encoder's top layers share the frozen layers' cached
        # output; the whole encoder fine-tuned (-1) has nothing frozen to cache and runs live.
        (layers,) = top_layers
        store = FeatureStore(cache_dir)
        features.text_prefix = text_prefix(base_model, tokenizer, inputs, layers, store, dev, cfg.train.progress)
        encode_seconds = time.perf_counter() - started
    image_blocks = {v.image_trainable_blocks for v in chosen if v.image_trainable_blocks > 0}
    if image_blocks:
        # Likewise the image encoder's last N blocks train on the cached map below them.
        (blocks,) = image_blocks
        store = FeatureStore(cache_dir)
        features.image_prefix = image_prefix(base_model, inputs, blocks, store, dev, cfg.train.progress)
        encode_seconds = time.perf_counter() - started

    runs_path = out_dir / "runs.jsonl"
    done = read_runs(runs_path)
    jobs: list[RunSpec] = []
    for fold, (train_pool, test_idx) in enumerate(folds):
        for seed in cfg.seeds:
            pool_keys = strata([inputs.examples[i] for i in train_pool], tasks)
            tr, va = stratified_split(len(train_pool), pool_keys, cfg.val_fraction, seed)
            train_idx, val_idx = [train_pool[i] for i in tr], [train_pool[i] for i in va]
            jobs += [
                RunSpec(variant, fold, seed, train_idx, val_idx, test_idx)
                for variant in chosen
                if _run_key(variant.name, fold, seed) not in done
            ]
    shared = _Shared(base_model, features, labels, tasks, cfg)
    with runs_path.open("a") as sink:
        for run in _execute(jobs, shared, cfg.jobs):
            done[_run_key(run["variant"], run["fold"], run["seed"])] = run
            sink.write(json.dumps(run) + "\n")
            sink.flush()
            log.info(
                "%s fold %d seed %d: %s (%.0f s)",
                run["variant"],
                run["fold"],
                run["seed"],
                run["macro_f1"],
                run["seconds"],
            )
    runs = [done[_run_key(v.name, f, s)] for v in chosen for f in range(cfg.folds) for s in cfg.seeds]
    probe = linear_probe(features, labels, tasks, folds)
    summary = summarise(
        runs,
        [v.name for v in chosen],
        list(tasks),
        n_train=len(inputs.examples) * (cfg.folds - 1) // cfg.folds,
        n_test=len(inputs.examples) // cfg.folds,
    )
    summary["linear_probe"] = probe
    summary["setup"] = {
        "n_examples": len(inputs.examples),
        "with_image": int(inputs.image_present.sum()),
        "image_errors": dict(inputs.image_errors),
        "folds": cfg.folds,
        "seeds": list(cfg.seeds),
        "loss_weights": asdict(cfg.weights),
        "variant_loss_weights": {v.name: v.loss_weights(cfg.weights) for v in chosen},
        "aux_weights": list(cfg.aux_weights),
        "model": model_config.to_dict(),
        "train": cfg.train.to_dict(),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "jobs": cfg.jobs,
        "encode_seconds": round(encode_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(summary, runs, out_dir)
    return summary


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    fold: int
    seed: int
    train_idx: list[int]
    val_idx: list[int]
    test_idx: list[int]


@dataclass
class _Shared:
    """What every run reads and none modifies (frozen encoders, cached features)."""

    base_model: MultimodalModel
    features: LiveFeatures
    labels: dict[str, torch.Tensor]
    tasks: dict[str, list[str]]
    cfg: AblationConfig


_WORKER_STATE: _Shared | None = None


def _worker_init() -> None:
    # Two single-threaded processes beat one two-threaded one on these small matrices.
    torch.set_num_threads(1)


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    assert _WORKER_STATE is not None
    return _one_run(_WORKER_STATE, spec)


def _execute(jobs: list[RunSpec], shared: _Shared, workers: int) -> Iterator[dict[str, Any]]:
    """Runs in this process, or in `workers` forked processes that inherit the features
    copy-on-write (fork, not spawn: spawning would pickle hundreds of MB per worker)."""
    if workers <= 1 or len(jobs) <= 1:
        for spec in jobs:
            yield _one_run(shared, spec)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("fork")
    global _WORKER_STATE
    _WORKER_STATE = shared  # inherited by the forked workers
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = [pool.submit(_worker_run, spec) for spec in jobs]
            for future in as_completed(futures):
                yield future.result()
    finally:
        _WORKER_STATE = None


def _check_trainable_parts(model: MultimodalModel, cfg: AblationConfig) -> None:
    """A top-N split must leave something frozen below it; the whole encoder is 'all'."""
    text_layers = len(model.text_encoder.layers())
    if cfg.unfreeze_text_layers >= max(text_layers, 1):
        raise AblationSetupError(
            f"--unfreeze-text-layers {cfg.unfreeze_text_layers}: the text encoder has {text_layers} layers; "
            f"give fewer, or 'all' to fine-tune the whole text encoder"
        )


def _run_model(base_model: MultimodalModel, variant: Variant) -> MultimodalModel:
    """This run's model under the variant's trainable parts (see run_model)."""
    config = replace(
        base_model.config,
        text_trainable_layers=variant.text_trainable_layers,
        image_trainable_blocks=variant.image_trainable_blocks,
    )
    return run_model(base_model, config)


def run_model(base_model: MultimodalModel, config: ModelConfig) -> MultimodalModel:
    """One run's model: frozen encoders shared with `base_model`, a fresh copy of any encoder
    `config` fine-tunes, so every run starts from the pretrained weights, not the last run's."""
    text, image = base_model.text_encoder, base_model.image_encoder
    if config.text_trainable_layers:
        text = copy.deepcopy(text)
    if config.image_trainable_blocks:
        image = copy.deepcopy(image)
    return MultimodalModel(config, text, image)


def _run_features(features: LiveFeatures, model: MultimodalModel, variant: Variant) -> LiveFeatures:
    """A shallow copy bound to this run's model (the cached tensors are shared, not copied):
    frozen encoders read their cache; one being fine-tuned runs live (the top-N text layers
    on the cached output of the frozen ones)."""
    feats = copy.copy(features)
    feats.model = model
    if variant.text_trainable_layers == 0:
        feats.text_prefix = None
    else:
        feats.frozen_text = None
        if variant.text_trainable_layers < 0:
            feats.text_prefix = None  # the whole text encoder trains: nothing frozen to reuse
    if variant.image_trainable_blocks == 0:
        feats.image_prefix = None
    else:
        feats.frozen_image = None  # the last N blocks run on the cached map below them
        if variant.image_trainable_blocks < 0:
            feats.image_prefix = None  # the whole image encoder trains: nothing frozen to reuse
    return feats


def _one_run(shared: _Shared, spec: RunSpec) -> dict[str, Any]:
    base_model, features, labels, tasks, cfg = (
        shared.base_model,
        shared.features,
        shared.labels,
        shared.tasks,
        shared.cfg,
    )
    variant, seed = spec.variant, spec.seed
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = _run_model(base_model, variant).to(features.device)
    feats = _run_features(features, model, variant)
    train_cfg = replace(cfg.train, seed=seed, objective=variant.objective(cfg.weights))

    def pick(idx: list[int]) -> tuple[Any, dict[str, torch.Tensor]]:
        return subset(feats, idx), {t: y[idx] for t, y in labels.items()}

    (tr_f, tr_y), (va_f, va_y), (te_f, te_y) = pick(spec.train_idx), pick(spec.val_idx), pick(spec.test_idx)
    result = train(model, tr_f, tr_y, va_f, va_y, train_cfg)
    cal = calibrate(result.val, tasks, cfg.review_fraction)
    test = score(evaluate_split(model, te_f, te_y), tasks, cal, cfg.review_fraction)
    return {
        "macro_f1": test["macro_f1"],
        "itm_auroc": test["itm_auroc"],
        "routing_lift": test["routing_lift"],
        "best_epoch": result.best_epoch,
        "val_itm_auroc": result.val.itm_auroc(),
        "seconds": round(time.perf_counter() - started, 2),
        "variant": variant.name,
        "fold": spec.fold,
        "seed": seed,
    }


def linear_probe(
    features: LiveFeatures,
    labels: dict[str, torch.Tensor],
    tasks: dict[str, list[str]],
    folds: list[tuple[list[int], list[int]]],
) -> dict[str, tuple[float, float]]:
    """The bar to beat, on the same folds: class-balanced logistic regression on the
    standardised pooled features of the frozen encoders (text mean + image mean)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    everything = list(range(len(features)))
    text, image = features.text(everything), features.image(everything)
    # `present` lives on the CPU, the pooled features on the training device.
    present = features.present.unsqueeze(1).to(device=image.pooled.device, dtype=image.pooled.dtype)
    x = torch.cat([text.pooled, image.pooled * present], 1).float().cpu().numpy()
    out = {}
    for task in tasks:
        y = labels[task].numpy()
        scores = []
        for train_idx, test_idx in folds:
            tr = [i for i in train_idx if y[i] != IGNORE_INDEX]
            te = [i for i in test_idx if y[i] != IGNORE_INDEX]
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000, class_weight="balanced"))
            clf.fit(x[tr], y[tr])
            scores.append(float(f1_score(y[te], clf.predict(x[te]), average="macro")))
        out[task] = mean_std(scores)
    return out
