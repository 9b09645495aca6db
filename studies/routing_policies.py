"""Routing policies against each other on CM-Off-Meme: the share of the model's errors that
a review budget of 5 / 10 / 20% catches, per policy and task, with bootstrap intervals.

The folds are those of `modstream ablate` (5 stratified folds, the same train/validation
split inside each); per fold and seed the default recipe (task + ITC + ITM, frozen
encoders, default TrainConfig; decision thresholds kept or tuned as fit() does) is
trained once, on the CPU, single-threaded, and its outputs kept under --runs-dir so a
rerun only re-scores. Every policy is fitted (and its cut set for the budget) on the
fold's validation split and applied to the test fold.
Posts: the 1,308 CM-Off-Meme posts with an image (the sample ships no image for the
other 713 rows); --with-text-only adds those as text-only posts.

    nice -n 5 .venv/bin/python studies/routing_policies.py [--seeds 2] [--runs-dir DIR] [--out FILE.json]
        [--neighbour-sweep 0.5 1 2 3 4 6] [--through-fit [--neighbour-vote W]]
        [--unfreeze-text-layers N|all --device cuda] [--saved-only [--units 0/0,1/0]]

--through-fit trains each run as `modstream train` does (trainer.fit.fit_features: the head +
probe blend, the probe refitted on training + validation, the neighbour index, the optional
neighbour vote) and scores the served model, adding a row for the policy its card ships
(its own cut, at the 10% budget it was tuned for). Its runs live in their own directory.
--unfreeze-text-layers fine-tunes the text encoder in every run (runs-...-text-N|all); on a
GPU (tests/gpu/recipe.sh) that is minutes. --saved-only scores whatever runs a directory holds
(a grid a device lease cut short) and --units picks the same runs from a baseline's directory.

The neighbour policies read each post's labelled nearest training posts (models/neighbours.py,
index built from the run's training split); runs saved before they existed get their
neighbour shares added on the next run, without retraining.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

# A sibling module: studies/ is on sys.path when run as a script.
from routing_eval import compare, run_folds, saved_runs
from sample import require_sample  # a sibling module: studies/ is on sys.path when run as a script

from models.config import ModelConfig
from trainer.importers import import_cm_off_meme
from trainer.train import TrainConfig


def _layers_or_all(value: str) -> int:
    return -1 if value == "all" else int(value)


def _units(value: str) -> list[tuple[int, int]]:
    return [(int(f), int(s)) for f, s in (unit.split("/") for unit in value.split(","))]


def _fmt(value: float, ci: list[float] | None = None, pct: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    scale, digits = (100, 0) if pct else (1, 2)
    text = f"{value * scale:.{digits}f}"
    if ci and all(c is not None and math.isfinite(c) for c in ci):
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def markdown(result: dict[str, Any], tasks: list[str]) -> str:
    head = ["policy", "budget", "reviewed % (test)"]
    for task in tasks:
        head += [f"{task} errors caught %", f"{task} review precision %", f"{task} lift", f"{task} lift per fold"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_budget in result["table"].items():
        for budget, by_task in by_budget.items():
            cells = [name, f"{float(budget):.0%}", _fmt(by_task[tasks[0]]["reviewed_share"], pct=True)]
            for task in tasks:
                s = by_task[task]
                mean, std = s["lift_run_mean_std"]
                cells += [
                    _fmt(s["recall"], s["ci"]["recall"], pct=True),
                    _fmt(s["precision"], s["ci"]["precision"], pct=True),
                    _fmt(s["lift"], s["ci"]["lift"]),
                    f"{mean:.2f} ± {std:.2f}" if mean is not None and std is not None else "—",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per fold (0..N-1)")
    parser.add_argument("--with-text-only", action="store_true", help="also the 713 posts without an image")
    parser.add_argument(
        "--runs-dir",
        default="var/bench/routing/runs",
        help="trained-run outputs (resumable; refused if made under another config)",
    )
    parser.add_argument(
        "--through-fit",
        action="store_true",
        help="score the model as fit() ships it (blend, probe refit, neighbour index, the card's policy)",
    )
    parser.add_argument(
        "--neighbour-vote",
        type=float,
        default=0.0,
        metavar="W",
        help="with --through-fit: ModelConfig.neighbour_vote (modstream train --neighbour-vote)",
    )
    parser.add_argument(
        "--unfreeze-text-layers",
        type=_layers_or_all,
        default=0,
        metavar="N|all",
        help="fine-tune the text encoder's top N layers ('all': the whole encoder) in every run; "
        "a GPU makes it practical (--device)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (training and scoring)")
    parser.add_argument("--cache", default="var/cache", help="encoded-feature cache")
    parser.add_argument(
        "--out", default=None, help="JSON (default var/bench/routing_policies[-fit[-voteW]].json, as the runs)"
    )
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "--neighbour-sweep",
        type=float,
        nargs="*",
        default=[],
        metavar="W",
        help="also the summed neighbour policy at each of these weights (e.g. 0.5 1 2 3 4 6)",
    )
    parser.add_argument(
        "--saved-only",
        action="store_true",
        help="score the runs already saved in the runs directory and train nothing (a grid a GPU lease cut short)",
    )
    parser.add_argument(
        "--units",
        type=_units,
        default=None,
        metavar="F/S,...",
        help="with --saved-only: only these fold/seed runs, e.g. 0/0,1/0,2/0 (a baseline on the same runs)",
    )
    args = parser.parse_args()
    require_sample()  # skips clearly when the data is absent
    if args.units and not args.saved_only:
        parser.error("--units needs --saved-only")
    if args.neighbour_vote and not args.through_fit:
        parser.error("--neighbour-vote needs --through-fit (the head-only runs do not serve the vote)")
    # ModelConfig refuses a vote weight outside [0, 1)
    model_config = ModelConfig(neighbour_vote=args.neighbour_vote, text_trainable_layers=args.unfreeze_text_layers)

    if args.device == "cpu":
        torch.set_num_threads(1)  # comparable CPU timings; a GPU run leaves the probes all cores
    started = time.perf_counter()
    examples = import_cm_off_meme(with_text_only=args.with_text_only).examples
    runs_dir, variant = Path(args.runs_dir), ""
    if args.through_fit:  # their own directory: runs_config refuses to mix them with head-only runs
        variant = "-fit" + (f"-vote{args.neighbour_vote:g}" if args.neighbour_vote else "")
        runs_dir = runs_dir.parent / f"{runs_dir.name}{variant}"
    if args.unfreeze_text_layers:  # its own directory too (runs_config would refuse the mix)
        text = "all" if args.unfreeze_text_layers < 0 else str(args.unfreeze_text_layers)
        variant += f"-text-{text}"
        runs_dir = runs_dir.parent / f"{runs_dir.name}-text-{text}"
    if args.with_text_only:
        runs_dir, variant = runs_dir / "with-text-only", variant + "-with-text-only"
    if args.saved_only:
        variant += "-saved"
    out = Path(args.out or f"var/bench/routing_policies{variant}.json")
    if args.saved_only:
        runs = saved_runs(
            examples,
            runs_dir,
            folds=args.folds,
            model_config=model_config,
            through_fit=args.through_fit,
            units=args.units,
        )
    else:
        runs = run_folds(
            examples,
            runs_dir,
            folds=args.folds,
            seeds=tuple(range(args.seeds)),
            cache_dir=Path(args.cache),
            model_config=model_config,
            through_fit=args.through_fit,
            device=args.device,
            on_run=lambda o, s: print(f"fold {o.fold} seed {o.seed}: trained in {s:.0f} s", file=sys.stderr),
        )
    tasks = list(runs[0].calibration.temperatures)
    result = compare(runs, tasks, n_boot=args.boot, neighbour_sweep=args.neighbour_sweep)
    n_with_image = sum(ex.image is not None for ex in examples)
    text_recipe = {0: "frozen encoders", -1: "whole text encoder fine-tuned"}.get(
        args.unfreeze_text_layers, f"text encoder's top {args.unfreeze_text_layers} layers fine-tuned"
    )
    result["setup"] = {
        "posts": len(examples),
        "with_image": n_with_image,
        "folds": args.folds,
        "seeds": args.seeds,
        "runs": [f"{r.fold}/{r.seed}" for r in runs],
        "recipe": (
            f"task+itc+itm, {text_recipe}, as fit() ships it (head + probe blend, neighbour index, "
            f"vote {args.neighbour_vote:g})"
            if args.through_fit
            else f"task+itc+itm, {text_recipe}, head only, default TrainConfig, thresholds kept or tuned as fit() does"
        ),
        "train_config": TrainConfig().to_dict(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name(0)}" if args.device != "cpu" and torch.cuda.is_available() else ""),
        "intervals": "95% percentile bootstrap over test posts pooled across runs (resampled within each run)",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result, tasks))
    print(
        f"{len(examples)} posts ({n_with_image} with an image), "
        + (
            f"{len(runs)} saved runs (fold/seed {', '.join(result['setup']['runs'])}) of {args.folds} folds; "
            if args.saved_only
            else f"{args.folds} folds x {args.seeds} seed(s); "
        )
        + f"errors caught = share of the model's test errors in the reviewed set; precision = error rate among "
        f"reviewed posts; lift = caught share / reviewed share (random = 1); the cut is the validation quantile "
        f"for the budget, so the share reviewed on test differs a little. Written: {out}",
    )


if __name__ == "__main__":
    main()
