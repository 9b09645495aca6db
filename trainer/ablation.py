"""`modstream ablate`: which auxiliary losses help, over stratified k folds x seeds.

Every variant trains on the same folds and seeds, so differences to task-only are paired.
Frozen encoders are encoded once (content-hash cache) and shared by every run; only the
small head trains per run, which keeps a 5x3 grid within minutes on a CPU. Variants that
fine-tune the text encoder's top layers share the cached output of its frozen layers; the
whole text encoder fine-tuned, or the image encoder's last blocks, run live on a copy per
run. A loss-weight sweep adds task+ITC+ITM variants with their own auxiliary weight.

Finished runs are appended to out_dir/runs.jsonl, so a stopped grid resumes; out_dir/grid.json
records what those runs depend on, and a resume with another configuration or data is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.losses import IGNORE_INDEX, NegativeSampling
from models.objectives import ObjectiveConfig
from models.registry import build_model
from modstream.manifest import Example
from trainer.calibration import calibrate, score
from trainer.features import (
    FeatureStore,
    LiveFeatures,
    LoadedInputs,
    build_features,
    encoder_key,
    image_prefix,
    load_inputs,
    subset,
    text_prefix,
)
from trainer.fit import data_digest, merge_rare, pick_device, strata, stratified_split
from trainer.stats import (
    corrected_paired_t,
    format_diff,
    format_mean_std,
    mean_std,
    paired_difference,
)
from trainer.train import TrainConfig, evaluate_split, label_tensors, train

log = logging.getLogger(__name__)
BASELINE = "task"


class AblationSetupError(ValueError):
    """A grid that cannot run as asked (a weight a variant needs is 0, an unknown variant
    name, a folder made for another grid); the message says what to change."""


@dataclass(frozen=True)
class LossWeights:
    task: float = 0.8
    itc: float = 0.1
    itm: float = 0.1


@dataclass(frozen=True)
class Variant:
    name: str
    itc: bool
    itm: bool
    negatives: NegativeSampling = "hard"
    # 0: frozen (cached); N: the top N text layers / last N image blocks; -1: all of it.
    text_trainable_layers: int = 0
    image_trainable_blocks: int = 0
    aux_weight: float | None = None  # the loss-weight sweep: this weight for ITC and ITM alike

    def loss_weights(self, weights: LossWeights) -> dict[str, float]:
        out = {"task_loss": weights.task}
        if self.itc:
            out["itc_loss"] = weights.itc if self.aux_weight is None else self.aux_weight
        if self.itm:
            out["itm_loss"] = weights.itm if self.aux_weight is None else self.aux_weight
        return out

    def objective(self, weights: LossWeights) -> ObjectiveConfig:
        return ObjectiveConfig(weights=self.loss_weights(weights), negatives=self.negatives)


# +ITM alone mines no hard negatives: without ITC its embedding space is untrained, so
# "hard" would be random anyway; it is labelled honestly as random.
CORE_VARIANTS = (
    Variant("task", itc=False, itm=False),
    Variant("task+itc", itc=True, itm=False),
    Variant("task+itm", itc=False, itm=True, negatives="random"),
    Variant("task+itc+itm", itc=True, itm=True, negatives="hard"),
    Variant("task+itc+itm (random neg)", itc=True, itm=True, negatives="random"),
)
WHOLE_TEXT = " (text encoder fine-tuned)"
# Suffixes naming which encoder parts train; a variant is paired with task-only on the same encoders.
_ENCODER_SUFFIX = re.compile(
    r" \((text top \d+ unfrozen|text encoder fine-tuned|image last \d+ blocks fine-tuned|image encoder fine-tuned)\)$"
)
_AUX_SUFFIX = re.compile(r" \(aux [0-9.e-]+\)$")


def _text_suffix(layers: int) -> str:
    return WHOLE_TEXT if layers < 0 else f" (text top {layers} unfrozen)"


def _image_suffix(blocks: int) -> str:
    return " (image encoder fine-tuned)" if blocks < 0 else f" (image last {blocks} blocks fine-tuned)"


def aux_name(weight: float) -> str:
    return f"task+itc+itm (aux {weight:g})"


def reference_of(name: str) -> str | None:
    """The run each variant is paired with: task-only with the same encoders, and for that
    task-only variant, the frozen one (so the table also shows what unfreezing alone does).
    The loss-weight sweep's variants are paired with frozen task-only."""
    if name == BASELINE:
        return None
    if _AUX_SUFFIX.search(name):
        return BASELINE
    match = _ENCODER_SUFFIX.search(name)
    suffix = match.group(0) if match else ""
    return BASELINE if name == BASELINE + suffix else BASELINE + suffix


def variants(
    unfreeze_text_layers: int = 0, unfreeze_image_blocks: int = 0, aux_weights: Sequence[float] = ()
) -> list[Variant]:
    """Every variant the grid can run: the core five with frozen encoders; with
    `unfreeze_text_layers` N, task-only and task+ITC+ITM with the text encoder's top N layers
    (-1: all of it) fine-tuned; likewise the image encoder's last N blocks; and one
    task+ITC+ITM per auxiliary weight of the loss-weight sweep (frozen encoders)."""
    out = list(CORE_VARIANTS)
    text = unfreeze_text_layers
    if text:
        suffix = _text_suffix(text)
        out += [
            Variant(BASELINE + suffix, itc=False, itm=False, text_trainable_layers=text),
            Variant("task+itc+itm" + suffix, itc=True, itm=True, text_trainable_layers=text),
        ]
        if text > 0:
            name = "task+itc+itm (random neg)" + suffix
            out.append(Variant(name, itc=True, itm=True, negatives="random", text_trainable_layers=text))
    if unfreeze_image_blocks:
        suffix = _image_suffix(unfreeze_image_blocks)
        out += [
            Variant(BASELINE + suffix, itc=False, itm=False, image_trainable_blocks=unfreeze_image_blocks),
            Variant("task+itc+itm" + suffix, itc=True, itm=True, image_trainable_blocks=unfreeze_image_blocks),
        ]
    out += [Variant(aux_name(w), itc=True, itm=True, aux_weight=w) for w in dict.fromkeys(aux_weights)]
    return out


@dataclass
class AblationConfig:
    folds: int = 5
    seeds: Sequence[int] = (0, 1, 2)
    task_weight: float = 0.8
    itc_weight: float = 0.1  # for the variants that train ITC (the sweep sets its own)
    itm_weight: float = 0.1
    val_fraction: float = 0.15
    review_fraction: float = 0.1
    unfreeze_text_layers: int = 0  # N: top N layers; -1: the whole text encoder
    unfreeze_image_blocks: int = 0  # N: the image encoder's last N blocks; -1: all of it
    aux_weights: Sequence[float] = ()  # the loss-weight sweep
    only: Sequence[str] = ()  # restrict to these variant names (their references are added)
    jobs: int = 1  # worker processes (CPU: one per core, each single-threaded)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.task_weight, self.itc_weight, self.itm_weight)


def _check_weight(name: str, value: float, positive: bool) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise AblationSetupError(f"{name} must be a finite number {need}, got {value}")


def select_variants(cfg: AblationConfig) -> list[Variant]:
    """The variants this grid runs, in table order: `only` (or all) plus the task-only
    variant each is paired with. Refuses weights a chosen variant cannot train with."""
    _check_weight("--task-weight (every variant trains the task)", cfg.task_weight, positive=True)
    _check_weight("--itc-weight", cfg.itc_weight, positive=False)
    _check_weight("--itm-weight", cfg.itm_weight, positive=False)
    for w in cfg.aux_weights:
        _check_weight("each of --aux-weights", w, positive=True)
    if cfg.unfreeze_text_layers < -1 or cfg.unfreeze_image_blocks < -1:
        raise AblationSetupError("--unfreeze-text-layers / --unfreeze-image-blocks take N >= 0 or 'all'")
    available = variants(cfg.unfreeze_text_layers, cfg.unfreeze_image_blocks, cfg.aux_weights)
    by_name = {v.name: v for v in available}
    unknown = [name for name in cfg.only if name not in by_name]
    if unknown:
        raise AblationSetupError(
            f"unknown variant(s) {unknown}; with these options the grid has: {', '.join(repr(n) for n in by_name)}"
        )
    wanted = set(cfg.only or by_name)
    for name in list(wanted):
        ref = reference_of(name)
        while ref is not None:  # a difference needs its reference run (and that one its own)
            wanted.add(ref)
            ref = reference_of(ref)
    chosen = [v for v in available if v.name in wanted]
    for v in chosen:
        if v.aux_weight is not None:
            continue
        for loss, uses, value, flag in (
            ("ITC", v.itc, cfg.itc_weight, "--itc-weight"),
            ("ITM", v.itm, cfg.itm_weight, "--itm-weight"),
        ):
            if uses and value == 0:
                raise AblationSetupError(
                    f"variant {v.name!r} trains {loss} but {flag} is 0; give {flag} > 0, "
                    "or leave that variant out with --only"
                )
    return chosen


def _fold_indices(
    examples: Sequence[Example], tasks: dict[str, list[str]], k: int
) -> list[tuple[list[int], list[int]]]:
    keys = merge_rare(strata(examples, tasks), k)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
    return [(tr.tolist(), te.tolist()) for tr, te in splitter.split(np.zeros(len(keys)), keys)]


def _run_key(variant: str, fold: int, seed: int) -> str:
    return f"{variant}|{fold}|{seed}"


GRID_FILE = "grid.json"
# Training options that do not change what a run computes (seeds and objectives are per run).
_NOT_IDENTITY = ("seed", "progress", "objective")


def grid_identity(
    model_config: ModelConfig, cfg: AblationConfig, inputs: LoadedInputs, model: MultimodalModel
) -> dict[str, Any]:
    """What a finished run in runs.jsonl depends on besides its (variant, fold, seed) key:
    the model and its encoder weights, the training options and loss weights, the folds and
    splits, and the data. Seeds and variants are not part of it: adding either to a grid
    reuses the runs already done."""
    train = {k: v for k, v in cfg.train.to_dict().items() if k not in _NOT_IDENTITY}
    identity = {
        "model": model_config.to_dict(),
        "encoders": {"text": encoder_key(model, "text"), "image": encoder_key(model, "image")},
        "train": train,
        "loss_weights": asdict(cfg.weights),
        "folds": cfg.folds,
        "val_fraction": cfg.val_fraction,
        "review_fraction": cfg.review_fraction,
        "data_digest": data_digest(inputs),
    }
    return dict(json.loads(json.dumps(identity)))  # as it reads back from grid.json


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def grid_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`train.lr: 0.001 -> 0.002` for every setting that differs."""
    old, new = _flatten(stored), _flatten(current)
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys if old.get(k) != new.get(k)]


def check_grid(out_dir: Path, identity: dict[str, Any]) -> None:
    """Records the grid's identity in out_dir/grid.json, or refuses to resume into a folder
    whose runs were made with another configuration or other data."""
    path, runs = out_dir / GRID_FILE, out_dir / "runs.jsonl"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            stored_identity = stored["identity"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AblationSetupError(
                f"{path} is unreadable, so the runs in {out_dir} cannot be checked; give a new --out"
            ) from None
        differences = grid_differences(stored_identity, identity)
        if differences:
            raise AblationSetupError(
                f"{out_dir} holds runs of another grid ({'; '.join(differences)}); resuming would mix them "
                "into this table: give a new --out (or put the options back to resume)"
            )
        return
    if runs.is_file() and runs.stat().st_size:
        raise AblationSetupError(
            f"{runs} was written without a {GRID_FILE} (an older modstream), so its configuration and data "
            "cannot be checked; give a new --out"
        )
    path.write_text(json.dumps({"digest": digest, "identity": identity}, indent=1) + "\n")


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    """Finished runs by key. A last line cut off mid-write (a killed run) is dropped with a
    warning and the file rewritten without it, so that run is done again and appends start
    on a fresh line; an unreadable line before the last is refused (the file was edited)."""
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.splitlines()
    done: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            key = _run_key(run["variant"], run["fold"], run["seed"])
            run["macro_f1"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise AblationSetupError(
                    f"{path}: line {number} is not a run record; remove that line to rerun the run, or give a new --out"
                ) from None
            log.warning("%s: dropping its unreadable last line (a run cut off mid-write); that run runs again", path)
            break
        done[key] = run
        kept.append(line)
    rewritten = "".join(line + "\n" for line in kept)
    if rewritten != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rewritten)
        tmp.replace(path)
    return done


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


def _finite_values(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def summarise(
    runs: list[dict[str, Any]], names: list[str], tasks: list[str], n_train: int, n_test: int
) -> dict[str, Any]:
    by_variant = {name: [r for r in runs if r["variant"] == name] for name in names}
    rows: dict[str, Any] = {}
    for name, vruns in by_variant.items():
        reference = reference_of(name)
        base = {(r["fold"], r["seed"]): r for r in by_variant.get(reference or "", [])}
        row: dict[str, Any] = {"runs": len(vruns), "tasks": {}, "reference": reference}
        for task in tasks:
            f1 = [r["macro_f1"][task] for r in vruns]
            mean, std = mean_std(f1)
            entry: dict[str, Any] = {"mean": mean, "std": std}
            lifts = _finite_values([r["routing_lift"].get(task, math.nan) for r in vruns])
            entry["routing_lift"] = mean_std(lifts) if lifts else (math.nan, math.nan)
            paired = [
                (r["macro_f1"][task], base[(r["fold"], r["seed"])]["macro_f1"][task])
                for r in vruns
                if (r["fold"], r["seed"]) in base
            ]
            if paired:
                a, b = [p[0] for p in paired], [p[1] for p in paired]
                entry["diff"] = paired_difference(a, b).to_dict()
                entry["diff_corrected"] = corrected_paired_t(a, b, n_train, n_test).to_dict()
            row["tasks"][task] = entry
        aurocs = _finite_values([r["itm_auroc"] for r in vruns])
        row["itm_auroc"] = mean_std(aurocs) if aurocs else (math.nan, math.nan)
        row["seconds_per_run"] = float(np.mean([r["seconds"] for r in vruns])) if vruns else math.nan
        rows[name] = row
    return {"variants": rows, "tasks": tasks}


def markdown(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    head = ["variant"] + [f"{t} macro-F1" for t in tasks] + ["paired with"]
    head += [f"{t} Δ [95% CI] (wins)" for t in tasks]
    head += ["ITM AUROC"] + [f"{t} routing lift" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary["variants"].items():
        cells = [name]
        cells += [format_mean_std(row["tasks"][t]["mean"], row["tasks"][t]["std"]) for t in tasks]
        cells.append(row.get("reference") or "—")
        for t in tasks:
            diff = row["tasks"][t].get("diff")
            if diff is None:
                cells.append("—")
            else:
                from trainer.stats import PairedDiff

                cells.append(f"{format_diff(PairedDiff(**diff))} ({diff['wins']}/{diff['n']})")
        cells.append(format_mean_std(*row["itm_auroc"]))
        for t in tasks:
            lift_mean, lift_std = row["tasks"][t]["routing_lift"]
            cells.append(format_mean_std(lift_mean, lift_std, digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    probe = summary.get("linear_probe")
    if probe:
        cells = ["linear probe (frozen pooled features, same folds)"]
        cells += [format_mean_std(*probe[t]) for t in tasks]
        cells += ["—"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    setup = summary.get("setup", {})
    if setup:
        weights = setup["loss_weights"]
        sweep = f" (sweep: ITC = ITM = {', '.join(map(str, setup['aux_weights']))})" if setup.get("aux_weights") else ""
        lines.append("")
        lines.append(
            f"{setup['n_examples']} posts ({setup['with_image']} with an image), {setup['folds']} folds x "
            f"{len(setup['seeds'])} seeds, loss weights task {weights['task']} / ITC {weights['itc']} / ITM "
            f"{weights['itm']}{sweep}, fusion {setup['model']['fusion']}, device {setup['device']} "
            f"({setup['jobs']} worker process(es)); wall time {setup['wall_seconds']:.0f} s "
            f"(of which encoding {setup['encode_seconds']:.0f} s)."
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    tasks = summary["tasks"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    width = 0.8 / len(tasks)
    for k, task in enumerate(tasks):
        means = [summary["variants"][n]["tasks"][task]["mean"] for n in names]
        stds = [summary["variants"][n]["tasks"][task]["std"] for n in names]
        ax.bar(np.arange(len(names)) + k * width, means, width, yerr=stds, capsize=3, label=task)
    ax.set_xticks(
        np.arange(len(names)) + width * (len(tasks) - 1) / 2,
        names,
        rotation=20,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("test macro-F1 (mean ± std over folds x seeds)")
    ax.set_ylim(0.4, 1.0)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(summary: dict[str, Any], runs: list[dict[str, Any]], out_dir: Path) -> None:
    from models.card import json_safe

    (out_dir / "results.json").write_text(json.dumps(json_safe({"summary": summary, "runs": runs}), indent=1))
    (out_dir / "results.md").write_text(markdown(summary))
    plot(summary, out_dir / "results.png")
