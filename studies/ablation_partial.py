"""The table of an ablation grid that did not finish (a device lease ran out): every variant
over the runs it has, each Δ paired on the (fold, seed) runs both rows share.

`modstream ablate` writes results.md only when the whole grid is done; this reads the
runs.jsonl a cut-short grid leaves (resumable there, but not here when the encoders'
weights differ, e.g. MiniLM restored from float16 on a GPU machine).

    python studies/ablation_partial.py var/A-gpu [--posts 1308] [--folds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.ablation import read_runs, summarise  # noqa: E402


def _delta(entry: dict | None) -> str:
    if not entry:
        return "—"
    return f"{entry['mean']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}] ({entry['wins']}/{entry['n']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="an `ablate --out` folder holding runs.jsonl")
    parser.add_argument("--posts", type=int, default=1308, help="posts in the grid (for the corrected intervals)")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    runs = list(read_runs(args.grid / "runs.jsonl").values())
    if not runs:
        parser.error(f"{args.grid}/runs.jsonl holds no runs")
    tasks = list(runs[0]["macro_f1"])
    names = list(dict.fromkeys(r["variant"] for r in runs))
    n_test = args.posts // args.folds
    summary = summarise(runs, names, tasks, args.posts - n_test, n_test)
    head = ["variant", "runs (fold/seed)"] + [f"{t} macro-F1" for t in tasks] + ["paired with"]
    head += [f"{t} Δ [95% CI] (wins)" for t in tasks] + ["ITM AUROC", "routing lift (ITM)", "s per run"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, row in summary["variants"].items():
        cells = [name, ", ".join(f"{r['fold']}/{r['seed']}" for r in runs if r["variant"] == name)]
        cells += [f"{row['tasks'][t]['mean']:.3f} ± {row['tasks'][t]['std']:.3f}" for t in tasks]
        cells += [row["reference"] or "—"] + [_delta(row["tasks"][t].get("diff")) for t in tasks]
        cells += [f"{row['itm_auroc'][0]:.3f}", " / ".join(f"{row['tasks'][t]['routing_lift'][0]:.2f}" for t in tasks)]
        cells += [f"{row['seconds_per_run']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{len(runs)} runs from {args.grid}; Δ: paired t-interval over the runs both rows have (uncorrected)")


if __name__ == "__main__":
    main()
