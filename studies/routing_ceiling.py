"""How far can review routing go on CM-Off with the signals a served model has?

The issue's goal is a lift of 2.0 at a 10% review budget for both tasks; the shipped policy
(margin + labelled-neighbour disagreement, summed over tasks) reaches 1.69 / 1.64
(studies/routing_policies.py). This bench asks whether any use of the same signals gets there,
on the same runs (the trained-run outputs studies/routing_policies.py keeps under --runs-dir;
run that first):

- the shipped policy's neighbour index varied: k = 5 and 20 instead of 10, and an index of
  the training + validation posts (validation then scored 5-way cross-fitted, so its cut is
  set on posts the index did not hold);
- local competence: the out-of-fold error rate of a logistic probe among each post's
  nearest training posts (a region where a second model fails is one where this one may);
- an upper bound: a classifier of "how many of the two tasks is the model wrong on" over all
  those signals (probabilities, margins, ITM match, text length, neighbour shares and
  disagreements at k = 5 and 20 in both spaces), trained on the *other folds'* validation and
  test posts (about 2,100 posts with known errors; a deployed model has its ~150
  validation posts). Gradient boosting and logistic regression. It is an optimistic bound:
  no deployable policy over these signals has that much error data to learn from.

    nice -n 5 .venv/bin/python studies/routing_ceiling.py [--runs-dir DIR] [--seeds 2] [--out FILE.json]
        [--through-fit]   # the served model's runs (studies/routing_policies.py --through-fit)

Prints a table (variant x budget: pooled lift per task with 95% bootstrap intervals) and
writes the JSON. Reads CM-Off from ../shared; skips with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A sibling module: studies/ is on sys.path when run as a script.
from routing_eval import FoldOutputs, _bootstrap, catch_stats, policy_inputs, run_folds, run_splits
from sample import require_sample  # a sibling module: studies/ is on sys.path when run as a script
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.config import ModelConfig
from models.losses import IGNORE_INDEX
from models.neighbours import NeighbourIndex
from models.registry import build_model
from models.routing.policy import BUDGETS, PolicyInputs, margin_uncertainty, review_cut
from trainer.features import FeatureStore, build_features, load_inputs
from trainer.importers import import_cm_off_meme
from trainer.neighbour_fit import pooled_features
from trainer.probe import make_classifier
from trainer.routing_fit import with_neighbours
from trainer.train import label_tensors

Scores = dict[str, np.ndarray]  # split ("val", "test") -> review score per post


@dataclass
class Run:
    out: FoldOutputs
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    inputs: dict[str, PolicyInputs]  # split -> what the worker sees
    truth: dict[str, dict[str, Any]]  # split -> errors / labelled per task


class Signals:
    """The pooled features and labels of every post, and the neighbour shares derived from them."""

    def __init__(self, pooled: np.ndarray, present: np.ndarray, labels: Mapping[str, np.ndarray], text_dim: int):
        self.pooled, self.present, self.labels, self.text_dim = pooled, present, dict(labels), text_dim

    def index(self, rows: np.ndarray, labels: Mapping[str, np.ndarray] | None = None, k: int = 10) -> NeighbourIndex:
        labels = labels if labels is not None else {t: y[rows] for t, y in self.labels.items()}
        return NeighbourIndex.build(
            self.pooled[rows], self.present[rows], labels, {t: 2 for t in labels}, self.text_dim, k=k
        )

    def shares(self, index: NeighbourIndex, rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        return index.label_shares(self.pooled[rows], self.present[rows])

    def cross_fitted_shares(self, base: np.ndarray, rows: np.ndarray, k: int = 10) -> dict[str, dict[str, np.ndarray]]:
        """Shares of `rows` from an index of `base` + the other four fifths of `rows`."""
        parts = np.array_split(np.random.default_rng(0).permutation(len(rows)), 5)
        out: dict[str, dict[str, np.ndarray]] = {}
        for part in parts:
            rest = np.setdiff1d(np.arange(len(rows)), part)
            got = self.shares(self.index(np.concatenate([base, rows[rest]]), k=k), rows[part])
            for space, by_task in got.items():
                for task, s in by_task.items():
                    full = out.setdefault(space, {}).setdefault(task, np.full((len(rows), s.shape[1]), np.nan))
                    full[part] = s
        return out


def neighbour_policy(run: Run, shares: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]) -> Scores:
    """The shipped policy (margin + 2 x disagreement, summed over tasks) on other shares."""
    ins = {
        split: policy_inputs(getattr(run.out, split), run.out.calibration, list(run.out.val.logits), shares[split])[0]
        for split in ("val", "test")
    }
    spec = with_neighbours(ins["val"])
    return {split: spec.scores(ins[split]) for split in ins}


def oof_probe_errors(signals: Signals, rows: np.ndarray, task: str) -> np.ndarray:
    """1 where a 5-fold cross-fitted logistic probe gets a training post wrong, else 0;
    IGNORE_INDEX for posts without the task's label."""
    y = signals.labels[task][rows]
    out = np.full(len(rows), IGNORE_INDEX, dtype=np.int64)
    known = np.flatnonzero(y != IGNORE_INDEX)
    for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(known, y[known]):
        clf: Any = make_classifier()
        clf.fit(signals.pooled[rows[known[a]]], y[known[a]])
        out[known[b]] = (clf.predict(signals.pooled[rows[known[b]]]) != y[known[b]]).astype(np.int64)
    return out


def local_competence(run: Run, signals: Signals, weight: float) -> Scores:
    """Shipped score + weight x the probe's out-of-fold error rate among the post's 20
    nearest training posts, averaged over spaces, summed over tasks."""
    tasks = list(run.inputs["val"].scores)
    errs = {t: oof_probe_errors(signals, run.train, t) for t in tasks}
    index = signals.index(run.train, errs, k=20)
    base = neighbour_policy(run, run.out.shares)
    out = {}
    for split in ("val", "test"):
        shares = signals.shares(index, getattr(run, split))
        rate = sum(np.nanmean([shares[s][t][:, 1] for s in shares], axis=0) for t in tasks)
        out[split] = base[split] + weight * np.nan_to_num(rate, nan=float(np.nanmean(rate)))
    return out


def signal_matrix(run: Run, signals: Signals, split: str, texts: np.ndarray) -> np.ndarray:
    rows = getattr(run, split)
    ins = run.inputs[split]
    cols = [np.log1p(texts[rows]), np.nan_to_num(ins.itm, nan=0.5)]
    by_k = {k: signals.shares(signals.index(run.train, k=k), rows) for k in (5, 20)}
    for t, p in ins.scores.items():
        decided = (p >= ins.thresholds[t]).astype(np.float64)
        cols += [p, margin_uncertainty(p, ins.thresholds[t])]
        for shares in by_k.values():
            for space in ("text", "image"):
                share = np.nan_to_num(shares[space][t][:, 1], nan=0.5) if space in shares else np.full(len(rows), 0.5)
                cols += [share, np.abs(decided - share)]
    return np.stack(cols, axis=1)


def learned_bound(
    runs: Sequence[Run], matrices: Mapping[tuple[int, str], np.ndarray], make: Callable[[], Any]
) -> list[Scores]:
    """Per run, a classifier of the number of tasks the model is wrong on, fitted on every
    other fold's validation and test posts; its expected error count is the score."""

    def wrong(run: Run, split: str) -> np.ndarray:
        return np.sum([run.truth[split]["errors"][t] for t in run.truth[split]["errors"]], axis=0)

    out = []
    for i, run in enumerate(runs):
        others = [j for j, r in enumerate(runs) if r.out.fold != run.out.fold]
        x = np.concatenate([matrices[(j, s)] for j in others for s in ("val", "test")])
        y = np.concatenate([wrong(runs[j], s) for j in others for s in ("val", "test")])
        model = make().fit(x, y)
        out.append(
            {s: model.predict_proba(matrices[(i, s)]) @ model.classes_.astype(np.float64) for s in ("val", "test")}
        )
    return out


def pooled(runs: Sequence[Run], scores: Sequence[Scores], budget: float, n_boot: int) -> dict[str, Any]:
    """Cut on each run's validation scores for the budget, applied to its test posts; pooled."""
    per_task: dict[str, list[np.ndarray]] = {}
    shares = []
    for run, sc in zip(runs, scores, strict=True):
        reviewed = sc["test"] >= review_cut(sc["val"], budget)
        shares.append(float(reviewed.mean()))
        for t, errors in run.truth["test"]["errors"].items():
            keep = run.truth["test"]["labelled"][t]
            per_task.setdefault(t, []).append(np.stack([reviewed[keep], errors[keep]]))
    out: dict[str, Any] = {"reviewed_share": float(np.mean(shares))}
    for t, chunks in per_task.items():
        groups = np.concatenate([np.full(c.shape[1], i) for i, c in enumerate(chunks)])
        both = np.concatenate(chunks, axis=1).astype(bool)
        stats: dict[str, Any] = catch_stats(both[0], both[1])
        stats["ci"] = _bootstrap(both[0], both[1], groups, n_boot, seed=7)
        out[t] = stats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=None, help="studies/routing_policies.py's runs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cache", default="var/cache", help="encoded-feature cache")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument(
        "--through-fit", action="store_true", help="the served model's runs (default dir: var/bench/routing/runs-fit)"
    )
    parser.add_argument("--out", default=None, help="default var/bench/routing_ceiling[-fit].json")
    args = parser.parse_args()
    require_sample()  # skips clearly when the data is absent
    suffix = "-fit" if args.through_fit else ""
    runs_dir = Path(args.runs_dir or f"var/bench/routing/runs{suffix}")
    seeds = tuple(range(args.seeds))
    if not all((runs_dir / f"fold{f}-seed{s}.npz").is_file() for f in range(args.folds) for s in seeds):
        sys.exit(
            f"{runs_dir} lacks some of {args.folds} folds x {args.seeds} seeds: run studies/routing_policies.py first"
        )

    torch.set_num_threads(1)
    started = time.perf_counter()
    examples = import_cm_off_meme().examples
    # Re-scoring only: loads (the config check needs the recipe the runs were made with).
    outs = run_folds(examples, runs_dir, folds=args.folds, seeds=seeds, through_fit=args.through_fit)
    base, tokenizer = build_model(ModelConfig())
    inputs = load_inputs(examples)
    features = build_features(base, tokenizer, inputs, FeatureStore(Path(args.cache)), torch.device("cpu"))
    pooled_x, present = pooled_features(features, range(len(inputs.examples)))
    tasks = base.config.tasks
    labels = {t: y.numpy() for t, y in label_tensors(inputs.examples, tasks).items()}
    signals = Signals(pooled_x, present, labels, base.text_encoder.dim)
    texts = np.array([len(ex.text or "") for ex in inputs.examples], dtype=np.float64)

    splits = run_splits(inputs.examples, tasks, args.folds, seeds, 0.15)
    runs = []
    for out in outs:
        train, val, test = (np.asarray(i, dtype=np.int64) for i in splits[(out.fold, out.seed)])
        if not np.array_equal(test, out.test_idx):
            sys.exit(f"fold {out.fold}: the runs' test posts differ from today's folds (other data?)")
        both = {s: policy_inputs(getattr(out, s), out.calibration, list(tasks), out.shares[s]) for s in ("val", "test")}
        runs.append(Run(out, train, val, test, {s: b[0] for s, b in both.items()}, {s: b[1] for s, b in both.items()}))

    variants: dict[str, list[Scores]] = {
        "shipped (k 10, training index)": [neighbour_policy(r, r.out.shares) for r in runs]
    }
    for k in (5, 20):
        variants[f"k {k}"] = [
            neighbour_policy(
                r, {s: signals.shares(signals.index(r.train, k=k), getattr(r, s)) for s in ("val", "test")}
            )
            for r in runs
        ]
    variants["training + validation index"] = [
        neighbour_policy(
            r,
            {
                "val": signals.cross_fitted_shares(r.train, r.val),
                "test": signals.shares(signals.index(np.concatenate([r.train, r.val])), r.test),
            },
        )
        for r in runs
    ]
    for w in (1.0, 2.0):
        variants[f"shipped + {w:g} x local probe error rate"] = [local_competence(r, signals, w) for r in runs]
    matrices = {(i, s): signal_matrix(r, signals, s, texts) for i, r in enumerate(runs) for s in ("val", "test")}
    variants["bound: gradient boosting on other folds"] = learned_bound(
        runs, matrices, lambda: HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=200)
    )
    variants["bound: logistic on other folds"] = learned_bound(
        runs, matrices, lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    )

    table = {name: {f"{b:g}": pooled(runs, scores, b, args.boot) for b in BUDGETS} for name, scores in variants.items()}
    result = {
        "table": table,
        "setup": {
            "runs": len(runs),
            "runs_dir": str(runs_dir),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads 1",
            "intervals": "95% percentile bootstrap over test posts pooled across runs (resampled within each run)",
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }
    path = Path(args.out or f"var/bench/routing_ceiling{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(markdown(table, list(tasks)))
    print(f"{len(runs)} runs; lift = share of the model's test errors reviewed / share reviewed. Written: {path}")


def _cell(stats: Mapping[str, Any]) -> str:
    lo, hi = stats["ci"]["lift"]
    return f"{stats['lift']:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{stats['lift']:.2f}"


def markdown(table: Mapping[str, Any], tasks: Sequence[str]) -> str:
    head = ["variant", "budget", "reviewed % (test)", *(f"{t} lift" for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_budget in table.items():
        for budget, row in by_budget.items():
            cells = [
                name,
                f"{float(budget):.0%}",
                f"{row['reviewed_share'] * 100:.1f}",
                *(_cell(row[t]) for t in tasks),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
