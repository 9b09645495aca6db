"""Review-routing policies: which posts a human should see, scored from what the worker has.

Every policy turns a post's calibrated task scores (P(positive) and the task's threshold,
from the card) and its ITM match probability (None / NaN for text-only posts) into one
review score; a post goes to review when its score >= the policy's `cut`, the validation
quantile that reviews the budgeted share of posts. Kinds:

- "itm": lowest match first (score = -match); text-only posts are never routed by it.
- "uncertainty": closeness to the decision threshold, the most uncertain task counts
  (`task_combine="sum"`: the sum over tasks, favouring posts unsure on several).
  "margin" = 1 - |p - t| / (t or 1 - t, the room on p's side), 1 at the threshold and 0
  at certainty, so tasks with different thresholds compare; "entropy" = binary entropy of p.
  With `itm_weight` w > 0 it adds w * (1 - match): a weak match raises the score (a
  text-only post counts as `itm_fill`, the validation median match, i.e. no evidence).
  With `neighbour_weight` v > 0 each task's term adds v * the disagreement of the post's
  nearest labelled training posts with the model's decision (models/neighbours.py; a post
  without one, e.g. a label cached before the model had an index, counts as `neighbour_fill`).
- "combined": per task a logistic model of "the model is wrong on this post" over features
  of the scores and ITM (fitted on validation by studies/routing_eval.py); the review
  score is the expected number of wrong task decisions (sum) or the likeliest one (max).

Pure numpy on arrays of posts; `score_post` is the one-post form the worker calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

BUDGETS = (0.05, 0.1, 0.2)
KINDS = ("itm", "uncertainty", "combined")
Uncertainty = Literal["margin", "entropy"]
Combine = Literal["sum", "max"]

WEAK_MATCH = "weak_image_text_match"
LIKELY_ERROR = "likely_error"
NEIGHBOURS_DISAGREE = "neighbours_disagree"  # + "_<task>"

FloatArray = npt.NDArray[np.float64]


@dataclass
class PolicyInputs:
    """Per post: `scores[task]` calibrated P(positive), `thresholds[task]` the card's
    threshold, `itm` the match probability (NaN without an image), `disagreement[task]`
    the labelled neighbours' disagreement with the decision (NaN / absent: unknown)."""

    scores: dict[str, FloatArray]
    thresholds: dict[str, float]
    itm: FloatArray
    disagreement: dict[str, FloatArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.itm)

    def take(self, idx: npt.NDArray[np.int64]) -> PolicyInputs:
        """The posts `idx` of these inputs."""
        return PolicyInputs(
            {t: s[idx] for t, s in self.scores.items()},
            dict(self.thresholds),
            self.itm[idx],
            {t: d[idx] for t, d in self.disagreement.items()},
        )

    @classmethod
    def one(
        cls,
        itm_match: float | None,
        scores: Mapping[str, tuple[float, float]],
        disagreement: Mapping[str, float | None] | None = None,
    ) -> PolicyInputs:
        """A single post as the worker sees it: task -> (score, threshold), and task ->
        neighbour disagreement where the label has one."""
        return cls(
            scores={t: np.array([float(s)]) for t, (s, _) in scores.items()},
            thresholds={t: float(th) for t, (_, th) in scores.items()},
            itm=np.array([math.nan if itm_match is None else float(itm_match)]),
            disagreement={t: np.array([math.nan if d is None else float(d)]) for t, d in (disagreement or {}).items()},
        )


def margin_uncertainty(p: FloatArray, threshold: float) -> FloatArray:
    room = np.where(p >= threshold, 1.0 - threshold, threshold)
    return np.asarray(1.0 - np.abs(p - threshold) / np.maximum(room, 1e-9), dtype=np.float64)


def binary_entropy(p: FloatArray) -> FloatArray:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return np.asarray(-(q * np.log2(q) + (1 - q) * np.log2(1 - q)), dtype=np.float64)


def _task_of(name: str, tasks: Sequence[str]) -> str | None:
    return next((t for t in tasks if name.endswith("_" + t)), None)


def feature_matrix(inputs: PolicyInputs, names: Sequence[str]) -> FloatArray:
    """The combined policy's features by name. Per task t: `p_t` (calibrated probability),
    `signed_t` (p - threshold), `margin_t` (margin uncertainty); `itm` (match probability,
    0 without an image), `itm_missing` (1 without an image), and `itm_x_margin_t`
    (the match times the task's uncertainty: a weak match matters most when unsure)."""
    tasks = list(inputs.scores)
    present = ~np.isnan(inputs.itm)
    itm = np.where(present, inputs.itm, 0.0)
    cols = []
    for name in names:
        task = _task_of(name, tasks)
        if name == "itm":
            cols.append(itm)
        elif name == "itm_missing":
            cols.append((~present).astype(np.float64))
        elif task is None:
            raise ValueError(f"unknown routing feature {name!r} (tasks: {tasks})")
        elif name == f"p_{task}":
            cols.append(inputs.scores[task])
        elif name == f"signed_{task}":
            cols.append(inputs.scores[task] - inputs.thresholds[task])
        elif name == f"margin_{task}":
            cols.append(margin_uncertainty(inputs.scores[task], inputs.thresholds[task]))
        elif name == f"itm_x_margin_{task}":
            cols.append(itm * margin_uncertainty(inputs.scores[task], inputs.thresholds[task]))
        else:
            raise ValueError(f"unknown routing feature {name!r} (tasks: {tasks})")
    return np.stack(cols, axis=1) if cols else np.zeros((len(inputs), 0))


def _reason_of_feature(name: str, tasks: Sequence[str]) -> str:
    """An explanatory review reason for a combined policy's main contributor."""
    task = _task_of(name, tasks)
    if name in ("itm", "itm_missing") or name.startswith("itm_x_"):
        return WEAK_MATCH if name != "itm_missing" else "text_only"
    if name.startswith("margin_"):
        return f"uncertain_{task}"
    return f"score_{task}"  # p_t / signed_t: where on the scale the model errs


@dataclass
class TaskHead:
    """Logistic P(wrong on this task) over standardised features."""

    coef: list[float]
    intercept: float


@dataclass
class RoutingPolicySpec:
    kind: str
    uncertainty: Uncertainty = "margin"
    combine: Combine = "sum"
    task_combine: Combine = "max"  # uncertainty: the most uncertain task, or the sum over tasks
    itm_weight: float = 0.0  # uncertainty + itm_weight * (1 - match)
    itm_fill: float = 0.5  # the match assumed for text-only posts
    neighbour_weight: float = 0.0  # per task: uncertainty + neighbour_weight * disagreement
    neighbour_fill: float = 0.5  # the disagreement assumed where a post has none
    features: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    heads: dict[str, TaskHead] = field(default_factory=dict)
    cut: float | None = None  # review when score >= cut
    budget: float | None = None  # the review share the cut was set for, on validation
    curve: dict[str, Any] = field(default_factory=dict)  # budget -> task -> recall/precision/lift
    # The tasks the policy reads (those it was validated on); empty = every task it is given.
    # A task outside the list (e.g. one the model was not trained on) never routes a post.
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown routing policy kind {self.kind!r}; expected one of {KINDS}")
        if self.uncertainty not in ("margin", "entropy"):
            raise ValueError(f"unknown uncertainty {self.uncertainty!r}; expected margin or entropy")
        if self.combine not in ("sum", "max") or self.task_combine not in ("sum", "max"):
            raise ValueError(f"unknown combine {self.combine!r}; expected sum or max")
        if self.kind == "combined":
            n = len(self.features)
            if not self.heads or len(self.mean) != n or len(self.scale) != n:
                raise ValueError("a combined routing policy needs features, mean, scale and at least one task head")
            for task, head in self.heads.items():
                if len(head.coef) != n:
                    raise ValueError(f"routing head {task!r} has {len(head.coef)} coefficients for {n} features")
            if not all(math.isfinite(s) and s > 0 for s in self.scale):
                raise ValueError("routing feature scales must be finite and > 0")
        if not (math.isfinite(self.itm_weight) and self.itm_weight >= 0 and 0 <= self.itm_fill <= 1):
            raise ValueError("routing itm_weight must be >= 0 and itm_fill in [0, 1]")
        if not (math.isfinite(self.neighbour_weight) and self.neighbour_weight >= 0 and 0 <= self.neighbour_fill <= 1):
            raise ValueError("routing neighbour_weight must be >= 0 and neighbour_fill in [0, 1]")
        if self.cut is not None and math.isnan(self.cut):
            raise ValueError("routing cut must be a number")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"routing budget must be in (0, 1], got {self.budget}")

    # -- scoring

    def _standardised(self, inputs: PolicyInputs) -> FloatArray:
        x = feature_matrix(inputs, self.features)
        return np.asarray((x - np.asarray(self.mean)) / np.asarray(self.scale), dtype=np.float64)

    def task_error_probs(self, inputs: PolicyInputs) -> dict[str, FloatArray]:
        z = self._standardised(inputs)
        return {
            task: 1.0 / (1.0 + np.exp(-(z @ np.asarray(head.coef) + head.intercept)))
            for task, head in self.heads.items()
        }

    def _restrict(self, inputs: PolicyInputs) -> PolicyInputs:
        if not self.tasks:
            return inputs
        missing = [t for t in self.tasks if t not in inputs.scores]
        if missing and self.kind == "combined":
            raise ValueError(f"the routing policy needs the scores of {missing}")
        keep = [t for t in self.tasks if t in inputs.scores]
        return PolicyInputs(
            {t: inputs.scores[t] for t in keep},
            {t: inputs.thresholds[t] for t in keep},
            inputs.itm,
            {t: inputs.disagreement[t] for t in keep if t in inputs.disagreement},
        )

    def scores(self, inputs: PolicyInputs) -> FloatArray:
        """Review score per post, higher = review first; -inf = never (ITM without an image)."""
        inputs = self._restrict(inputs)
        if self.kind == "itm":
            return np.where(np.isnan(inputs.itm), -np.inf, -np.nan_to_num(inputs.itm, nan=0.0))
        if self.kind == "uncertainty":
            if not inputs.scores:
                return np.full(len(inputs), -np.inf)
            uncertain, neighbours = self._task_uncertainty(inputs), self._neighbours(inputs)
            per_task = [uncertain[t] + neighbours[t] for t in uncertain]
            combined = np.sum(per_task, axis=0) if self.task_combine == "sum" else np.max(per_task, axis=0)
            return np.asarray(combined + self._weak_match(inputs))
        probs = list(self.task_error_probs(inputs).values())
        combined = np.sum(probs, axis=0) if self.combine == "sum" else np.max(probs, axis=0)
        return np.asarray(combined, dtype=np.float64)

    def _task_uncertainty(self, inputs: PolicyInputs) -> dict[str, FloatArray]:
        return {
            t: margin_uncertainty(p, inputs.thresholds[t]) if self.uncertainty == "margin" else binary_entropy(p)
            for t, p in inputs.scores.items()
        }

    def _neighbours(self, inputs: PolicyInputs) -> dict[str, FloatArray]:
        """Per task, the neighbour term of the task's score (0 without a neighbour weight)."""
        out = {}
        for t in inputs.scores:
            d = inputs.disagreement.get(t)
            d = (
                np.full(len(inputs), self.neighbour_fill)
                if d is None
                else np.where(np.isnan(d), self.neighbour_fill, d)
            )
            out[t] = np.asarray(self.neighbour_weight * d, dtype=np.float64)
        return out

    def _weak_match(self, inputs: PolicyInputs) -> FloatArray:
        if not self.itm_weight:
            return np.zeros(len(inputs))
        return np.asarray(self.itm_weight * (1.0 - np.where(np.isnan(inputs.itm), self.itm_fill, inputs.itm)))

    def review(self, inputs: PolicyInputs, cut: float | None = None) -> npt.NDArray[np.bool_]:
        threshold = self.cut if cut is None else cut
        if threshold is None:
            raise ValueError("this routing policy has no review cut")
        s = self.scores(inputs)
        return np.asarray(np.isfinite(s) & (s >= threshold))

    def reasons(self, inputs: PolicyInputs) -> list[str]:
        """Why one post (inputs of length 1) scores high, in words an operator can read."""
        inputs = self._restrict(inputs)
        tasks = list(inputs.scores)
        if self.kind == "itm":
            return [WEAK_MATCH]
        if self.kind == "uncertainty":
            uncertain, neighbours = self._task_uncertainty(inputs), self._neighbours(inputs)
            task = max(uncertain, key=lambda t: float(uncertain[t][0] + neighbours[t][0]))
            # Each part of the score names a reason, the largest first: the task's uncertainty
            # always, a weak match or disagreeing neighbours when above half their maximum.
            near, weak = float(neighbours[task][0]), float(self._weak_match(inputs)[0])
            parts = [(float(uncertain[task][0]), f"uncertain_{task}", True)]
            parts.append((near, f"{NEIGHBOURS_DISAGREE}_{task}", near > 0.5 * self.neighbour_weight > 0))
            parts.append((weak, WEAK_MATCH, weak > 0.5 * self.itm_weight > 0))
            parts.sort(key=lambda p: -p[0])
            return [reason for i, (_, reason, counts) in enumerate(parts) if counts or i == 0]
        z = self._standardised(inputs)[0]
        probs = self.task_error_probs(inputs)
        task = max(probs, key=lambda t: float(probs[t][0]))
        contributions = np.asarray(self.heads[task].coef) * z
        main = self.features[int(np.argmax(contributions))] if len(contributions) else ""
        return [LIKELY_ERROR, _reason_of_feature(main, tasks)] if main else [LIKELY_ERROR]

    def score_post(
        self,
        itm_match: float | None,
        scores: Mapping[str, tuple[float, float]],
        disagreement: Mapping[str, float | None] | None = None,
    ) -> float:
        return float(self.scores(PolicyInputs.one(itm_match, scores, disagreement))[0])

    # -- the card

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "cut": self.cut,
            "budget": self.budget,
            "curve": self.curve,
            "tasks": list(self.tasks),
        }
        if self.kind == "uncertainty":
            out["uncertainty"] = self.uncertainty
            out["task_combine"] = self.task_combine
            if self.itm_weight:
                out.update(itm_weight=self.itm_weight, itm_fill=self.itm_fill)
            if self.neighbour_weight:
                out.update(neighbour_weight=self.neighbour_weight, neighbour_fill=self.neighbour_fill)
        if self.kind == "combined":
            out.update(
                combine=self.combine,
                features=list(self.features),
                mean=list(self.mean),
                scale=list(self.scale),
                heads={t: {"coef": list(h.coef), "intercept": h.intercept} for t, h in self.heads.items()},
            )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingPolicySpec:
        if not isinstance(data, Mapping) or "kind" not in data:
            raise ValueError(f"a routing policy needs a 'kind'; got {data!r}")
        try:
            heads = {
                str(t): TaskHead([float(c) for c in h["coef"]], float(h["intercept"]))
                for t, h in (data.get("heads") or {}).items()
            }
            cut, budget = data.get("cut"), data.get("budget")
            return cls(
                kind=str(data["kind"]),
                uncertainty=data.get("uncertainty", "margin"),
                combine=data.get("combine", "sum"),
                task_combine=data.get("task_combine", "max"),
                itm_weight=float(data.get("itm_weight", 0.0)),
                itm_fill=float(data.get("itm_fill", 0.5)),
                neighbour_weight=float(data.get("neighbour_weight", 0.0)),
                neighbour_fill=float(data.get("neighbour_fill", 0.5)),
                features=[str(f) for f in data.get("features") or []],
                mean=[float(v) for v in data.get("mean") or []],
                scale=[float(v) for v in data.get("scale") or []],
                heads=heads,
                cut=None if cut is None else float(cut),
                budget=None if budget is None else float(budget),
                curve=dict(data.get("curve") or {}),
                tasks=[str(t) for t in data.get("tasks") or []],
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed routing policy: {exc!r}") from exc


def itm_only() -> RoutingPolicySpec:
    return RoutingPolicySpec(kind="itm")


def uncertainty(kind: Uncertainty = "margin", task_combine: Combine = "max") -> RoutingPolicySpec:
    return RoutingPolicySpec(kind="uncertainty", uncertainty=kind, task_combine=task_combine)


def review_cut(scores: FloatArray, budget: float) -> float:
    """The cut that reviews `budget` of the posts: the k-th highest finite score, k =
    ceil(budget * n) over all n posts (posts that can never be reviewed still count in n,
    so the budget is a share of all traffic). Ties at the cut are all reviewed."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    s = np.asarray(scores, dtype=np.float64)
    finite = np.sort(s[np.isfinite(s)])[::-1]
    if not finite.size:
        return math.inf
    k = min(finite.size, max(1, math.ceil(round(budget * s.size, 9))))
    return float(finite[k - 1])
