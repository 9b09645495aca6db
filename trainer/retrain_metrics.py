"""Prometheus metrics of the retraining job (served with --metrics-port in watch mode)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RUNS = Counter(
    "modstream_retrain_runs_total",
    "Retraining runs by outcome (skipped, promoted, refused, publish_failed, failed)",
    ["outcome"],
)
OUTCOMES = ("skipped", "promoted", "refused", "publish_failed", "failed")
for _outcome in OUTCOMES:  # every series exists from the start, so increase() sees the first run
    RUNS.labels(_outcome)
LAST_RUN = Gauge("modstream_retrain_last_run_timestamp_seconds", "When the last retraining run ended (any outcome)")
PENDING = Gauge("modstream_retrain_new_decisions", "Labelled review decisions no retrained version has seen yet")
CANDIDATE_F1 = Gauge(
    "modstream_retrain_candidate_macro_f1", "Macro-F1 of the last candidate per task and holdout", ["task", "holdout"]
)
CURRENT_F1 = Gauge(
    "modstream_retrain_current_macro_f1",
    "Macro-F1 of the current model on the last run's holdouts, per task and holdout",
    ["task", "holdout"],
)
