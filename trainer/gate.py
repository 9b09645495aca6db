"""The promotion gate: numbers in, decision and a sentence saying why out (no I/O, no torch).

A candidate is promoted only when, on every holdout, for every task with at least
`min_examples` labelled examples its macro-F1 is at least the current model's minus `margin`,
and, where the holdout has at least `min_examples` image-text pairs with a known target, its
ITM AUROC is at least the current model's minus `itm_margin`: routing to review rests on the
ITM score, so a candidate whose labels are as good but whose mismatch detection eroded is
refused (a retrain on reviewed pairs taken as matches did exactly that). Likewise, where both
models make at least `min_examples` wrong decisions on a holdout, the routing lift of each
card's review policy at its budget (trainer/routing_quality.py) must be at least the current
one's minus `lift_margin`. An AUROC from a few hundred pairs, and a lift from a few dozen
errors, move by more than their margins by chance, so with `drop_ci` (the 95% interval of the
drop from a paired bootstrap on the same posts) such a drop refuses only when the interval
lies above zero. Macro-F1 drops beyond the margin refuse whatever their interval (the
interval is reported): labels are what the product sells. A check with fewer examples is
"not enough evidence" and does not block; if no label check has enough evidence, the
candidate is refused: nothing shows it is as good as the model it would replace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["pass", "fail", "not enough evidence"]
# Float noise must not turn a drop of exactly `margin` into a refusal (0.80 - 0.02 != 0.78).
_TOLERANCE = 1e-9


METRIC_NAMES = {"macro_f1": "macro-F1", "itm_auroc": "ITM AUROC", "routing_lift": "routing lift"}
# Checks whose drop refuses only when its paired interval lies above zero (see above).
NOISE_TOLERANT = ("itm_auroc", "routing_lift")
_ORDER = {"macro_f1": 0, "itm_auroc": 1, "routing_lift": 2}


@dataclass(frozen=True)
class Comparison:
    """Both models' `metric` on one task of one holdout (task "itm" for the ITM AUROC,
    "routing" for the routing lift); `n` the evidence: labelled examples of the task,
    image-text pairs with a known target for ITM, the fewer wrong decisions of the two models
    for routing."""

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
        subject = self.task if self.metric == "macro_f1" else METRIC_NAMES[self.metric]
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
    lift_margin: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "why": self.why,
            "margin": self.margin,
            "itm_margin": self.margin if self.itm_margin is None else self.itm_margin,
            "lift_margin": self.lift_margin,
            "min_holdout": self.min_examples,
            "checks": [{**asdict(c), "drop": c.drop} for c in self.checks],
        }


def _num(value: float | None) -> str:
    return f"{value:.3f}" if _finite(value) else "none"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def check(comparison: Comparison, margin: float, min_examples: int) -> Check:
    c = comparison
    if c.metric in NOISE_TOLERANT and c.n >= min_examples and _finite(c.current) and not _finite(c.candidate):
        # The current model detects mismatches (or routes errors) and the candidate cannot (no
        # ITM head trained, no score): routing would lose its signal, the erosion checked for.
        verdict: Verdict = "fail"
    elif c.n < min_examples or not (_finite(c.current) and _finite(c.candidate)):
        verdict = "not enough evidence"
    else:
        assert c.current is not None and c.candidate is not None
        beyond = c.candidate < c.current - margin - _TOLERANCE
        noise = (
            c.metric in NOISE_TOLERANT
            and c.drop_ci is not None
            and not (math.isfinite(c.drop_ci[0]) and c.drop_ci[0] > 0)
        )
        verdict = "fail" if beyond and not noise else "pass"
    return Check(c.holdout, c.task, c.n, c.current, c.candidate, verdict, c.metric, margin, c.drop_ci)


def gate_verdict(
    comparisons: Sequence[Comparison],
    margin: float = 0.02,
    min_examples: int = 20,
    itm_margin: float | None = None,
    lift_margin: float = 0.1,
) -> GateDecision:
    """`itm_margin`: the largest ITM AUROC drop allowed (default: `margin`); `lift_margin`:
    the largest routing lift drop allowed (lift is a ratio, 1 = no better than chance)."""
    itm_margin = margin if itm_margin is None else itm_margin
    if margin < 0 or itm_margin < 0 or lift_margin < 0:
        raise ValueError(f"margins must be >= 0, got {margin}, {itm_margin} and {lift_margin}")
    if min_examples < 1:
        raise ValueError(f"min_examples must be >= 1, got {min_examples}")
    margins = {"macro_f1": margin, "itm_auroc": itm_margin, "routing_lift": lift_margin}
    checks = [check(c, margins[c.metric], min_examples) for c in comparisons]
    # The reason leads with labels, then ITM, then routing (the metrics have different scales,
    # so drops are compared within one); within a metric the largest excess first, no score worst.
    failed = sorted(
        (c for c in checks if c.verdict == "fail"),
        key=lambda c: (_ORDER[c.metric], -(c.drop - c.margin) if math.isfinite(c.drop) else -math.inf),
    )
    passed = sorted((c for c in checks if c.verdict == "pass"), key=lambda c: (_ORDER[c.metric], -c.drop))
    label_passed = [c for c in passed if c.metric == "macro_f1"]
    thin = [c for c in checks if c.verdict == "not enough evidence"]
    thin_note = ""
    if thin:
        listed = ", ".join(f"{c.task} on {c.holdout} (n={c.n})" for c in thin)
        thin_note = f" Not enough evidence (fewer than {min_examples} examples or errors), not gated: {listed}."
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
        return GateDecision(False, why, margin, min_examples, checks, itm_margin, lift_margin)
    if not label_passed:
        why = (
            f"Refused: no holdout has {min_examples} or more labelled examples of any task, so nothing "
            f"shows the candidate is as good as the current model." + thin_note
        )
        return GateDecision(False, why, margin, min_examples, checks, itm_margin, lift_margin)
    closest = passed[0]
    itm_checked = sum(1 for c in passed if c.metric == "itm_auroc")
    itm_note = (
        f" and ITM AUROC no more than {itm_margin:.3f} below on {itm_checked} holdout(s)"
        if itm_checked
        else " (ITM AUROC not gated: no holdout has enough pairs with a known target)"
    )
    lift_checked = sum(1 for c in passed if c.metric == "routing_lift")
    lift_note = (
        f" and routing lift no more than {lift_margin:.2f} below on {lift_checked} holdout(s)"
        if lift_checked
        else " (routing lift not gated: no holdout has enough errors of both models)"
    )
    why = (
        f"Promoted: macro-F1 is no more than {margin:.3f} below the current model on every task and holdout "
        f"with enough evidence ({len(label_passed)} checked){itm_note}{lift_note}; closest: {closest.describe()}."
        + thin_note
    )
    return GateDecision(True, why, margin, min_examples, checks, itm_margin, lift_margin)
