"""The promotion gate: numbers in, decision and a sentence saying why out (no I/O, no torch).

A candidate is promoted only when, on every holdout, for every task with at least
`min_examples` labelled examples its macro-F1 is at least the current model's minus `margin`,
and, where the holdout has at least `min_examples` image-text pairs with a known target, its
ITM AUROC is at least the current model's minus `itm_margin`: routing to review rests on the
ITM score, so a candidate whose labels are as good but whose mismatch detection eroded is
refused (a retrain on reviewed pairs taken as matches did exactly that). An AUROC from a few
hundred pairs moves by more than 0.02 by chance, so with `drop_ci` (the 95% interval of the
drop from a paired bootstrap on the same pairs) a drop beyond the margin refuses only when the
interval lies above zero; the check says "within noise" otherwise. A check with fewer
examples is "not enough evidence" and does not block; if no label check has enough evidence,
the candidate is refused: nothing shows it is as good as the model it would replace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["pass", "fail", "not enough evidence"]
# Float noise must not turn a drop of exactly `margin` into a refusal (0.80 - 0.02 != 0.78).
_TOLERANCE = 1e-9


METRIC_NAMES = {"macro_f1": "macro-F1", "itm_auroc": "ITM AUROC"}


@dataclass(frozen=True)
class Comparison:
    """Both models' `metric` on one task of one holdout (task "itm" for the ITM AUROC); `n`
    labelled examples of the task (image-text pairs with a known target for ITM)."""

    holdout: str
    task: str
    n: int
    current: float | None
    candidate: float | None
    metric: str = "macro_f1"
    drop_ci: tuple[float, float] | None = None  # 95% interval of current - candidate, when known


@dataclass(frozen=True)
class Check:
    holdout: str
    task: str
    n: int
    current: float | None
    candidate: float | None
    verdict: Verdict
    metric: str = "macro_f1"
    margin: float = 0.0
    drop_ci: tuple[float, float] | None = None

    @property
    def drop(self) -> float:
        """How much worse the candidate is (negative: better); NaN without both numbers."""
        if self.current is None or self.candidate is None:
            return math.nan
        return self.current - self.candidate

    def describe(self) -> str:
        subject = METRIC_NAMES[self.metric] if self.metric == "itm_auroc" else self.task
        interval = f", drop 95% CI [{self.drop_ci[0]:.3f}, {self.drop_ci[1]:.3f}]" if self.drop_ci else ""
        return (
            f"{subject} on the {self.holdout} holdout: candidate {_num(self.candidate)} "
            f"vs current {_num(self.current)} (n={self.n}{interval})"
        )


@dataclass
class GateDecision:
    promoted: bool
    why: str
    margin: float
    min_examples: int
    checks: list[Check]
    itm_margin: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "why": self.why,
            "margin": self.margin,
            "itm_margin": self.margin if self.itm_margin is None else self.itm_margin,
            "min_holdout": self.min_examples,
            "checks": [{**asdict(c), "drop": c.drop} for c in self.checks],
        }


def _num(value: float | None) -> str:
    return f"{value:.3f}" if _finite(value) else "none"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def check(comparison: Comparison, margin: float, min_examples: int) -> Check:
    c = comparison
    if c.metric == "itm_auroc" and c.n >= min_examples and _finite(c.current) and not _finite(c.candidate):
        # The current model detects mismatches and the candidate cannot (no ITM head trained,
        # or no score): routing would lose its signal, the erosion this check exists for.
        verdict: Verdict = "fail"
    elif c.n < min_examples or not (_finite(c.current) and _finite(c.candidate)):
        verdict = "not enough evidence"
    else:
        assert c.current is not None and c.candidate is not None
        beyond = c.candidate < c.current - margin - _TOLERANCE
        noise = c.drop_ci is not None and not (math.isfinite(c.drop_ci[0]) and c.drop_ci[0] > 0)
        verdict = "fail" if beyond and not noise else "pass"
    return Check(c.holdout, c.task, c.n, c.current, c.candidate, verdict, c.metric, margin, c.drop_ci)


def gate_verdict(
    comparisons: Sequence[Comparison],
    margin: float = 0.02,
    min_examples: int = 20,
    itm_margin: float | None = None,
) -> GateDecision:
    """`itm_margin`: the largest ITM AUROC drop allowed (default: `margin`)."""
    itm_margin = margin if itm_margin is None else itm_margin
    if margin < 0 or itm_margin < 0:
        raise ValueError(f"margins must be >= 0, got {margin} and {itm_margin}")
    if min_examples < 1:
        raise ValueError(f"min_examples must be >= 1, got {min_examples}")
    checks = [check(c, itm_margin if c.metric == "itm_auroc" else margin, min_examples) for c in comparisons]
    failed = sorted(
        (c for c in checks if c.verdict == "fail"),
        key=lambda c: -(c.drop - c.margin) if math.isfinite(c.drop) else -math.inf,  # no score: worst
    )
    passed = sorted((c for c in checks if c.verdict == "pass"), key=lambda c: -c.drop)
    label_passed = [c for c in passed if c.metric == "macro_f1"]
    thin = [c for c in checks if c.verdict == "not enough evidence"]
    thin_note = ""
    if thin:
        listed = ", ".join(f"{c.task} on {c.holdout} (n={c.n})" for c in thin)
        thin_note = f" Not enough evidence (fewer than {min_examples} labelled examples), not gated: {listed}."
    if failed:
        worst = failed[0]
        why = (
            f"Refused: {worst.describe()}, "
            + (
                f"a drop of {worst.drop:.3f}, more than the margin {worst.margin:.3f}."
                if math.isfinite(worst.drop)
                else "the candidate has no score where the current model has one."
            )
            + (
                " Also below the margin: " + "; ".join(c.describe() for c in failed[1:]) + "."
                if len(failed) > 1
                else ""
            )
            + thin_note
        )
        return GateDecision(False, why, margin, min_examples, checks, itm_margin)
    if not label_passed:
        why = (
            f"Refused: no holdout has {min_examples} or more labelled examples of any task, so nothing "
            f"shows the candidate is as good as the current model." + thin_note
        )
        return GateDecision(False, why, margin, min_examples, checks, itm_margin)
    closest = passed[0]
    itm_checked = sum(1 for c in passed if c.metric == "itm_auroc")
    itm_note = (
        f" and ITM AUROC no more than {itm_margin:.3f} below on {itm_checked} holdout(s)"
        if itm_checked
        else " (ITM AUROC not gated: no holdout has enough pairs with a known target)"
    )
    why = (
        f"Promoted: macro-F1 is no more than {margin:.3f} below the current model on every task and holdout "
        f"with enough evidence ({len(label_passed)} checked){itm_note}; closest: {closest.describe()}." + thin_note
    )
    return GateDecision(True, why, margin, min_examples, checks, itm_margin)
