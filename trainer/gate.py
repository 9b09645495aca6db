"""The promotion gate: numbers in, decision and a sentence saying why out (no I/O, no torch).

A candidate is promoted only when, for every task on every holdout that has at least
`min_examples` labelled examples of that task, its macro-F1 is at least the current model's
minus `margin`. A holdout with fewer labelled examples is "not enough evidence" and does not
block; if no (holdout, task) pair has enough evidence at all, the candidate is refused: there
is nothing showing it is as good as the model it would replace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["pass", "fail", "not enough evidence"]
# Float noise must not turn a drop of exactly `margin` into a refusal (0.80 - 0.02 != 0.78).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Comparison:
    """Both models' macro-F1 on one task of one holdout; `n` labelled examples of the task."""

    holdout: str
    task: str
    n: int
    current: float | None
    candidate: float | None


@dataclass(frozen=True)
class Check:
    holdout: str
    task: str
    n: int
    current: float | None
    candidate: float | None
    verdict: Verdict

    @property
    def drop(self) -> float:
        """How much worse the candidate is (negative: better); NaN without both numbers."""
        if self.current is None or self.candidate is None:
            return math.nan
        return self.current - self.candidate

    def describe(self) -> str:
        return (
            f"{self.task} on the {self.holdout} holdout: candidate {self.candidate:.3f} "
            f"vs current {self.current:.3f} (n={self.n})"
        )


@dataclass
class GateDecision:
    promoted: bool
    why: str
    margin: float
    min_examples: int
    checks: list[Check]

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "why": self.why,
            "margin": self.margin,
            "min_holdout": self.min_examples,
            "checks": [{**asdict(c), "drop": c.drop} for c in self.checks],
        }


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def check(comparison: Comparison, margin: float, min_examples: int) -> Check:
    c = comparison
    if c.n < min_examples or not (_finite(c.current) and _finite(c.candidate)):
        verdict: Verdict = "not enough evidence"
    else:
        assert c.current is not None and c.candidate is not None
        verdict = "pass" if c.candidate >= c.current - margin - _TOLERANCE else "fail"
    return Check(c.holdout, c.task, c.n, c.current, c.candidate, verdict)


def gate_verdict(comparisons: Sequence[Comparison], margin: float = 0.02, min_examples: int = 20) -> GateDecision:
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if min_examples < 1:
        raise ValueError(f"min_examples must be >= 1, got {min_examples}")
    checks = [check(c, margin, min_examples) for c in comparisons]
    failed = sorted((c for c in checks if c.verdict == "fail"), key=lambda c: -c.drop)
    passed = sorted((c for c in checks if c.verdict == "pass"), key=lambda c: -c.drop)
    thin = [c for c in checks if c.verdict == "not enough evidence"]
    thin_note = ""
    if thin:
        listed = ", ".join(f"{c.task} on {c.holdout} (n={c.n})" for c in thin)
        thin_note = f" Not enough evidence (fewer than {min_examples} labelled examples), not gated: {listed}."
    if failed:
        worst = failed[0]
        why = (
            f"Refused: {worst.describe()}, a drop of {worst.drop:.3f}, more than the margin {margin:.3f}."
            + (
                " Also below the margin: " + "; ".join(c.describe() for c in failed[1:]) + "."
                if len(failed) > 1
                else ""
            )
            + thin_note
        )
        return GateDecision(False, why, margin, min_examples, checks)
    if not passed:
        why = (
            f"Refused: no holdout has {min_examples} or more labelled examples of any task, so nothing "
            f"shows the candidate is as good as the current model." + thin_note
        )
        return GateDecision(False, why, margin, min_examples, checks)
    closest = passed[0]
    why = (
        f"Promoted: macro-F1 is no more than {margin:.3f} below the current model on every task and holdout "
        f"with enough evidence ({len(passed)} checked); closest: {closest.describe()}." + thin_note
    )
    return GateDecision(True, why, margin, min_examples, checks)
