"""`make run` until the stream worker lands: make sure a default model exists (trained on
synthetic data), then classify the bundled sample posts and show what goes to review."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from models.config import ModelConfig
from models.registry import ModelRegistry
from modstream.manifest import read_manifest
from stream.classify import classify_file
from trainer.fit import fit
from trainer.holdout import reserve_base_holdout
from trainer.synthetic import write_synthetic
from trainer.train import TrainConfig

SAMPLE_POSTS = Path(__file__).resolve().parent / "samples" / "posts.jsonl"
SYNTHETIC_POSTS = 1200


def synthetic_training() -> TrainConfig:
    """On synthetic posts the tasks saturate within a few epochs while ITM learns slowly
    (its loss weight is 0.1): with the task at its ceiling, ITM AUROC breaks the ties
    (`task>itm`), and a longer patience lets it take off (validation ITM AUROC 0.55 after
    9 epochs, 0.8 after ~20)."""
    return TrainConfig(patience=10, epochs=40, progress=True)


def ensure_default_model(registry: ModelRegistry, cache: Path, home: Path) -> str:
    current = registry.current()
    if current is not None:
        print(f"using registered model {current} from {registry.root}", file=sys.stderr)
        return current
    print(
        f"no model in {registry.root}: training the default model on {SYNTHETIC_POSTS} synthetic posts",
        file=sys.stderr,
    )
    started = time.perf_counter()
    manifest = write_synthetic(home / "synthetic", n=SYNTHETIC_POSTS, seed=0)
    # One thread: with several, the order of float sums varies from run to run, and ITM's slow
    # take-off on these posts is sensitive enough to follow it (validated AUROC 0.88-0.90 in
    # single-threaded runs, 0.55 in one two-threaded `make run`, which then routed nothing).
    # The base holdout is set aside from this first training on: retrained versions are
    # judged on it, and no version ever trains on it (trainer/holdout.py).
    source = {"preset": "synthetic", "n": SYNTHETIC_POSTS, "seed": 0}
    examples, recorded = reserve_base_holdout(read_manifest(manifest), source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitted = fit(
            examples,
            ModelConfig(),
            synthetic_training(),
            cache_dir=cache,
            out_dir=home / "demo-training",
        )
    finally:
        torch.set_num_threads(threads)
    # What the retraining job trains its candidates on, besides the reviewed posts.
    fitted.card.training.update(recorded)
    version = registry.save(fitted.model, fitted.tokenizer, fitted.card)
    m = fitted.card.metrics
    print(
        f"registered {version} in {time.perf_counter() - started:.0f} s: "
        f"validation macro-F1 {json.dumps(m['macro_f1'])}, "
        f"ITM AUROC {m['itm_auroc']:.3f}; curves in {home / 'demo-training'}\n"
        f"  {fitted.card.itm['routing']['why']}",
        file=sys.stderr,
    )
    return version


def print_table(path: Path) -> None:
    texts = {}
    for line in SAMPLE_POSTS.read_text().splitlines():
        try:
            obj = json.loads(line)
            texts[str(obj.get("id"))] = obj.get("text", "")
        except (json.JSONDecodeError, AttributeError):
            continue
    print(f"{'post':<16} {'hate':>6} {'sarc.':>6} {'ITM':>5}  {'route':<7} {'media':<10} text")
    review = dead = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "stage" in rec:  # a dead letter
            dead += 1
            print(f"{'(dead letter)':<16} {rec['stage']}: {rec['reason'][:90]}")
            continue
        labels = rec["labels"]
        itm = "  -  " if rec["itm_match"] is None else f"{rec['itm_match']:.2f}"
        flags = {t: ("*" if labels[t]["decision"] else " ") for t in labels}
        review += rec["route"] == "review"
        print(
            f"{rec['post_id']:<16} {labels['hate']['score']:5.2f}{flags['hate']} "
            f"{labels['sarcasm']['score']:5.2f}{flags['sarcasm']} "
            f"{itm:>5}  {rec['route']:<7} {rec['media']['status']:<10} {texts.get(rec['post_id'], '')[:48]}"
        )
    print(f"\n* = decision positive. {review} post(s) routed to review, {dead} dead-lettered.")


def run_demo(registry_root: Path, cache: Path, home: Path) -> int:
    registry = ModelRegistry(registry_root)
    ensure_default_model(registry, cache, home)
    out = home / "demo-labels.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    classify_file(SAMPLE_POSTS, out, registry.root)
    print_table(out)
    print(f"label records: {out}")
    return 0
