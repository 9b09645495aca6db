"""Whether a model's ITM score may route posts to review, decided from validation evidence.

Pure logic shared by training (which records the decision and why in the card) and the
worker (which re-decides with its own floors). Two pieces of evidence, each with its size:

- ITM AUROC (matched vs swapped pairs) with a bootstrap interval: can ITM tell pairs apart?
- per task, the routing lift (error rate among the lowest-ITM posts / overall) with a
  bootstrap interval and the number of validation errors behind it: does a weak match
  concentrate the model's mistakes?

A lift estimated from a handful of errors says nothing either way ("not enough evidence"
is not "lift 0"), so it never switches routing off; only a task with enough errors whose
whole interval lies below the floor counts against ITM, and ITM is switched off when that
holds for every task that has enough errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MIN_ERRORS = 20  # validation errors needed before a lift estimate may count against ITM


@dataclass(frozen=True)
class GateFloors:
    min_auroc: float = 0.6
    min_lift: float = 1.0
    min_errors: int = MIN_ERRORS


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _interval(value: Any) -> tuple[float, float] | None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    lo, hi = _finite(value[0]), _finite(value[1])
    return None if lo is None or hi is None else (lo, hi)


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def decide_itm_routing(itm: Mapping[str, Any], floors: GateFloors = GateFloors()) -> tuple[bool, str]:
    """(enabled, why) from a card's `itm` block.

    Reads `trained`, `auroc`, `auroc_ci`, `threshold` and `routing_evidence`
    (task -> {lift, lift_ci, n_errors}); cards made before the evidence was recorded carry
    only `routing_lift` (task -> lift) and their lifts are treated as of unknown size."""
    if not itm.get("trained"):
        return False, "the model was trained without the ITM loss"
    if itm.get("threshold") is None:
        return False, "no ITM threshold in the card or configuration"
    auroc = _finite(itm.get("auroc"))
    auroc_ci = _interval(itm.get("auroc_ci"))
    if auroc is None:
        return False, "no validated ITM AUROC"
    if auroc < floors.min_auroc:
        return False, f"validated ITM AUROC {auroc:.2f}{_fmt_ci(auroc_ci)} is below the floor {floors.min_auroc}"

    evidence = itm.get("routing_evidence") or {}
    against, thin, supporting = [], [], []
    if evidence:
        for task, ev in sorted(evidence.items()):
            lift, ci, errors = _finite(ev.get("lift")), _interval(ev.get("lift_ci")), int(ev.get("n_errors") or 0)
            if lift is None or errors < floors.min_errors:
                thin.append(f"{task}: {errors} errors")
            elif ci is not None and ci[1] < floors.min_lift:
                against.append(f"{task} lift {lift:.2f}{_fmt_ci(ci)} from {errors} errors")
            else:
                supporting.append(f"{task} lift {lift:.2f}{_fmt_ci(ci)} from {errors} errors")
    else:  # an older card: lifts of unknown sample size never block
        for task, value in sorted((itm.get("routing_lift") or {}).items()):
            lift = _finite(value)
            thin.append(f"{task}: lift {lift:.2f} of unknown size" if lift is not None else f"{task}: no lift")

    if against and not supporting:
        return False, (
            f"ITM does not concentrate errors: {'; '.join(against)} (interval below the floor {floors.min_lift})"
        )
    parts = [f"validated ITM AUROC {auroc:.2f}{_fmt_ci(auroc_ci)}"]
    if supporting:
        parts.append("routing " + "; ".join(supporting))
    if against:
        parts.append("but " + "; ".join(against))
    if thin:
        parts.append(f"not enough evidence on the lift ({'; '.join(thin)}; needs {floors.min_errors})")
    return True, "ITM routing enabled: " + ", ".join(parts)
