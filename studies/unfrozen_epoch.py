"""Seconds per training epoch when the text encoder's top layers are fine-tuned: the frozen
layers' output cached by content hash (what training does) against running the whole text
encoder on every step (the naive way), with a fully frozen text encoder as the floor, and
the whole text encoder fine-tuned (ablate's `--unfreeze-text-layers all`: nothing frozen to
cache, so it always runs live).

Posts come from the CM-Off-Meme sample in ../shared when it is there (real caption lengths),
otherwise from the synthetic generator (short captions; the script says which). The image
encoder is frozen and cached in every row, so the rows differ only in the text path.

    .venv/bin/python studies/unfrozen_epoch.py [--layers 2] [--posts 320] [--out var/bench/unfrozen_epoch.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from models.config import ModelConfig
from models.registry import build_model
from modstream.manifest import read_manifest
from trainer.features import FeatureStore, LiveFeatures, build_features, load_inputs
from trainer.importers import cm_off_meme_root, import_cm_off_meme
from trainer.synthetic import write_synthetic
from trainer.train import TrainConfig, _optimizer, _run_epoch, class_weights, label_tensors


def posts(n: int, tmp: Path) -> tuple[list, str]:
    root = cm_off_meme_root()
    if (root / "sample_data.csv").is_file():
        return import_cm_off_meme(root).examples[:n], "cm-off-meme"
    print(f"CM-Off-Meme sample not found at {root}; timing synthetic posts (shorter captions)")
    return read_manifest(write_synthetic(tmp, n=n, seed=5)), "synthetic"


def epoch_seconds(features: LiveFeatures, labels: dict, epochs: int) -> float:
    model = features.model
    cfg = TrainConfig(progress=False)
    optimizer = _optimizer(model, cfg)
    weights = class_weights(labels, model.config.tasks)
    generator = torch.Generator().manual_seed(0)
    model.train()
    _run_epoch(model, features, labels, cfg.objective, optimizer, cfg, weights, generator, 0.1)  # warm-up
    started = time.perf_counter()
    for _ in range(epochs):
        _run_epoch(model, features, labels, cfg.objective, optimizer, cfg, weights, generator, 0.1)
    return (time.perf_counter() - started) / epochs


def print_epoch_table(heading: str, rows: dict[str, float], baseline: float) -> None:
    """Seconds per epoch per row, and each row's speed against `baseline` (the live path)."""
    print(f"{heading:<48} {'s/epoch':>8} {'vs live':>8}")
    for name, seconds in rows.items():
        print(f"{name:<48} {seconds:>8.2f} {baseline / seconds:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="text layers fine-tuned")
    parser.add_argument("--posts", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row (after one warm-up)")
    parser.add_argument("--out", default="var/bench/unfrozen_epoch.json")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        examples, source = posts(args.posts, Path(tmp))
        inputs = load_inputs(examples)
        store = FeatureStore(Path(tmp) / "cache")
        frozen_model, tokenizer = build_model(ModelConfig())
        frozen = build_features(frozen_model, tokenizer, inputs, store, cpu)
        unfrozen_model, _ = build_model(ModelConfig(text_trainable_layers=args.layers))
        cached = build_features(unfrozen_model, tokenizer, inputs, store, cpu)
        if cached.text_prefix is None:
            raise SystemExit("the text encoder could not be split; nothing to compare")
        live_model = copy.deepcopy(unfrozen_model)
        live = LiveFeatures(live_model, tokenizer, inputs, cpu, frozen_image=cached.frozen_image)
        whole_model, _ = build_model(ModelConfig(text_trainable_layers=-1))
        whole = LiveFeatures(whole_model, tokenizer, inputs, cpu, frozen_image=cached.frozen_image)
        labels = label_tensors(inputs.examples, frozen_model.config.tasks)
        rows = {
            "text frozen (cached)": epoch_seconds(frozen, labels, args.epochs),
            f"text top {args.layers} trained, frozen layers cached": epoch_seconds(cached, labels, args.epochs),
            f"text top {args.layers} trained, whole encoder live": epoch_seconds(live, labels, args.epochs),
            "whole text encoder trained (live)": epoch_seconds(whole, labels, args.epochs),
        }
    naive = rows[f"text top {args.layers} trained, whole encoder live"]
    print(f"{len(inputs.examples)} {source} posts, batch {TrainConfig().batch_size}, {torch.get_num_threads()} threads")
    print_epoch_table("text path", rows, naive)
    result = {
        "benchmark": "unfrozen_epoch",
        "source": source,
        "posts": len(inputs.examples),
        "layers": args.layers,
        "seconds_per_epoch": rows,
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
