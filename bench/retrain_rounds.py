"""Three rounds of oracle review plus gated retraining on CM-Off: task F1 and routing lift per
round on a fixed test fold (issue 24).

What it measures: whether the review -> retrain -> gate loop keeps a model's quality when the
reviewed data is what the card's policy routes. The CM-Off-Meme posts with an image are split
by a salted sha256 of the id into a fixed test fold (20%; never trained on, never reviewed) and
the rest; the rest into an initial pool (--initial-share, default 60%) and a stream pool cut
into three equal round chunks. Round 0 trains v0001 on the initial pool the way `modstream
train` does (default frozen backbones, the base holdout reserved: --base-fraction, default
30%, of the initial pool; the pool written as a JSONL manifest that `modstream retrain`
reloads). Every retrain holds out the same base share (RetrainOptions.base_fraction) and its
default 20% of the reviewed posts. Each round r = 1..3 then scores its chunk with the CURRENT model
as the gate does (trainer.retrain.evaluate_model: the card's review policy and budget), sends
the top budget share (10%) to an oracle reviewer who answers with the true labels (and "image
and text match": every CM-Off post carries its own image), writes those decisions in the
dataset sink's format, and runs the real retrain job (trainer.retrain.run_retrain, forced).
After round 0 and every round, the model then CURRENT is scored on the test fold: macro-F1
per task with a 95% percentile bootstrap over posts, ITM AUROC with its interval, and the
card policy's routing lift at its budget with its bootstrap interval. The check per round:
no F1 and no routing lift below round 0's lower bound. The check never fails the script; only
a crash does.

--seeds N (default 1) repeats the whole experiment for seeds 0..N-1, each in its own folder
<work>/seed<k>. The seed is v0001's TrainConfig.seed (written to its card, so every retrain
inherits it through trainer.retrain.recipe) and salts the assignment of the non-test posts to
the initial pool and to the round chunks; the test fold is the same for every seed (checked).
Seed 0 keeps the salts and training seed of the single-seed runs. The base holdout stays the
id-hash rule of trainer/holdout.py, so it changes with the initial pool. After the per-seed
tables comes a summary: per seed, whether every round passes the check, which (round, metric)
fall below, and the gate verdicts; the JSON holds all of it ("seeds", "summary").

    OMP_NUM_THREADS=2 .venv/bin/python bench/retrain_rounds.py [--epochs 25] [--patience 4]
        [--base-fraction 0.3] [--initial-share 0.6] [--seeds 1]
        [--work var/bench/retrain_rounds_b0.3_i0.6] [--out var/bench/retrain_rounds_b0.3_i0.6.json]

The first run of this script (BENCHMARKS.md) used --base-fraction 0.1 --initial-share 0.4 (a
43-post base holdout); those flags reproduce it. --work and --out default to names carrying
the two settings (and _s<N> when N > 1), so runs with different settings never share a
registry; the --work folder is emptied at the start of every run.

Reads the sample from ../shared/data/cm-off-meme-sample (or $MODSTREAM_CM_OFF_MEME) at run
time and skips (exit 0) when it is absent. Everything it writes (registry, reviewed folder,
manifests, JSON) stays under var/, which is git-ignored: none of it may be committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.config import ModelConfig  # noqa: E402
from models.losses import IGNORE_INDEX  # noqa: E402
from models.registry import CURRENT, ModelRegistry  # noqa: E402
from modstream.manifest import Example, write_manifest  # noqa: E402
from trainer.evaluate import fast_macro_f1  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.holdout import reserve_base_holdout, resolvable_drop  # noqa: E402
from trainer.importers import cm_off_meme_root, import_cm_off_meme  # noqa: E402
from trainer.retrain import PREDICTIONS, ROUTED, RetrainOptions, evaluate_model, run_retrain  # noqa: E402
from trainer.routing_quality import RoutedHoldout, card_policy  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402

SALT = b"bench-retrain-rounds\0"
TEST_FRACTION = 0.2
INITIAL_SHARE = 0.6  # of the non-test posts; the first run used 0.4
BASE_FRACTION = 0.3  # of the initial pool, held out for the gate; the first run used 0.1
ROUNDS = 3
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _unit(salt: bytes, example_id: str) -> float:
    """A uniform number in [0, 1) from a salted hash of the id (order- and size-independent)."""
    digest = hashlib.sha256(salt + example_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _seeded(name: str, seed: int) -> bytes:
    """The salt of one assignment for one seed; seed 0 keeps the salts of the single-seed runs."""
    return SALT + name.encode() + b"\0" + (f"seed{seed}\0".encode() if seed else b"")


def split_posts(
    examples: Sequence[Example], initial_share: float = INITIAL_SHARE, seed: int = 0
) -> tuple[list[Example], list[Example], list[list[Example]]]:
    """(test fold, initial pool, round chunks), each fixed by hashes of the ids (a larger
    initial share keeps every post of a smaller one). The test fold ignores the seed: it is
    the same for every seed; the seed reassigns the other posts to the pool and the chunks."""
    test = [ex for ex in examples if _unit(SALT + b"test\0", ex.id) < TEST_FRACTION]
    rest = [ex for ex in examples if _unit(SALT + b"test\0", ex.id) >= TEST_FRACTION]
    pool, order = _seeded("pool", seed), _seeded("order", seed)
    initial = [ex for ex in rest if _unit(pool, ex.id) < initial_share]
    stream = sorted(
        (ex for ex in rest if _unit(pool, ex.id) >= initial_share),
        key=lambda ex: _unit(order, ex.id),
    )
    bounds = [round(i * len(stream) / ROUNDS) for i in range(ROUNDS + 1)]
    return test, initial, [stream[bounds[i] : bounds[i + 1]] for i in range(ROUNDS)]


def f1_interval(y: np.ndarray, pred: np.ndarray, n_classes: int, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap of macro-F1 over the labelled posts."""
    keep = y != IGNORE_INDEX
    yt, yp = np.asarray(y[keep], dtype=np.int64), np.asarray(pred[keep], dtype=np.int64)
    if yt.size < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    values = [
        fast_macro_f1(yt[i], yp[i], n_classes) for i in (rng.integers(0, yt.size, yt.size) for _ in range(n_boot))
    ]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def score_test(registry: ModelRegistry, version: str, test: Sequence[Example], cache: Path) -> dict[str, Any]:
    loaded = registry.load(version)
    result = evaluate_model(loaded.model, loaded.tokenizer, loaded.card, test, cache, device="cpu")
    out: dict[str, Any] = {"version": version, "n": result["n"], "tasks": {}}
    for task, labels in loaded.card.tasks.items():
        y, pred = result[PREDICTIONS][task]
        out["tasks"][task] = {
            "macro_f1": result["macro_f1"].get(task),
            "ci": f1_interval(np.asarray(y), np.asarray(pred), len(labels)),
        }
    out["itm_auroc"] = result["itm_auroc"]
    out["itm_auroc_ci"] = list(result["itm_auroc_ci"]) if result.get("itm_auroc_ci") is not None else None
    routing = result["routing"] or {}
    out["routing"] = {
        k: routing.get(k) for k in ("policy", "budget", "lift", "lift_ci", "recall", "n", "n_errors", "reviewed_share")
    }
    return out


def pick_for_review(
    registry: ModelRegistry, version: str, chunk: Sequence[Example], cache: Path
) -> tuple[list[Example], float]:
    """The chunk's posts the CURRENT card's policy sends to review: the top `budget` share by
    its review score (posts it can never review, score -inf, are never taken)."""
    loaded = registry.load(version)
    chosen = card_policy(loaded.card)
    if chosen is None:
        raise RuntimeError(f"{version} has no review policy and no trained ITM head: nothing would be routed")
    budget = chosen[1]
    result = evaluate_model(loaded.model, loaded.tokenizer, loaded.card, chunk, cache, device="cpu")
    routed: RoutedHoldout | None = result[ROUTED]
    if routed is None or routed.scores.shape[0] != len(chunk):
        raise RuntimeError(f"{version}: the review scores do not cover the chunk's {len(chunk)} posts")
    k = round(budget * len(chunk))
    order = np.argsort(-routed.scores, kind="stable")
    picked = [int(i) for i in order[:k] if np.isfinite(routed.scores[i])]
    return [chunk[i] for i in picked], budget


def write_decisions(folder: Path, posts: Sequence[Example], version: str, first: int) -> int:
    """Append the oracle's decisions (the true labels) as the dataset sink writes them:
    media/<sha256>.png, meta decision_id / decided_at (one minute apart) / reviewer /
    model_version / kind routed / image_text_match true."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with manifest.open("a", encoding="utf-8") as fh:
        for i, ex in enumerate(posts, start=first):
            assert ex.image is not None
            data = ex.image.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            target = folder / "media" / f"{digest}.png"
            if not target.exists():
                target.write_bytes(data)
            line = {
                "id": ex.id,
                "text": ex.text,
                "image": f"media/{digest}.png",
                "labels": dict(ex.labels),
                "meta": {
                    "decision_id": f"oracle-{i}",
                    "reviewer": "oracle",
                    "decided_at": (T0 + timedelta(minutes=i)).isoformat(timespec="milliseconds"),
                    "model_version": version,
                    "reasons": ["routed"],
                    "media_hash": digest,
                    "image_text_match": True,
                    "kind": "routed",
                    "revision": 1,
                },
            }
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return first + len(posts)


def _ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if not ci or not all(math.isfinite(c) for c in ci):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    head = ["round", "current", "gate", "reviewed (so far)"] + [f"{t} F1 [95% CI]" for t in tasks]
    head += ["ITM AUROC [95% CI]", "routing lift [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        test = row["test"]
        cells = [str(row["round"]), test["version"], row["gate"], f"{row['added']} ({row['reviewed_total']})"]
        cells += [_ci(test["tasks"][t]["macro_f1"], test["tasks"][t]["ci"]) for t in tasks]
        cells += [
            _ci(test["itm_auroc"], test["itm_auroc_ci"]),
            _ci(test["routing"]["lift"], test["routing"]["lift_ci"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per round: each task's F1 and the routing lift against round 0's lower bound."""
    base = rows[0]["test"]
    floors = {f"{t} F1": base["tasks"][t]["ci"][0] for t in tasks}
    floors["routing lift"] = (base["routing"]["lift_ci"] or [math.nan])[0]
    out = []
    for row in rows[1:]:
        test = row["test"]
        values = {f"{t} F1": test["tasks"][t]["macro_f1"] for t in tasks}
        values["routing lift"] = test["routing"]["lift"]
        for name, value in values.items():
            floor = floors[name]
            ok = value is not None and math.isfinite(value) and math.isfinite(floor) and value >= floor
            out.append({"round": row["round"], "metric": name, "value": value, "round0_low": floor, "within": ok})
    return out


def run_seed(
    seed: int, examples: Sequence[Example], args: argparse.Namespace, work: Path, cache: Path
) -> dict[str, Any]:
    """One whole experiment (round 0 and the rounds) with one seed, in its own work folder."""
    started = time.perf_counter()
    work.mkdir(parents=True)
    registry_root, reviewed = work / "registry", work / "reviewed"
    test, initial, chunks = split_posts(examples, args.initial_share, seed)
    print(
        f"seed {seed}: {len(examples)} posts with an image: test fold {len(test)}, initial pool {len(initial)} "
        f"(share {args.initial_share:g}), round chunks {[len(c) for c in chunks]}; base holdout fraction "
        f"{args.base_fraction:g}; work {work}",
        flush=True,
    )

    # Round 0: v0001 as `modstream train` makes it, from a manifest `modstream retrain` reloads.
    # Its TrainConfig (the seed included) goes to its card, and every retrain inherits it
    # (trainer.retrain.recipe).
    manifest = (work / "base" / "manifest.jsonl").resolve()
    write_manifest(manifest, initial)
    source = {"manifest": str(manifest)}  # resolved, as the retrain job records its source
    train_set, recorded = reserve_base_holdout(initial, source, args.base_fraction)
    t = time.perf_counter()
    fitted = fit(
        train_set,
        ModelConfig(),
        TrainConfig(epochs=args.epochs, patience=args.patience, seed=seed),
        cache_dir=cache,
        device="cpu",
    )
    fitted.card.training.update(recorded)
    registry = ModelRegistry(registry_root)
    v0 = registry.save(fitted.model, fitted.tokenizer, fitted.card)
    n_holdout = len(initial) - len(train_set)
    print(
        f"seed {seed} round 0: trained {v0} on {len(train_set)} posts ({n_holdout} base holdout, resolvable drop "
        f"{resolvable_drop(n_holdout)}) in {time.perf_counter() - t:.0f} s",
        flush=True,
    )

    rows: list[dict[str, Any]] = [
        {
            "round": 0,
            "gate": "—",
            "added": 0,
            "reviewed_total": 0,
            "test": score_test(registry, v0, test, cache),
            "seconds": time.perf_counter() - t,
        }
    ]
    n_reviewed = 0
    for r, chunk in enumerate(chunks, start=1):
        t = time.perf_counter()
        current = registry.resolve(CURRENT)
        picked, budget = pick_for_review(registry, current, chunk, cache)
        before = n_reviewed
        n_reviewed = write_decisions(reviewed, picked, current, n_reviewed)
        outcome = run_retrain(
            RetrainOptions(
                registry=registry_root,
                reviewed=reviewed,
                work_dir=work / "retrain-work",
                cache_dir=cache,
                device="cpu",
                min_new=1,
                force=True,
                base_fraction=args.base_fraction,
            )
        )
        now = registry.resolve(CURRENT)
        gate = f"{outcome.version} {outcome.status}"
        print(
            f"seed {seed} round {r}: {current} routed {len(picked)} of {len(chunk)} posts (budget {budget:g}); "
            f"{gate}: {outcome.message} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        report = outcome.report or {}
        held = registry.card(outcome.version).training.get("holdouts", {}) if outcome.version else {}
        rows.append(
            {
                "round": r,
                "routed_by": current,
                "budget": budget,
                "gate": gate,
                "why": outcome.message,
                "candidate": outcome.version,
                "gate_checks": report.get("checks"),
                "holdouts": {
                    h: {k: held.get(h, {}).get(k) for k in ("n", "resolvable_drop")}
                    for h in ("base", "reviewed", "audit")
                },
                "added": n_reviewed - before,
                "reviewed_total": n_reviewed,
                "test": score_test(registry, now, test, cache),
                "seconds": time.perf_counter() - t,
            }
        )

    tasks = list(rows[0]["test"]["tasks"])
    print()
    print(f"seed {seed}:")
    print(table(rows, tasks))
    verdicts = checks(rows, tasks)
    print()
    for c in verdicts:
        state = "within" if c["within"] else "BELOW"
        print(
            f"seed {seed} check round {c['round']}: {c['metric']} {c['value']:.3f} {state} round 0's interval "
            f"(lower bound {c['round0_low']:.3f})"
        )
    seconds = time.perf_counter() - started
    print(f"seed {seed}: {seconds:.0f} s\n", flush=True)
    failures = [{"round": c["round"], "metric": c["metric"]} for c in verdicts if not c["within"]]
    return {
        "seed": seed,
        "work": str(work),
        "split": {
            "test": len(test),
            "test_digest": hashlib.sha256("\n".join(sorted(ex.id for ex in test)).encode()).hexdigest()[:16],
            "initial": len(initial),
            "base_holdout": n_holdout,
            "base_resolvable_drop": resolvable_drop(n_holdout),
            "trained_v0001_on": len(train_set),
            "chunks": [len(c) for c in chunks],
        },
        "rounds": rows,
        "checks": verdicts,
        "passed": not failures,
        "failures": failures,
        "gates": [row["gate"] for row in rows[1:]],
        "seconds": seconds,
    }


def summary(runs: Sequence[dict[str, Any]]) -> str:
    head = ["seed", "every round within", "below round 0's lower bound (round: metric)", "gate verdicts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        failed = ", ".join(f"{f['round']}: {f['metric']}" for f in run["failures"]) or "—"
        gates = "; ".join(f"r{i} {g}" for i, g in enumerate(run["gates"], start=1))
        lines.append(f"| {run['seed']} | {'yes' if run['passed'] else 'NO'} | {failed} | {gates} |")
    rounds = [(run["seed"], r) for run in runs for r in range(1, ROUNDS + 1)]
    bad = {(run["seed"], f["round"]) for run in runs for f in run["failures"]}
    lines.append("")
    lines.append(
        f"{len(rounds) - len(bad)} of {len(rounds)} (seed, round) pairs within round 0's interval on every metric; "
        f"{sum(run['passed'] for run in runs)} of {len(runs)} seeds pass in every round"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25, help="max epochs of v0001 (retrains use its card's)")
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument(
        "--base-fraction",
        type=float,
        default=BASE_FRACTION,
        help="share of the initial pool held out for the gate, by v0001 and every retrain",
    )
    parser.add_argument(
        "--initial-share", type=float, default=INITIAL_SHARE, help="share of the non-test posts in the initial pool"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat the experiment for seeds 0..N-1 (training seed and pool / chunk assignment; test fold fixed)",
    )
    parser.add_argument(
        "--work",
        default=None,
        help="registry, reviewed folder, manifests, one seed<k>/ per seed (emptied first; "
        "default var/bench/retrain_rounds_b<F>_i<S>[_s<N>])",
    )
    parser.add_argument("--cache", default="var/cache", help="encoder feature cache (shared with modstream)")
    parser.add_argument("--out", default=None, help="default var/bench/retrain_rounds_b<F>_i<S>[_s<N>].json")
    args = parser.parse_args()
    if not 0.0 < args.base_fraction < 1.0 or not 0.0 < args.initial_share < 1.0:
        parser.error("--base-fraction and --initial-share must be in (0, 1)")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    tag = f"retrain_rounds_b{args.base_fraction:g}_i{args.initial_share:g}" + (
        f"_s{args.seeds}" if args.seeds > 1 else ""
    )
    args.work = args.work or f"var/bench/{tag}"
    args.out = args.out or f"var/bench/{tag}.json"

    root = cm_off_meme_root()
    if not (root / "sample_data.csv").is_file():
        print(f"SKIP: CM-Off-Meme sample not found at {root} (set MODSTREAM_CM_OFF_MEME); nothing measured")
        return 0
    started = time.perf_counter()
    work, cache = Path(args.work), Path(args.cache)
    if work.exists():
        shutil.rmtree(work)  # a fresh registry and reviewed folder every run
    work.mkdir(parents=True)

    examples = [ex for ex in import_cm_off_meme().examples if ex.image is not None]
    runs = [run_seed(seed, examples, args, work / f"seed{seed}", cache) for seed in range(args.seeds)]
    digests = {run["split"]["test_digest"] for run in runs}
    if len(digests) != 1:
        raise RuntimeError(f"the test fold differs between seeds: {sorted(digests)}")

    print(summary(runs))
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "split": {
            "salt": SALT.decode(errors="replace"),
            "test": runs[0]["split"]["test"],
            "test_digest": runs[0]["split"]["test_digest"],
            "initial_share": args.initial_share,
            "base_fraction": args.base_fraction,
        },
        "train": {"epochs": args.epochs, "patience": args.patience},
        "seeds": runs,
        "summary": {
            "seeds": args.seeds,
            "passed": [run["seed"] for run in runs if run["passed"]],
            "failed": {str(run["seed"]): run["failures"] for run in runs if not run["passed"]},
            "gates": {str(run["seed"]): run["gates"] for run in runs},
            "rounds_within": sum(
                all(c["within"] for c in run["checks"] if c["round"] == r) for run in runs for r in range(1, ROUNDS + 1)
            ),
            "rounds": ROUNDS * len(runs),
        },
        "seconds": total,
    }
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
