"""Is a second model a second opinion? Each fold of the routing bench's served runs has two
models (seeds 0 and 1: another validation split and initialisation) that scored the same
test posts. Route the top 10% of test posts by a score (its quantile on test: no labels used)
and measure the lift over seed 0's errors (and the averaged model's, for its own margin):

  margin, seed 0        how close seed 0's calibrated probability sits to its threshold
  averaged margin       the same on the two models' averaged probabilities
  disagreement          abs(p0 - p1), the ensemble's epistemic signal
  both                  averaged margin + disagreement (z-scored)

    python studies/routing_seed_pair.py [--runs-dir var/bench/routing/runs-fit]
(after studies/routing_policies.py --through-fit --seeds 2)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sibling modules: studies/ is on sys.path when run as a script.
from routing_eval import policy_inputs, saved_runs  # noqa: E402
from sample import require_sample  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from trainer.importers import import_cm_off_meme  # noqa: E402


def _lift(score: np.ndarray, wrong: np.ndarray, budget: float) -> float:
    top = np.argsort(-score)[: round(budget * len(score))]
    return float(wrong[top].mean() / wrong.mean())


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("var/bench/routing/runs-fit"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.10)
    args = parser.parse_args()
    require_sample()  # skips clearly when the data is absent
    examples = import_cm_off_meme().examples
    runs = saved_runs(
        examples,
        args.runs_dir,
        folds=args.folds,
        model_config=ModelConfig(),
        through_fit=True,
        units=[(f, s) for f in range(args.folds) for s in (0, 1)],
    )
    tasks = list(runs[0].calibration.temperatures)
    head = [f"score (top {args.budget:.0%} of test posts)"] + [f"{t} lift per fold (mean)" for t in tasks]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(tasks))
    table: dict[str, list[str]] = {}
    for task in tasks:
        per: dict[str, list[float]] = {}
        for a, b in zip(runs[::2], runs[1::2], strict=True):
            (in_a, truth_a), (in_b, _) = (policy_inputs(r.test, r.calibration, tasks) for r in (a, b))
            ok = truth_a["labelled"][task]
            pa, pb, y = in_a.scores[task][ok], in_b.scores[task][ok], a.test.labels[task][ok]
            ta, tb = in_a.thresholds[task], in_b.thresholds[task]
            wrong_a = truth_a["errors"][task][ok].astype(float)
            pm, tm = (pa + pb) / 2, (ta + tb) / 2
            wrong_m = ((pm >= tm).astype(int) != y).astype(float)
            scores = {
                "margin, seed 0": (-np.abs(pa - ta), wrong_a),
                "averaged margin (seed 0's errors)": (-np.abs(pm - tm), wrong_a),
                "averaged margin (the averaged model's errors)": (-np.abs(pm - tm), wrong_m),
                "disagreement, abs(p0 - p1)": (np.abs(pa - pb), wrong_a),
                "averaged margin + disagreement": (_z(-np.abs(pm - tm)) + _z(np.abs(pa - pb)), wrong_a),
            }
            for name, (score, wrong) in scores.items():
                per.setdefault(name, []).append(_lift(score, wrong, args.budget))
        for name, lifts in per.items():
            table.setdefault(name, []).append(f"{' '.join(f'{v:.2f}' for v in lifts)} ({np.mean(lifts):.2f})")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
