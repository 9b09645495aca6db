"""The ablation's report: paired differences to task-only per variant (corrected t intervals),
as markdown, JSON and a plot."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.ablation_grid import reference_of
from trainer.stats import (
    corrected_paired_t,
    format_diff,
    format_mean_std,
    mean_std,
    paired_difference,
)

log = logging.getLogger(__name__)


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
