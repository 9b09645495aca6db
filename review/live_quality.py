"""How good the live model is, from reviewers' verdicts (issue: live quality).

Every labelling decision on `reviewed` is one outcome per task it labels: the model said
positive or not (`model_labels[task].decision`), the reviewer said positive or not (confirm:
as the model; not_violating: negative; correct: the other label, tasks being binary). Counted
by the item's kind: `audit` decisions (a blind random sample of the model's confident labels,
stream/audit_sampling.py) estimate live precision, recall and F1 without routing's bias;
`routed` ones say how often routing's picks are wrong. The dataset sink counts each post's
first labelling decision once it is committed (`modstream_live_outcomes_total`); Prometheus
turns the counters into rates, Wilson intervals and alerts (deploy/prometheus/rules).
"""

from __future__ import annotations

from collections.abc import Iterator

from modstream.records import ReviewDecision

OUTCOMES = ("tp", "fp", "fn", "tn")


def task_outcomes(decision: ReviewDecision) -> Iterator[tuple[str, str]]:
    """(task, outcome) for every task the decision labels and the model scored."""
    for task, verdict in decision.decisions.items():
        model = decision.model_labels.get(task) or {}
        model_positive = model.get("decision")
        if not isinstance(model_positive, bool):
            continue
        if verdict.action == "confirm":
            human_positive = model_positive
        elif verdict.action == "not_violating":
            human_positive = False
        elif verdict.action == "correct":
            human_positive = not model_positive
        else:  # skip, escalate: no verdict
            continue
        if model_positive:
            yield task, "tp" if human_positive else "fp"
        else:
            yield task, "fn" if human_positive else "tn"
