"""Routing policies measured against each other on the folds of `modstream ablate`.

Two stages, so the expensive one runs once and the cheap one can be re-run freely:

1. `run_folds`: per fold x seed, train the default recipe (task+ITC+ITM, frozen encoders
   unless the model config fine-tunes the text encoder, default TrainConfig) on the fold's
   training pool, calibrate on its validation split and record the raw outputs (task
   logits, labels, ITM match) of validation and test posts. One `.npz` per run under
   `out_dir`, so an interrupted run resumes.
2. `compare`: per run, fit every policy on validation (the combination's coefficients and
   each policy's review cut for a budget) and apply it to the test fold; then, pooling test
   posts over runs, each policy's error recall, review precision and lift at each budget,
   with bootstrap intervals over posts and the spread over runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.card import json_safe
from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.registry import build_model
from models.routing.policy import BUDGETS, PolicyInputs, RoutingPolicySpec, itm_only, review_cut, uncertainty
from modstream.manifest import Example
from trainer.ablation import _fold_indices, run_model
from trainer.calibration import Calibration, calibrate
from trainer.features import FeatureStore, LiveFeatures, build_features, load_inputs, subset
from trainer.fit import fit_features, keep_default_thresholds, pick_device, strata, stratified_split
from trainer.neighbour_fit import build_index, pooled_features
from trainer.routing_fit import (  # noqa: F401  (re-exported: the comparison's building blocks)
    CHOSEN_POLICY,
    catch_stats,
    fit_combined,
    fit_itm_weight,
    fit_neighbour_weight,
    policy_inputs,
    routing_block,
    with_neighbours,
)
from trainer.train import EvalOutput, TrainConfig, evaluate_split, label_tensors, train

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- stage 1: the folds


@dataclass
class FoldOutputs:
    """What one trained model said about its validation and test posts."""

    fold: int
    seed: int
    val: EvalOutput
    test: EvalOutput
    calibration: Calibration
    test_idx: np.ndarray
    # split -> space -> task -> [N, C]: label shares among each post's nearest training posts
    # (models/neighbours.py); empty for runs saved before the neighbour policies existed.
    shares: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    # Runs trained through fit(): the review policy its card ships (routing_block), cut included.
    card_policy: dict[str, Any] | None = None


def _save(path: Path, out: FoldOutputs) -> None:
    arrays: dict[str, np.ndarray] = {"test_idx": out.test_idx}
    for split, ev in (("val", out.val), ("test", out.test)):
        arrays[f"{split}/itm_match"] = ev.itm_match
        arrays[f"{split}/itm_swapped"] = ev.itm_swapped
        for task in ev.logits:
            arrays[f"{split}/logits/{task}"] = ev.logits[task]
            arrays[f"{split}/labels/{task}"] = ev.labels[task]
    tasks = sorted(out.calibration.temperatures)
    arrays["cal/temperatures"] = np.array([out.calibration.temperatures[t] for t in tasks])
    arrays["cal/thresholds"] = np.array([out.calibration.thresholds.get(t, math.nan) for t in tasks])
    arrays["cal/tasks"] = np.array(tasks)
    for split, by_space in out.shares.items():
        for space, by_task in by_space.items():
            for task, shares in by_task.items():
                arrays[f"{split}/shares/{space}/{task}"] = shares
    if out.card_policy is not None:
        arrays["card/policy"] = np.array(json.dumps(out.card_policy))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)  # whole file or nothing: a killed run leaves no half-written fold


def _load(path: Path, fold: int, seed: int) -> FoldOutputs:
    with np.load(path) as data:
        d = {k: data[k] for k in data.files}
    tasks = [str(t) for t in d["cal/tasks"]]

    def split(name: str) -> EvalOutput:
        return EvalOutput(
            logits={t: d[f"{name}/logits/{t}"] for t in tasks},
            labels={t: d[f"{name}/labels/{t}"] for t in tasks},
            itm_match=d[f"{name}/itm_match"],
            itm_swapped=d[f"{name}/itm_swapped"],
        )

    cal = Calibration(
        temperatures={t: float(v) for t, v in zip(tasks, d["cal/temperatures"], strict=True)},
        thresholds={t: float(v) for t, v in zip(tasks, d["cal/thresholds"], strict=True) if math.isfinite(v)},
    )
    shares: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in d.items():
        if "/shares/" in key:
            name, _, space, task = key.split("/")
            shares.setdefault(name, {}).setdefault(space, {})[task] = value
    policy = json.loads(str(d["card/policy"])) if "card/policy" in d else None
    return FoldOutputs(fold, seed, split("val"), split("test"), cal, d["test_idx"], shares, policy)


def runs_config(
    examples: Sequence[Example],
    cfg: TrainConfig,
    model: ModelConfig,
    folds: int,
    val_fraction: float,
    through_fit: bool = False,
) -> dict[str, Any]:
    """What a runs directory's outputs depend on; a resumed run must match it."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.text, str(ex.image), ex.labels], sort_keys=True, default=str).encode())
    train = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "progress")}
    # What fit() adds after training (the probes it serves, the neighbour vote) does not change
    # these runs: they are scored from the trained head alone.
    serving_only = ("probe_tasks", "probe_mode", "head_temperatures", "neighbour_vote")
    arch = {k: v for k, v in model.to_dict().items() if k not in serving_only}
    config = {"train": train, "model": arch, "folds": folds, "val_fraction": val_fraction, "data": h.hexdigest()}
    if through_fit:  # scored as served: the probes and the neighbour vote are part of the recipe
        config["model"] = model.to_dict()
        config["recipe"] = "fit (served head + probe blend, neighbour index, the card's policy)"
    return json_safe(config)


def check_runs_dir(out_dir: Path, config: dict[str, Any]) -> None:
    """Refuses to mix runs made under another configuration or data into one comparison."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); remove the directory or pick another") from exc
        if stored != json.loads(json.dumps(config)):
            changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise ValueError(f"{out_dir} holds runs made with another {', '.join(changed)}; use another --runs-dir")
    elif any(out_dir.glob("fold*-seed*.npz")):
        raise ValueError(f"{out_dir} holds runs of an unknown configuration (no config.json); use another --runs-dir")
    else:
        path.write_text(json.dumps(config, indent=1, sort_keys=True))


def run_splits(
    examples: Sequence[Example],
    tasks: dict[str, list[str]],
    folds: int,
    seeds: Sequence[int],
    val_fraction: float,
) -> dict[tuple[int, int], tuple[list[int], list[int], list[int]]]:
    """(fold, seed) -> (train, validation, test) post indices: the folds of `modstream ablate`
    and, inside each fold's training pool, the seed's stratified validation split."""
    splits = {}
    for fold, (train_pool, test_idx) in enumerate(_fold_indices(examples, tasks, folds)):
        pool_keys = strata([examples[i] for i in train_pool], tasks)
        for seed in seeds:
            tr, va = stratified_split(len(train_pool), pool_keys, val_fraction, seed)
            splits[(fold, seed)] = ([train_pool[i] for i in tr], [train_pool[i] for i in va], list(test_idx))
    return splits


def run_folds(
    examples: Sequence[Example],
    out_dir: Path,
    *,
    folds: int = 5,
    seeds: Sequence[int] = (0,),
    val_fraction: float = 0.15,
    cache_dir: Path | None = None,
    train_config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    model_and_tokenizer: tuple[MultimodalModel, Any] | None = None,
    on_run: Callable[[FoldOutputs, float], None] | None = None,
    through_fit: bool = False,
    device: str = "cpu",
) -> list[FoldOutputs]:
    """Trains (or reloads from out_dir) one model per fold x seed on `device`; the folds and the
    train/validation split inside each are those of `modstream ablate`. The model config's
    trainable encoder parts are honoured (`text_trainable_layers -1`: the whole text encoder
    fine-tuned; each run starts from the pretrained encoder). `through_fit`: each
    run is what `modstream train` ships (fit_features: the head + probe blend, the probe
    refitted on training + validation, the neighbour index and vote, the card's policy), and
    its test outputs are the served model's; otherwise the head alone, as trained."""
    cfg = train_config or TrainConfig()
    config = model_and_tokenizer[0].config if model_and_tokenizer else (model_config or ModelConfig())
    check_runs_dir(out_dir, runs_config(examples, cfg, config, folds, val_fraction, through_fit))
    paths = {(f, s): out_dir / f"fold{f}-seed{s}.npz" for f in range(folds) for s in seeds}
    if all(p.is_file() for p in paths.values()):  # re-scoring only: no model, no features
        loaded = [_load(p, f, s) for (f, s), p in paths.items()]
        if all(run.shares for run in loaded):
            return loaded
    base, tokenizer = model_and_tokenizer or build_model(model_config or ModelConfig())
    dev = pick_device(device)
    base.to(dev)
    inputs = load_inputs(examples)
    # Caches whatever stays frozen (and the frozen layers below a top-N split); the rest runs live.
    features = build_features(base, tokenizer, inputs, FeatureStore(cache_dir), dev)
    tasks = base.config.tasks
    labels = label_tensors(inputs.examples, tasks)
    outputs = []
    for (fold, seed), (train_idx, val_idx, test_idx) in run_splits(
        inputs.examples, tasks, folds, seeds, val_fraction
    ).items():
        path = paths[(fold, seed)]
        if path.is_file():
            out = _load(path, fold, seed)
            if not out.shares:  # saved before the neighbour policies: add them, no retraining
                out.shares = _neighbour_shares(base, features, labels, train_idx, val_idx, list(test_idx))
                _save(path, out)
            outputs.append(out)
            continue
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = run_model(base, base.config).to(dev)
        feats = copy.copy(features)  # shares the cached tensors, bound to this run's model
        feats.model = model
        split = (train_idx, val_idx, test_idx)
        if through_fit:
            out = _served_run(model, tokenizer, feats, labels, split, replace(cfg, seed=seed), fold)
        else:
            out = _head_run(model, feats, labels, split, replace(cfg, seed=seed), fold)
        _save(path, out)
        outputs.append(out)
        if on_run is not None:
            on_run(out, time.perf_counter() - started)
    return outputs


def saved_runs(
    examples: Sequence[Example],
    out_dir: Path,
    *,
    folds: int = 5,
    val_fraction: float = 0.15,
    train_config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    through_fit: bool = False,
    units: Sequence[tuple[int, int]] | None = None,
) -> list[FoldOutputs]:
    """The runs already saved in `out_dir` under this configuration, training nothing: to score
    a grid that a GPU lease cut short, or a baseline on the same (fold, seed) `units`."""
    config_path = out_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{out_dir}: no saved runs (no config.json)")
    cfg, model = train_config or TrainConfig(), model_config or ModelConfig()
    check_runs_dir(out_dir, runs_config(examples, cfg, model, folds, val_fraction, through_fit))
    found = {}
    for path in out_dir.glob("fold*-seed*.npz"):
        fold, seed = (int(x) for x in path.stem.removeprefix("fold").split("-seed"))
        found[(fold, seed)] = path
    wanted = list(units) if units is not None else sorted(found)
    missing = [u for u in wanted if u not in found]
    if missing or not wanted:
        raise ValueError(f"{out_dir}: no saved run for (fold, seed) {missing or 'any'}")
    return [_load(found[u], *u) for u in wanted]


Split = tuple[Sequence[int], Sequence[int], Sequence[int]]  # train, validation, test post indices


def _head_run(
    model: MultimodalModel,
    features: LiveFeatures,
    labels: Mapping[str, torch.Tensor],
    split: Split,
    cfg: TrainConfig,
    fold: int,
) -> FoldOutputs:
    """train() on the training split, calibrated on validation; the head alone on both."""
    train_idx, val_idx, test_idx = split
    (tr_f, tr_y), (va_f, va_y), (te_f, te_y) = (
        (subset(features, idx), {t: y[list(idx)] for t, y in labels.items()}) for idx in split
    )
    result = train(model, tr_f, tr_y, va_f, va_y, cfg)
    cal = calibrate(result.val, model.config.tasks)
    keep_default_thresholds(cal, va_y, cfg.threshold_min_per_class)  # as fit() does
    # Re-evaluated after the ITM finishing phase, as fit() does for the card.
    return FoldOutputs(
        fold,
        cfg.seed,
        evaluate_split(model, va_f, va_y),
        evaluate_split(model, te_f, te_y),
        cal,
        np.asarray(test_idx, dtype=np.int64),
        _neighbour_shares(model, features, labels, train_idx, val_idx, test_idx),
    )


def _served_run(
    model: MultimodalModel,
    tokenizer: Any,
    features: LiveFeatures,
    labels: Mapping[str, torch.Tensor],
    split: Split,
    cfg: TrainConfig,
    fold: int,
) -> FoldOutputs:
    """fit_features on the fold's training pool (its own stratified split of the pool is the
    run's training / validation split), then the served model on the test fold."""
    train_idx, val_idx, test_idx = split
    pool = sorted([*train_idx, *val_idx])  # the pool's order, so fit() draws the same split
    pool_features = subset(features, pool)
    fitted = fit_features(model, tokenizer, pool_features.inputs, pool_features, cfg)
    if fitted.validation is None or fitted.validation_shares is None or model.neighbours is None:
        raise RuntimeError("fit_features returned no validation outputs or neighbour index")
    for task, y in fitted.validation.labels.items():
        if not np.array_equal(y, labels[task][list(val_idx)].numpy()):
            raise RuntimeError("fit() drew another validation split than run_splits; the comparison would mix them")
    test_features = subset(features, test_idx)
    test = evaluate_split(model, test_features, {t: y[list(test_idx)] for t, y in labels.items()})
    x, present = pooled_features(features, test_idx)
    return FoldOutputs(
        fold,
        cfg.seed,
        fitted.validation,
        test,
        fitted.calibration,
        np.asarray(test_idx, dtype=np.int64),
        {"val": fitted.validation_shares, "test": model.neighbours.label_shares(x, present)},
        fitted.card.routing or None,
    )


def _neighbour_shares(
    model: MultimodalModel,
    features: LiveFeatures,
    labels: Mapping[str, torch.Tensor],
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    test_idx: Sequence[int],
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Validation and test posts' label shares among their nearest training posts, the index
    built from the run's training split as fit() builds the one a model ships."""
    x, present = pooled_features(features, [*train_idx, *val_idx, *test_idx])
    n_train, n_val = len(train_idx), len(val_idx)
    index = build_index(model, x[:n_train], present[:n_train], {t: y[list(train_idx)] for t, y in labels.items()})
    val, test = slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    return {"val": index.label_shares(x[val], present[val]), "test": index.label_shares(x[test], present[test])}


# ---------------------------------------------------------------- stage 2: the comparison


SHIPPED_ROW = "the card's policy, as fit() ships it (its own cut)"


def candidate_policies(
    val: PolicyInputs,
    val_truth: Mapping[str, Any],
    tasks: Sequence[str],
    budget: float,
    neighbour_sweep: Sequence[float] = (),
) -> dict[str, RoutingPolicySpec]:
    """Every policy compared, each fitted on validation only (coefficients and cut);
    `neighbour_sweep` adds the summed neighbour policy at each of these weights."""
    errors = {t: val_truth["errors"][t] for t in tasks}
    labelled = {t: val_truth["labelled"][t] for t in tasks}
    out = {
        "ITM only": itm_only(),
        "uncertainty (margin)": uncertainty("margin"),
        "uncertainty (entropy)": uncertainty("entropy"),
        "uncertainty (margin, summed over tasks)": uncertainty("margin", "sum"),
        "uncertainty + ITM (weight fitted)": fit_itm_weight(val, errors, labelled, budget),
        "combined (logistic)": fit_combined(val, errors, labelled, interactions=False),
        "combined (logistic + interactions)": fit_combined(val, errors, labelled, interactions=True),
    }
    if val.disagreement:
        out["uncertainty + neighbours"] = with_neighbours(val, task_combine="max")
        out["uncertainty + neighbours (summed over tasks)"] = with_neighbours(val)
        out["uncertainty + neighbours (weight fitted)"] = fit_neighbour_weight(val, errors, labelled, budget)
        for w in neighbour_sweep:
            out[f"uncertainty + {w:g} x neighbours (summed over tasks)"] = with_neighbours(val, w)
    return {name: replace(spec, cut=review_cut(spec.scores(val), budget), budget=budget) for name, spec in out.items()}


def _bootstrap(
    reviewed: np.ndarray, errors: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> dict[str, list[float]]:
    """95% percentile intervals, resampling posts within each run (stratified bootstrap)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"recall": [], "precision": [], "lift": []}
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(m, size=len(m)) for m in members])
        stats = catch_stats(reviewed[idx], errors[idx])
        for key in draws:
            if math.isfinite(stats[key]):
                draws[key].append(stats[key])
    return {
        key: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] if v else [math.nan, math.nan]
        for key, v in draws.items()
    }


def compare(
    runs: Sequence[FoldOutputs],
    tasks: Sequence[str],
    budgets: Sequence[float] = BUDGETS,
    n_boot: int = 1000,
    neighbour_sweep: Sequence[float] = (),
) -> dict[str, Any]:
    """policy -> budget -> task -> pooled stats with intervals, plus per-run values."""
    table: dict[str, Any] = {}
    coefficients: dict[str, Any] = {}
    # Runs trained through fit() carry their card's policy: measured as shipped, its own cut,
    # at the budget it was tuned for (only when every run has one, so the row pools them all).
    shipped = [RoutingPolicySpec.from_dict(r.card_policy) for r in runs if r.card_policy]
    if len(shipped) < len(runs):
        shipped = []
    for budget in budgets:
        pooled: dict[str, dict[str, list[np.ndarray]]] = {}
        per_run: dict[str, dict[str, list[float]]] = {}
        for r, run in enumerate(runs):
            val, val_truth = policy_inputs(run.val, run.calibration, tasks, run.shares.get("val"))
            test, test_truth = policy_inputs(run.test, run.calibration, tasks, run.shares.get("test"))
            specs = candidate_policies(val, val_truth, tasks, budget, neighbour_sweep)
            if shipped and math.isclose(shipped[r].budget or 0.0, budget):
                specs[SHIPPED_ROW] = shipped[r]
            rng = np.random.default_rng(1000 * r + int(budget * 100))
            reviewed_by = {name: spec.review(test) for name, spec in specs.items()}
            # Random review of the same share: the baseline lift 1.0 is the expectation; draws show its noise.
            reviewed_by["random"] = rng.random(len(test.itm)) < budget
            if budget == budgets[len(budgets) // 2]:
                coefficients[f"fold{run.fold}-seed{run.seed}"] = {
                    name: spec.to_dict()
                    for name, spec in specs.items()
                    if spec.kind == "combined" or spec.itm_weight or spec.neighbour_weight
                }
            for name, reviewed in reviewed_by.items():
                for task in tasks:
                    keep = test_truth["labelled"][task]
                    entry = pooled.setdefault(name, {}).setdefault(task, [])
                    entry.append(np.stack([reviewed[keep], test_truth["errors"][task][keep]]))
                    run_stats = catch_stats(reviewed[keep], test_truth["errors"][task][keep])
                    per_run.setdefault(name, {}).setdefault(task, []).append(run_stats["lift"])
        for name, by_task in pooled.items():
            for task, chunks in by_task.items():
                groups = np.concatenate([np.full(c.shape[1], i) for i, c in enumerate(chunks)])
                stacked = np.concatenate(chunks, axis=1).astype(bool)
                stats: dict[str, Any] = catch_stats(stacked[0], stacked[1])
                stats["ci"] = _bootstrap(stacked[0], stacked[1], groups, n_boot, seed=7)
                lifts = [v for v in per_run[name][task] if math.isfinite(v)]
                stats["lift_per_run"] = lifts
                stats["lift_run_mean_std"] = (
                    [float(np.mean(lifts)), float(np.std(lifts, ddof=1))] if len(lifts) > 1 else [math.nan, math.nan]
                )
                table.setdefault(name, {}).setdefault(f"{budget:g}", {})[task] = stats
    return json_safe({"table": table, "coefficients": coefficients})
