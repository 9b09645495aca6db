"""Gated retraining: turn reviewers' decisions into a candidate model, and promote it only
when it is not worse than the current one on fixed holdouts.

One run:
1. count labelled decisions that no retrained version has looked at; fewer than `min_new`
   means nothing to do (unless forced);
2. rebuild the current version's recipe (its card's ModelConfig and TrainConfig), load base
   data (what the current card records, or a manifest / preset given by the operator) and
   the reviewed data; hold out a fixed hash-chosen share of the base data and of the reviewed
   posts (never trained on by any version);
3. score the current model on both holdouts, fine-tune a candidate from the current
   version's weights on everything else, score it the same way (each model with its own
   card's temperatures and thresholds);
4. gate (trainer/gate.py), save the candidate always (current only when promoted) with a
   card saying why, write gate.json / gate.png next to it; when promoted, point CURRENT at
   it and only then publish {"version", "parent", "reason"} on `model-updates`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.card import ModelCard
from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.losses import IGNORE_INDEX
from models.objectives import ObjectiveConfig
from models.registry import CURRENT, CurrentMoved, ModelRegistry, RegistryError
from modstream.manifest import Example, read_complete_lines, read_manifest
from modstream.records import ModelUpdate
from modstream.updates import UPDATES_TOPIC, Publisher
from trainer import retrain_metrics as metrics
from trainer.calibration import Calibration, decisions, score
from trainer.evaluate import auroc_drop_interval, macro_f1_drop_interval
from trainer.features import FeatureStore, build_features, load_inputs
from trainer.fit import fit, pick_device, trainable_tasks
from trainer.gate import Comparison, GateDecision, gate_verdict
from trainer.holdout import (
    BASE_FRACTION,
    BASE_RULE,
    REVIEWED_FRACTION,
    decided_at,
    ids_digest,
    resolvable_drop,
    split_base,
    split_reviewed,
)
from trainer.neighbour_fit import pooled_features
from trainer.retrain_report import summary_table, write_json, write_plot
from trainer.reviewed import (
    MANIFEST,
    SeenDecisions,
    decision_key,
    last_seen,
    new_decisions,
    read_reviewed,
    read_seen,
    write_seen,
)
from trainer.routing_fit import policy_inputs
from trainer.routing_quality import RoutedHoldout, card_policy, lift_drop_interval, routing_summary
from trainer.train import TrainConfig, evaluate_split, label_tensors

log = logging.getLogger(__name__)
# audit: the blind audit verdicts (stream/audit_sampling.py), a sample of the stream as it is
# rather than of what routing found hard; never trained on, so it judges both models fairly.
HOLDOUTS = ("base", "reviewed", "audit")
Status = Literal["skipped", "promoted", "refused"]


class RetrainError(RuntimeError):
    """A run that cannot start or finish; the message says what to do."""


@dataclass
class RetrainOptions:
    registry: Path
    reviewed: Path
    work_dir: Path  # generated base data (synthetic preset)
    cache_dir: Path | None = None
    device: str = "auto"
    # None: the base data the current card records in training["data_source"].
    base_source: dict[str, Any] | None = None
    min_new: int = 50
    margin: float = 0.02
    itm_margin: float = 0.02  # largest ITM AUROC drop allowed on a holdout
    lift_margin: float = 0.1  # largest routing lift drop allowed on a holdout
    min_holdout: int = 20
    force: bool = False
    epochs: int | None = None
    base_fraction: float = BASE_FRACTION
    reviewed_fraction: float = REVIEWED_FRACTION
    progress: bool = False
    # Called with the update message once CURRENT names the promoted version; None: offline.
    publisher: Publisher | None = None


@dataclass
class RetrainOutcome:
    status: Status
    message: str
    new_decisions: int
    parent: str | None = None
    version: str | None = None
    decision: GateDecision | None = None
    report: dict[str, Any] | None = None
    published: bool = False
    publish_error: str | None = None
    report_dir: Path | None = None

    @property
    def outcome(self) -> str:
        """The metric label: a promotion whose update could not be published is its own outcome."""
        return "publish_failed" if self.publish_error else self.status


# ---------------------------------------------------------------------------------- inputs


def base_source(opts: RetrainOptions, parent: ModelCard) -> dict[str, Any]:
    source = opts.base_source if opts.base_source is not None else parent.training.get("data_source")
    if not isinstance(source, dict) or not source:
        raise RetrainError(
            f"the current model {parent.version} does not record its base training data (training.data_source "
            "in its card): give --base-manifest FILE or --base-preset synthetic"
        )
    if "manifest" in source:
        return {"manifest": str(Path(source["manifest"]).resolve())}
    return dict(source)


def load_base(source: dict[str, Any], work_dir: Path) -> list[Example]:
    if "manifest" in source:
        path = Path(source["manifest"])
        if not path.is_file():
            raise RetrainError(f"base manifest {path} does not exist")
        return read_manifest(path)
    preset = source.get("preset")
    if preset == "synthetic":
        from trainer.synthetic import write_synthetic

        n, seed = int(source.get("n", 1200)), int(source.get("seed", 0))
        image_size, mismatch = int(source.get("image_size", 96)), float(source.get("mismatch_rate", 0.1))
        # One folder per parameter set: regenerating another size in place would thrash.
        folder = Path(work_dir) / f"synthetic-n{n}-seed{seed}-{image_size}px-mm{mismatch:g}"
        return read_manifest(write_synthetic(folder, n, seed, image_size=image_size, mismatch_rate=mismatch))
    if preset == "cm-off-meme":
        from trainer.importers import import_cm_off_meme

        return import_cm_off_meme(with_text_only=bool(source.get("with_text_only", False))).examples
    raise RetrainError(f"unknown base data source {source!r}: expected {{'manifest': PATH}} or a preset")


def warn_untrained_tasks(folder: Path, tasks: Mapping[str, Sequence[str]]) -> Counter[str]:
    """Reviewers may label a task the current model was not trained on (it has no head for
    it): those labels cannot be used by fine-tuning this model and are ignored, said here
    with their count rather than dropped silently. Returns the count per such task."""
    manifest = Path(folder) / MANIFEST
    other: Counter[str] = Counter()
    if manifest.is_file():
        for ex in read_complete_lines(manifest, latest=True):
            other.update(t for t, v in ex.labels.items() if v is not None and t not in tasks)
    if other:
        log.warning(
            "reviewed labels for task(s) the current model has no head for are ignored: %s "
            "(train a new model on data labelling them to add a task)",
            dict(other),
        )
    return other


def recipe(card: ModelCard, epochs: int | None, progress: bool) -> tuple[ModelConfig, TrainConfig]:
    """The current version's ModelConfig and TrainConfig, rebuilt from its card."""
    raw = card.training.get("config")
    if not isinstance(raw, dict):
        raise RetrainError(f"the card of {card.version} has no training.config to retrain with")
    data = dict(raw)
    objective = data.pop("objective", None)
    unknown = set(data) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise RetrainError(f"the card of {card.version} has unknown training config fields {sorted(unknown)}")
    cfg = TrainConfig(**data, objective=ObjectiveConfig(**objective) if objective else ObjectiveConfig())
    if epochs is not None:
        cfg.epochs = epochs
    cfg.progress = progress
    return ModelConfig.from_dict(card.config.to_dict()), cfg


# ------------------------------------------------------------------------------ evaluation


def evaluate_model(
    model: MultimodalModel,
    tokenizer: Any,
    card: ModelCard,
    examples: Sequence[Example],
    cache_dir: Path | None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """One model on one holdout under its own card's calibration (temperatures, thresholds)
    and its own review policy: {"n": task -> labelled examples, "macro_f1": task -> F1,
    "itm_auroc", "routing": the policy's lift at its budget (trainer/routing_quality.py),
    "tasks": reports}, plus private arrays (keys starting "_") for the gate's paired
    intervals, dropped before the numbers are written to a card."""
    tasks = card.tasks
    empty: dict[str, Any] = {
        "n": {t: 0 for t in tasks}, "macro_f1": {}, "itm_auroc": None, "n_itm": 0, "routing": None, "tasks": {},
    }  # fmt: skip
    if not examples:
        return empty
    dev = pick_device(device)
    model.to(dev)
    inputs = load_inputs(examples)
    features = build_features(model, tokenizer, inputs, FeatureStore(cache_dir), dev, progress)
    labels = label_tensors(inputs.examples, tasks)
    split = evaluate_split(model, features, labels)
    cal = Calibration(dict(card.temperatures), dict(card.thresholds), card.itm.get("threshold"))
    scores = score(split, tasks, cal)
    pairs = split.itm_pairs()
    predictions = {
        t: (split.labels[t], decisions(split.logits[t], cal.temperatures.get(t, 1.0), cal.thresholds.get(t))[1])
        for t in tasks
    }
    routed = _routed(model, card, split, cal, features)
    return {
        "n": {t: int((y != IGNORE_INDEX).sum()) for t, y in labels.items()},
        "macro_f1": scores["macro_f1"],
        "itm_auroc": scores["itm_auroc"] if card.itm.get("trained") else None,
        "itm_auroc_ci": scores["itm_auroc_ci"] if card.itm.get("trained") else None,
        # Pairs with a known target that the ITM AUROC rests on (true pairs; reviewed ones only
        # where the reviewer answered), the evidence the gate's ITM check counts.
        "n_itm": int(np.isfinite(pairs[0]).sum()),
        "routing": routing_summary(*routed) if routed else None,
        "tasks": scores["tasks"],
        ITM_PAIRS: pairs,
        PREDICTIONS: predictions,
        ROUTED: routed[0] if routed else None,
    }


# The arrays behind the numbers, for the gate's paired intervals (not written to cards).
ITM_PAIRS, PREDICTIONS, ROUTED = "_itm_pairs", "_predictions", "_routed"


def _routed(
    model: MultimodalModel, card: ModelCard, split: Any, cal: Calibration, features: Any
) -> tuple[RoutedHoldout, str] | None:
    """The holdout as the card's review policy routes it: each post's review score from what
    the worker would see (calibrated scores, ITM match, the labelled neighbours' disagreement
    where the model has a neighbour index) and how many of its decisions are wrong."""
    chosen = card_policy(card)
    binary = [t for t in card.tasks if t in cal.thresholds]
    if chosen is None or not binary:
        return None
    spec, budget = chosen
    shares = None
    if model.neighbours is not None:
        pooled, present = pooled_features(features, range(len(split.itm_match)))
        shares = model.neighbours.label_shares(pooled, present)
    inputs, truth = policy_inputs(split, cal, binary, shares)
    routed = RoutedHoldout.of(spec, budget, inputs, truth["errors"], truth["labelled"])
    return routed, str(card.routing.get("name", spec.kind)) if card.routing else "weak ITM match"


def comparisons(evaluation: dict[str, dict[str, Any]], tasks: Mapping[str, Sequence[str]]) -> list[Comparison]:
    """Per holdout: the ITM AUROC (routing rests on it), the card policy's routing lift at its
    budget, and each task's macro-F1, each with the paired interval of its drop."""
    out = []
    for holdout, models in evaluation.items():
        cur, cand = models["current"], models["candidate"]
        drop_ci = None
        if cur.get(ITM_PAIRS) is not None and cand.get(ITM_PAIRS) is not None:
            drop_ci = _finite_interval(auroc_drop_interval(cur[ITM_PAIRS], cand[ITM_PAIRS]))
        out.append(
            Comparison(
                holdout,
                "itm",
                int(cand.get("n_itm", 0)),
                cur.get("itm_auroc"),
                cand.get("itm_auroc"),
                metric="itm_auroc",
                drop_ci=drop_ci,
            )
        )
        out.append(_lift_comparison(holdout, cur, cand))
        for task, labels in tasks.items():
            f1_ci = None
            if task in cur.get(PREDICTIONS, {}) and task in cand.get(PREDICTIONS, {}):
                y, pred_cur = cur[PREDICTIONS][task]
                pred_cand = cand[PREDICTIONS][task][1]
                f1_ci = _finite_interval(macro_f1_drop_interval(y, pred_cur, pred_cand, len(labels)))
            out.append(
                Comparison(
                    holdout,
                    task,
                    int(cand["n"].get(task, 0)),
                    cur["macro_f1"].get(task),
                    cand["macro_f1"].get(task),
                    drop_ci=f1_ci,
                )
            )
    return out


def _lift_comparison(holdout: str, cur: dict[str, Any], cand: dict[str, Any]) -> Comparison:
    """The routing check: its evidence is the fewer wrong decisions of the two models (a lift
    from a handful of errors is noise)."""
    cur_routing, cand_routing = cur.get("routing") or {}, cand.get("routing") or {}
    # No routing for the current model (its routing is None): n = 0, nothing to erode.
    n = int(min(cur_routing.get("n_errors", 0), cand_routing.get("n_errors", 0)))
    drop_ci = None
    if cur.get(ROUTED) is not None and cand.get(ROUTED) is not None:
        drop_ci = _finite_interval(lift_drop_interval(cur[ROUTED], cand[ROUTED]))
    return Comparison(
        holdout,
        "routing",
        n,
        _finite_or_none(cur_routing.get("lift")),
        _finite_or_none(cand_routing.get("lift")),
        metric="routing_lift",
        drop_ci=drop_ci,
    )


def _finite_interval(interval: Sequence[float]) -> tuple[float, float] | None:
    low, high = interval
    return (low, high) if np.isfinite(low) and np.isfinite(high) else None


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


def lineage_saw_base_holdout(
    registry: ModelRegistry, version: str, source: dict[str, Any], fraction: float
) -> str | None:
    """The first version in `version`'s ancestry (itself included) trained without this base
    holdout set aside, or None. Candidates start from the current weights, so such an
    ancestor's exposure reaches both models."""
    visited: set[str] = set()
    current: str | None = version
    while current and current not in visited:
        visited.add(current)
        try:
            training = registry.card(current).training
        except (RegistryError, ValueError, OSError):
            return current  # unknown history: assume it saw the holdout
        held = training.get("holdouts", {}).get("base", {})
        if training.get("data_source") != source or held.get("fraction") != fraction:
            return current
        current = training.get("parent_version")
    return None


# ------------------------------------------------------------------------------- publishing


# ------------------------------------------------------------------------------------ a run


def _newest(examples: Sequence[Example]) -> str | None:
    return max(decided_at(ex) for ex in examples).isoformat() if examples else None


@contextlib.contextmanager
def _one_run_at_a_time(registry_root: Path) -> Iterator[None]:
    """Two runs on one registry (cron overlapping a watch) would train twice and race for
    the next version number: the second one stops with a clear error instead."""
    registry_root.mkdir(parents=True, exist_ok=True)
    with (registry_root / ".retrain.lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RetrainError(
                f"another retraining run is using {registry_root}; try again when it has finished"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_retrain(opts: RetrainOptions) -> RetrainOutcome:
    with _one_run_at_a_time(Path(opts.registry)):
        return _run(opts)


def _run(opts: RetrainOptions) -> RetrainOutcome:
    from tqdm import tqdm

    registry = ModelRegistry(opts.registry)
    try:
        parent = registry.resolve(CURRENT)
    except RegistryError as exc:
        raise RetrainError(
            f"{exc}: register a first model (modstream train or modstream demo) before retraining"
        ) from exc
    parent_card = registry.card(parent)
    tasks = parent_card.tasks
    warn_untrained_tasks(opts.reviewed, tasks)
    reviewed = read_reviewed(opts.reviewed, tasks)
    seen = last_seen(registry)
    new = new_decisions(reviewed, seen)
    metrics.PENDING.set(len(new))
    since = f"since {seen.version}" if seen.version else "in total (no retrained version yet)"
    if len(new) < opts.min_new and not opts.force:
        message = f"{len(new)} new labelled decision(s) {since}; retraining needs {opts.min_new}: nothing to do"
        return RetrainOutcome("skipped", message, len(new), parent)

    steps = tqdm(total=4, desc="retrain", disable=not opts.progress)
    source = base_source(opts, parent_card)
    model_cfg, train_cfg = recipe(parent_card, opts.epochs, opts.progress)
    base = load_base(source, opts.work_dir)
    base_train, base_holdout = split_base(base, opts.base_fraction)
    audit_holdout = [ex for ex in reviewed if ex.meta.get("kind") == "audit"]
    routed = [ex for ex in reviewed if ex.meta.get("kind") != "audit"]
    rev_train, rev_holdout = split_reviewed(routed, opts.reviewed_fraction) if routed else ([], [])
    held = {ex.id for ex in base_holdout} | {ex.id for ex in rev_holdout} | {ex.id for ex in audit_holdout}
    reviewed_ids = {ex.id for ex in reviewed}
    # Nothing held out is trained on, whichever source an id also appears in; a post that is
    # both base data and reviewed trains with the reviewer's (later) label.
    base_train = [ex for ex in base_train if ex.id not in held and ex.id not in reviewed_ids]
    set_aside = [ex for ex in rev_train if ex.id in held]
    rev_train = [ex for ex in rev_train if ex.id not in held]
    holdouts = {"base": base_holdout, "reviewed": rev_holdout, "audit": audit_holdout}
    steps.set_postfix_str(f"{len(base_train)} base + {len(rev_train)} reviewed to train")
    steps.update()

    lost = [t for t in tasks if t not in trainable_tasks(base_train + rev_train, tasks)]
    if lost:
        raise RetrainError(
            f"the retraining data labels no example of task(s) {lost} that {parent} serves; "
            "a candidate without them cannot replace it"
        )
    evaluation: dict[str, dict[str, Any]] = {h: {} for h in HOLDOUTS}
    current = registry.load(parent)
    for h in HOLDOUTS:
        evaluation[h]["current"] = evaluate_model(
            current.model, current.tokenizer, current.card, holdouts[h], opts.cache_dir, opts.device, opts.progress
        )
    del current
    steps.update()

    start = registry.load(parent)  # the candidate fine-tunes a fresh copy of the current weights
    fitted = fit(
        base_train + rev_train,
        model_cfg,
        train_cfg,
        cache_dir=opts.cache_dir,
        device=opts.device,
        model_and_tokenizer=(start.model, start.tokenizer),
    )
    steps.update()
    for h in HOLDOUTS:
        evaluation[h]["candidate"] = evaluate_model(
            fitted.model, fitted.tokenizer, fitted.card, holdouts[h], opts.cache_dir, opts.device, opts.progress
        )
    decision = gate_verdict(
        comparisons(evaluation, tasks), opts.margin, opts.min_holdout, opts.itm_margin, opts.lift_margin
    )
    for models in evaluation.values():  # the raw arrays served the gate; cards keep the numbers
        for result in models.values():
            for key in (ITM_PAIRS, PREDICTIONS, ROUTED):
                result.pop(key, None)
    moved = registry.current()
    if decision.promoted and moved != parent:
        # An operator rolled CURRENT forward or back while this run trained: the candidate was
        # gated against a model that no longer serves, so it must not replace that choice.
        decision = dataclasses.replace(
            decision,
            promoted=False,
            why=f"CURRENT moved from {parent} to {moved} during the run; the candidate passed its gate against "
            f"{parent} ({decision.why}) but is not promoted: rerun to gate it against the model now serving",
        )

    card = fitted.card
    seen_by = lineage_saw_base_holdout(registry, parent, source, opts.base_fraction)
    parent_seen = read_seen(registry, parent) or SeenDecisions()
    holdout_keys = [decision_key(ex) for ex in rev_holdout]
    card.training.update(
        {
            "parent_version": parent,
            "data_source": source,
            "n_base_train": len(base_train),
            "reviewed": {
                "folder": str(Path(opts.reviewed).resolve()),
                "n_used": len(rev_train),
                "n_available": len(reviewed),
                "new_decisions": len(new),
                "newest_decided_at": _newest(rev_train),
                "decisions_digest": ids_digest(decision_key(ex) for ex in rev_train),
                # The ids themselves are under holdouts.reviewed.
                "holdout_n": len(rev_holdout),
                "holdout_digest": ids_digest(ex.id for ex in rev_holdout),
            },
            "holdouts": {
                "base": {
                    "fraction": opts.base_fraction,
                    "rule": BASE_RULE,
                    "n": len(base_holdout),
                    "resolvable_drop": resolvable_drop(len(base_holdout)),
                    "digest": ids_digest(ex.id for ex in base_holdout),
                    "current_may_have_seen": seen_by is not None,
                    "note": (
                        f"{seen_by} was trained without this holdout set aside, and the current model "
                        f"({parent}) and the candidate descend from its weights: both may have seen it, "
                        "which favours keeping the current model (the safe direction)"
                        if seen_by
                        else "no version in the current model's ancestry trained on this holdout"
                    ),
                },
                "audit": {
                    "rule": "every blind audit verdict (meta.kind audit): never trained on",
                    "n": len(audit_holdout),
                    "resolvable_drop": resolvable_drop(len(audit_holdout)),
                    "digest": ids_digest(ex.id for ex in audit_holdout),
                },
                "reviewed": {
                    "fraction": opts.reviewed_fraction,
                    "rule": "sha256 of a salt and the post id below the fraction (trainer/holdout.py)",
                    "n": len(rev_holdout),
                    # The smallest F1 drop a holdout this size tells from chance, beside the margin.
                    "resolvable_drop": resolvable_drop(len(rev_holdout)),
                    "ids": sorted(ex.id for ex in rev_holdout),
                    "digest": ids_digest(ex.id for ex in rev_holdout),
                    "oldest_decided_at": min(decided_at(ex) for ex in rev_holdout).isoformat() if rev_holdout else None,
                    # Only with --force and no new decisions can the parent have trained on these.
                    "current_trained_on": len(set(holdout_keys) & parent_seen.trained_on),
                },
            },
        }
    )
    card.metrics["evaluation"] = {h: {"current_version": parent, **evaluation[h]} for h in HOLDOUTS}
    card.metrics["promotion"] = decision.to_dict()

    version = registry.save(fitted.model, fitted.tokenizer, card, make_current=False)
    vdir = registry.root / version
    write_seen(vdir, (decision_key(ex) for ex in rev_train), holdout_keys, (decision_key(ex) for ex in set_aside))
    report = {
        "version": version,
        "parent": parent,
        "promoted": decision.promoted,
        "why": decision.why,
        "margin": decision.margin,
        "itm_margin": decision.to_dict()["itm_margin"],
        "lift_margin": decision.lift_margin,
        "min_holdout": decision.min_examples,
        "checks": decision.to_dict()["checks"],
        "evaluation": card.metrics["evaluation"],
    }
    write_json(report, vdir / "gate.json")
    write_plot(decision, parent, version, vdir / "gate.png")
    steps.update()
    steps.close()

    outcome = RetrainOutcome(
        "promoted" if decision.promoted else "refused",
        decision.why,
        len(new),
        parent,
        version,
        decision,
        report,
        report_dir=vdir,
    )
    if decision.promoted:
        # CURRENT first: a worker starting between the two steps reads CURRENT after subscribing.
        # Compare and set: the check above and this write are seconds apart (saving the version).
        try:
            registry.set_current(version, expect=parent)
        except CurrentMoved as exc:
            why = (
                f"CURRENT moved from {parent} to {exc.now} while {version} was being saved; it passed its gate "
                f"against {parent} ({decision.why}) but is not promoted: rerun to gate it against the model now serving"
            )
            decision = dataclasses.replace(decision, promoted=False, why=why)
            card.metrics["promotion"] = decision.to_dict()
            registry.rewrite_card(version, card)
            report["promoted"], report["why"] = False, why
            write_json(report, vdir / "gate.json")
            outcome.status, outcome.message, outcome.decision = "refused", why, decision
            return outcome
        if opts.publisher is not None:
            try:
                opts.publisher(ModelUpdate(version, parent, "retrain").to_json())
                outcome.published = True
            except Exception as exc:
                log.error("%s is CURRENT but its update could not be published on %s: %r", version, UPDATES_TOPIC, exc)
                outcome.publish_error = repr(exc)
    return outcome


# ------------------------------------------------------------------------- watch and metrics


def record(outcome: RetrainOutcome | None) -> None:
    """Count a run (None: it failed) and export the last candidate's scores."""
    import time

    metrics.RUNS.labels(outcome.outcome if outcome else "failed").inc()
    metrics.LAST_RUN.set(time.time())
    if outcome and outcome.decision:
        for c in outcome.decision.checks:
            metrics.CANDIDATE_F1.labels(c.task, c.holdout).set(float("nan") if c.candidate is None else c.candidate)
            metrics.CURRENT_F1.labels(c.task, c.holdout).set(float("nan") if c.current is None else c.current)


def run_once(opts: RetrainOptions) -> RetrainOutcome | None:
    """One run that never raises: a failure is logged and counted, and None returned."""
    try:
        outcome = run_retrain(opts)
    except (RetrainError, ValueError, OSError) as exc:  # bad input or state: the message says it all
        log.error("retraining run failed: %s", exc)
        record(None)
        return None
    except Exception:  # anything else is a bug: keep the traceback
        log.exception("retraining run failed")
        record(None)
        return None
    record(outcome)
    return outcome


def watch(
    opts: RetrainOptions,
    interval_s: float,
    stop: threading.Event | None = None,
    on_outcome: Callable[[RetrainOutcome | None], None] | None = None,
) -> None:
    """Check, retrain when due, sleep; until `stop` is set. Failed runs do not end the loop."""
    stop = stop or threading.Event()
    while not stop.is_set():
        outcome = run_once(opts)
        if on_outcome is not None:
            on_outcome(outcome)
        if stop.wait(interval_s):
            break


def describe(outcome: RetrainOutcome) -> str:
    """The operator's summary of a run."""
    if outcome.decision is None or outcome.version is None or outcome.parent is None:
        return outcome.message
    lines = [summary_table(outcome.decision, outcome.parent, outcome.version)]
    if outcome.report_dir is not None:
        lines.append(f"candidate {outcome.version} saved; gate report: {outcome.report_dir}/gate.json, gate.png")
    if outcome.status == "promoted":
        lines.append(f"{outcome.version} is now CURRENT (parent {outcome.parent})")
        if outcome.published:
            lines.append(f"published on {UPDATES_TOPIC}")
        elif outcome.publish_error:
            lines.append(
                f"NOT published on {UPDATES_TOPIC} ({outcome.publish_error}): running workers keep the old model "
                "until they restart or the update is re-sent (modstream retrain --publish-current)"
            )
        else:
            lines.append("not published (--no-publish)")
    else:
        lines.append(f"{outcome.version} kept for inspection; {outcome.parent} stays CURRENT")
    return "\n".join(lines)
