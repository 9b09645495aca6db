"""Does the default training recipe hold up on small data? Measured against a logistic probe.

The default recipe (`trainer.fit.fit_features` with default ModelConfig / TrainConfig, what
`modstream train` runs without flags: its own 15% validation split, checkpoint selection,
calibrated thresholds) trains on stratified subsets of each training fold of the CM-Off-Meme
sample (300 and 600 posts, and the whole fold) and is scored on the held-out fold with the
decisions the worker would make (calibrated temperature + threshold). The bar is a
class-balanced logistic regression on the same frozen pooled features (text + image, and
text only), fitted on the same subset. Folds are `trainer.ablation._fold_indices`; every
method sees the same subsets, so differences are paired by (fold, size).

    nice -n 5 .venv/bin/python studies/small_data_recipe.py [--folds 5] [--sizes 300 600 full]
        [--methods default probe probe-text] [--label before] [--out var/bench/small_data_recipe.json]

Frozen encoder outputs come from the content-hash cache (var/cache); each recipe run trains
only the head, single-threaded. `--methods` also takes candidate recipes (see RECIPES) to
compare fixes on the same subsets.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.card import json_safe
from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.losses import IGNORE_INDEX
from models.registry import build_model
from trainer.ablation import _fold_indices
from trainer.calibration import Calibration, score
from trainer.features import FeatureStore, LiveFeatures, build_features, load_inputs, subset
from trainer.fit import fit_features, merge_rare, strata
from trainer.importers import cm_off_meme_root, import_cm_off_meme
from trainer.stats import format_diff, format_mean_std, mean_std, paired_difference
from trainer.train import TrainConfig, evaluate_split, label_tensors

# Candidate recipes: TrainConfig overrides on top of the defaults ("default" = none).
# "previous" is the default before this fix: with the default objective (ITM weight 0.1)
# "auto" selected on macro-F1 + ITM AUROC, and thresholds were always tuned on validation.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "previous": {"select_on": "task+itm", "threshold_min_per_class": 0},
    "select-task": {"select_on": "task"},
    "select-auroc": {"select_on": "auroc"},
    "select-loss": {"select_on": "loss"},
    "lr3e-4": {"lr": 3e-4},
    "wd0.1": {"weight_decay": 0.1},
    "dropout0.3": {"model": {"dropout": 0.3}},
    "dropout0.5": {"model": {"dropout": 0.5}},
    # The labelled neighbours' vote mixed into the served probabilities (ModelConfig.neighbour_vote).
    "vote0.33": {"model": {"neighbour_vote": 1 / 3}},
    "vote0.5": {"model": {"neighbour_vote": 0.5}},
}
PROBES = ("probe", "probe-text")


def pooled(features: LiveFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Standardisable probe inputs: (text mean, text mean + image mean with zeros where absent)."""
    everything = list(range(len(features)))
    text, image = features.text(everything).pooled, features.image(everything).pooled
    present = features.present.unsqueeze(1).to(image.dtype)
    both = torch.cat([text, image * present], 1).float().numpy()
    return text.float().numpy(), both


def probe_f1(x: np.ndarray, y: np.ndarray, train_idx: list[int], test_idx: list[int]) -> float:
    """ablation.linear_probe's classifier (C 0.01, balanced), on one subset and test fold."""
    tr = [i for i in train_idx if y[i] != IGNORE_INDEX]
    te = [i for i in test_idx if y[i] != IGNORE_INDEX]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000, class_weight="balanced"))
    clf.fit(x[tr], y[tr])
    return float(f1_score(y[te], clf.predict(x[te]), average="macro"))


def draw(pool: list[int], keys: list[str], size: int | None, seed: int) -> list[int]:
    """A stratified subset of `pool` (the whole pool for size None)."""
    if size is None or size >= len(pool):
        return list(pool)
    picked, _ = train_test_split(
        pool, train_size=size, random_state=seed, stratify=merge_rare([keys[i] for i in pool], 2)
    )
    return sorted(picked)


def recipe_run(
    base: MultimodalModel,
    tokenizer: Any,
    features: LiveFeatures,
    labels: dict[str, torch.Tensor],
    train_idx: list[int],
    test_idx: list[int],
    train_cfg: TrainConfig,
    model_overrides: dict[str, Any],
) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    model = MultimodalModel(replace(ModelConfig(), **model_overrides), base.text_encoder, base.image_encoder)
    part = subset(features, train_idx)
    fitted = fit_features(model, tokenizer, part.inputs, part, train_cfg)
    tasks = model.config.tasks
    test = evaluate_split(model, subset(features, test_idx), {t: y[test_idx] for t, y in labels.items()})
    served = score(test, tasks, fitted.calibration)["macro_f1"]
    argmax = score(test, tasks, Calibration(temperatures=dict(fitted.calibration.temperatures)))["macro_f1"]
    return {
        "macro_f1": served,
        "macro_f1_argmax": argmax,
        "best_epoch": fitted.result.best_epoch,
        "epochs_run": sum(1 for row in fitted.result.history if "epoch" in row),
        "thresholds": fitted.calibration.thresholds,
        # Which model serves each task: the fusion head alone, or its blend with a linear probe (trainer.probe).
        "task_source": fitted.card.metrics.get("task_source"),
        "probe_blend_val_f1": fitted.card.metrics.get("probe_blend", {}).get("validation_macro_f1"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def summarise(runs: list[dict[str, Any]], methods: list[str], sizes: list[str], tasks: list[str]) -> dict[str, Any]:
    def values(method: str, size: str, task: str) -> dict[int, float]:
        return {r["fold"]: r["macro_f1"][task] for r in runs if r["method"] == method and r["size"] == size}

    out: dict[str, Any] = {}
    for size in sizes:
        for method in methods:
            row: dict[str, Any] = {}
            for task in tasks:
                mine = values(method, size, task)
                entry: dict[str, Any] = {"mean_std": mean_std(list(mine.values()))}
                for probe in PROBES:
                    if method in PROBES:
                        continue
                    other = values(probe, size, task)
                    folds = sorted(set(mine) & set(other))
                    if len(folds) >= 2:
                        diff = paired_difference([mine[f] for f in folds], [other[f] for f in folds])
                        entry[f"vs {probe}"] = diff.to_dict()
                row[task] = entry
            epochs = [
                r["best_epoch"] for r in runs if r["method"] == method and r["size"] == size and "best_epoch" in r
            ]
            if epochs:
                row["best_epoch"] = mean_std([float(e) for e in epochs])
            out[f"{method}|{size}"] = row
    return out


def table(summary: dict[str, Any], methods: list[str], sizes: list[str], tasks: list[str]) -> str:
    from trainer.stats import PairedDiff

    head = ["size", "method"] + [f"{t} macro-F1" for t in tasks]
    head += [f"{t} Δ vs {p} (wins)" for t in tasks for p in PROBES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        for method in methods:
            row = summary.get(f"{method}|{size}")
            if row is None:
                continue
            cells = [size, method] + [format_mean_std(*row[t]["mean_std"]) for t in tasks]
            for t in tasks:
                for p in PROBES:
                    d = row[t].get(f"vs {p}")
                    cells.append("—" if d is None else f"{format_diff(PairedDiff(**d))} ({d['wins']}/{d['n']})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_run_lines(spec: str) -> list[dict[str, Any]]:
    path, _, rename = spec.partition(":")
    old, _, new = rename.partition("=")
    runs = []
    for line in Path(path).read_text().splitlines():
        if line.startswith('{"method"'):
            run = json.loads(line)
            if old and run["method"] == old:
                run["method"] = new
            runs += with_threshold_variants(run)
    return runs


def with_threshold_variants(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A recipe run scored two ways: with the thresholds its validation split tuned (when it
    tuned any) and at threshold 0.5 on the calibrated probability (`macro_f1_argmax`)."""
    if "macro_f1_argmax" not in run:
        return [run]
    out = [{**run, "method": f"{run['method']} @0.5", "macro_f1": run["macro_f1_argmax"]}]
    if any(t != 0.5 for t in run["thresholds"].values()):
        out.append({**run, "method": f"{run['method']} @tuned"})
    return out


def summarise_logs(specs: list[str], methods: list[str], sizes: list[str], out: Path, label: str) -> int:
    seen: dict[tuple[str, str, int], dict[str, Any]] = {}
    for spec in specs:
        for run in read_run_lines(spec):
            seen.setdefault((run["method"], run["size"], run["fold"]), run)
    runs = list(seen.values())
    tasks = sorted({t for r in runs for t in r["macro_f1"]})
    summary = summarise(runs, methods, sizes, tasks)
    text = table(summary, methods, sizes, tasks)
    counts = {
        f"{m}|{s}": sorted(r["fold"] for r in runs if r["method"] == m and r["size"] == s)
        for m in methods
        for s in sizes
    }
    print(text)
    print("folds per method|size:", json.dumps(counts))
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"label": label, "from_logs": specs, "folds_done": counts, "recipes": RECIPES}
    out.write_text(json.dumps(json_safe({"setup": setup, "summary": summary, "table": text, "runs": runs}), indent=1))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", type=int, nargs="*", help="run just these fold numbers")
    parser.add_argument("--sizes", nargs="+", default=["300", "600", "full"])
    parser.add_argument("--methods", nargs="+", default=["default", *PROBES])
    parser.add_argument("--seed", type=int, default=0, help="training seed of the recipe runs")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. before / after)")
    parser.add_argument("--cache", default="var/cache")
    parser.add_argument("--out", default="var/bench/small_data_recipe.json")
    parser.add_argument(
        "--runs",
        nargs="+",
        metavar="LOG[:OLD=NEW]",
        help="no training: summarise the run lines these logs printed (renaming method OLD to NEW, e.g. "
        "default=previous for a log made before the default changed); the first line per method/size/fold wins",
    )
    args = parser.parse_args(argv)
    if args.runs:
        return summarise_logs(args.runs, args.methods, args.sizes, Path(args.out), args.label)
    unknown = [m for m in args.methods if m not in RECIPES and m not in PROBES]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(RECIPES) + list(PROBES)}")
    root = cm_off_meme_root()
    if not (root / "sample_data.csv").is_file():
        print(f"CM-Off-Meme sample not found at {root}: nothing to measure", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    base, tokenizer = build_model(ModelConfig())
    inputs = load_inputs(import_cm_off_meme(root).examples)
    features = build_features(base, tokenizer, inputs, FeatureStore(Path(args.cache)), torch.device("cpu"))
    tasks = base.config.tasks
    labels = label_tensors(inputs.examples, tasks)
    keys = strata(inputs.examples, tasks)
    x_text, x_both = pooled(features)
    folds = _fold_indices(inputs.examples, tasks, args.folds)
    runs: list[dict[str, Any]] = []
    probe_inputs: dict[str, np.ndarray] = {"probe": x_both, "probe-text": x_text}
    for fold, (pool, test_idx) in enumerate(folds):
        if args.only_folds and fold not in args.only_folds:
            continue
        for size in args.sizes:
            train_idx = draw(pool, keys, None if size == "full" else int(size), seed=fold)
            for method in args.methods:
                run: dict[str, Any] = {"method": method, "size": size, "fold": fold, "n_train": len(train_idx)}
                if method in PROBES:
                    x = probe_inputs[method]
                    run["macro_f1"] = {t: probe_f1(x, labels[t].numpy(), train_idx, test_idx) for t in tasks}
                else:
                    overrides = dict(RECIPES[method])
                    model_overrides = overrides.pop("model", {})
                    cfg = replace(TrainConfig(seed=args.seed), **overrides)
                    run.update(recipe_run(base, tokenizer, features, labels, train_idx, test_idx, cfg, model_overrides))
                runs.append(run)
                print(json.dumps(run), flush=True)
    sizes = list(args.sizes)
    summary = summarise(runs, list(args.methods), sizes, list(tasks))
    text = table(summary, list(args.methods), sizes, list(tasks))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {
        "label": args.label,
        "n_posts": len(inputs.examples),
        "folds": args.folds,
        "only_folds": args.only_folds,
        "train_config": TrainConfig().to_dict(),
        "recipes": RECIPES,
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(json_safe({"setup": setup, "summary": summary, "table": text, "runs": runs}), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
