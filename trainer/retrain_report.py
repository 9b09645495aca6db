"""What the operator sees after a retraining run: a table, a plot and JSON of the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.card import json_safe
from trainer.gate import METRIC_NAMES, Check, GateDecision


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _change(c: Check) -> str:
    return "-" if c.current is None or c.candidate is None else f"{c.candidate - c.current:+.3f}"


def check_name(c: Check) -> str:
    return f"{c.task} F1" if c.metric == "macro_f1" else METRIC_NAMES[c.metric]


def _interval(c: Check) -> str:
    return "-" if c.drop_ci is None else f"[{c.drop_ci[0]:+.3f}, {c.drop_ci[1]:+.3f}]"


def summary_table(decision: GateDecision, current: str, candidate: str) -> str:
    """Both models x every holdout x every check, then the decision and why."""
    header = (
        "holdout", "check", "n", f"current {current}", f"candidate {candidate}", "change", "drop 95% CI", "verdict",
    )  # fmt: skip
    rows = [
        (c.holdout, check_name(c), str(c.n), _f1(c.current), _f1(c.candidate), _change(c), _interval(c), c.verdict)
        for c in decision.checks
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "PROMOTED" if decision.promoted else "REFUSED"
    lines.append("")
    lift = f", lift margin {decision.lift_margin:.2f}" if decision.lift_margin is not None else ""
    lines.append(f"{verdict} (margin {decision.margin:.3f}{lift}, min holdout {decision.min_examples}): {decision.why}")
    return "\n".join(lines)


def write_plot(decision: GateDecision, current: str, candidate: str, path: Path) -> Path:
    """Per holdout, grouped bars of current vs candidate: macro-F1 per task and the ITM AUROC
    (top row, scale 0-1), the routing lift (bottom row, its own scale), each with its margin
    line (the lowest score the gate accepts), the drop's interval, verdict and n under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    holdouts = list(dict.fromkeys(c.holdout for c in decision.checks)) or ["(none)"]
    fig, axes = plt.subplots(
        2,
        len(holdouts),
        figsize=(max(6.0, 4.8 * len(holdouts)), 7.4),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    for col, holdout in enumerate(holdouts):
        checks = [c for c in decision.checks if c.holdout == holdout]
        rows = ([c for c in checks if c.metric != "routing_lift"], [c for c in checks if c.metric == "routing_lift"])
        for row, group in enumerate(rows):
            ax = axes[row][col]
            _bars(ax, group, current, candidate)
            if row == 0:
                ax.set_ylim(0, 1.25)  # headroom for the legend
                ax.set_title(f"{holdout} holdout")
                ax.set_ylabel("macro-F1 / ITM AUROC")
            else:
                top = max([1.0] + [v for c in group for v in (c.current, c.candidate) if v is not None])
                ax.set_ylim(0, top * 1.25)
                ax.axhline(1.0, color="#606060", linewidth=0.8, linestyle="dotted")  # lift 1 = chance
                ax.set_ylabel("routing lift at budget")
    axes[0][0].legend(loc="upper left", ncol=2, fontsize="small")
    verdict = "promoted" if decision.promoted else "refused"
    fig.suptitle(f"{candidate} vs {current}: {verdict}\n(dashed: current - margin; CI: the drop's 95% interval)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(ax: Any, checks: list[Check], current: str, candidate: str) -> None:
    xs = range(len(checks))
    cur = [c.current if c.current is not None else 0.0 for c in checks]
    cand = [c.candidate if c.candidate is not None else 0.0 for c in checks]
    ax.bar([x - 0.2 for x in xs], cur, width=0.4, label=f"current {current}", color="#8c8c8c")
    ax.bar([x + 0.2 for x in xs], cand, width=0.4, label=f"candidate {candidate}", color="#3070b0")
    for x, c in zip(xs, checks, strict=True):
        if c.current is not None:
            ax.hlines(c.current - c.margin, x - 0.4, x + 0.4, colors="#c03030", linestyles="dashed", linewidth=1)
    labels = [f"{check_name(c)}\n{c.verdict}\nn={c.n}" + (f"\nCI {_interval(c)}" if c.drop_ci else "") for c in checks]
    ax.set_xticks(list(xs), labels, fontsize="small")
    for tick, c in zip(ax.get_xticklabels(), checks, strict=True):
        if c.verdict == "fail":  # the check that refused stands out
            tick.set_color("#c03030")
            tick.set_fontweight("bold")
    if not checks:
        ax.text(0.5, 0.5, "no routing to judge", ha="center", va="center", transform=ax.transAxes)


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return path
