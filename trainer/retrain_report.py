"""What the operator sees after a retraining run: a table, a plot and JSON of the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.card import json_safe
from trainer.gate import Check, GateDecision


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _change(c: Check) -> str:
    return "-" if c.current is None or c.candidate is None else f"{c.candidate - c.current:+.3f}"


def summary_table(decision: GateDecision, current: str, candidate: str) -> str:
    """Both models x both holdouts x tasks, then the decision and why."""
    header = ("holdout", "check", "n", f"current {current}", f"candidate {candidate}", "change", "verdict")
    rows = [
        (
            c.holdout,
            "ITM AUROC" if c.metric == "itm_auroc" else f"{c.task} F1",
            str(c.n),
            _f1(c.current),
            _f1(c.candidate),
            _change(c),
            c.verdict,
        )
        for c in decision.checks
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "PROMOTED" if decision.promoted else "REFUSED"
    lines.append("")
    lines.append(f"{verdict} (margin {decision.margin:.3f}, min holdout {decision.min_examples}): {decision.why}")
    return "\n".join(lines)


def write_plot(decision: GateDecision, current: str, candidate: str, path: Path) -> Path:
    """Grouped bars per holdout: current vs candidate macro-F1 per task and the ITM AUROC,
    each with its margin line, and each check's verdict and n under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    holdouts = list(dict.fromkeys(c.holdout for c in decision.checks)) or ["(none)"]
    fig, axes = plt.subplots(1, len(holdouts), figsize=(4.5 * len(holdouts), 4), squeeze=False)
    for ax, holdout in zip(axes[0], holdouts, strict=True):
        checks = [c for c in decision.checks if c.holdout == holdout]
        xs = range(len(checks))
        cur = [c.current if c.current is not None else 0.0 for c in checks]
        cand = [c.candidate if c.candidate is not None else 0.0 for c in checks]
        ax.bar([x - 0.2 for x in xs], cur, width=0.4, label=f"current {current}", color="#8c8c8c")
        ax.bar([x + 0.2 for x in xs], cand, width=0.4, label=f"candidate {candidate}", color="#3070b0")
        for x, c in zip(xs, checks, strict=True):
            if c.current is not None:
                # The lowest candidate score the gate accepts.
                floor = c.current - c.margin
                ax.hlines(floor, x - 0.4, x + 0.4, colors="#c03030", linestyles="dashed", linewidth=1)
        names = ["ITM AUROC" if c.metric == "itm_auroc" else f"{c.task} F1" for c in checks]
        ax.set_xticks(list(xs), [f"{name}\n{c.verdict}\nn={c.n}" for name, c in zip(names, checks, strict=True)])
        ax.set_ylim(0, 1.2)  # headroom for the legend
        ax.set_title(f"{holdout} holdout")
        ax.set_ylabel("macro-F1 / ITM AUROC")
    axes[0][0].legend(loc="upper left", ncol=2, fontsize="small")
    verdict = "promoted" if decision.promoted else "refused"
    fig.suptitle(f"{candidate} vs {current}: {verdict} (dashed: current - margin {decision.margin:.2f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return path
