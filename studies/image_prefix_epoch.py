"""Seconds per training epoch when the image encoder's last blocks are fine-tuned
(`--unfreeze-image-blocks N`): the frozen stem and blocks' feature map cached by content hash
(what training does now) against running the whole EfficientNet-Lite0 on every step (preprocess,
whole forward, backward through the trainable units), with a frozen image encoder as the floor.
The one-off cost of building each cache is timed too.

Posts come from the CM-Off-Meme sample in ../shared when it is there, otherwise from the
synthetic generator (the script says which). The text encoder is frozen and cached in every
row, so the rows differ only in the image path. Run it single-threaded on a shared machine:

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python studies/image_prefix_epoch.py [--blocks 2] [--posts 128]
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
from unfrozen_epoch import (  # a sibling script: studies/ is on sys.path when run as a script
    epoch_seconds,
    posts,
    print_epoch_table,
)

from models.config import ModelConfig
from models.registry import build_model
from trainer.features import FeatureStore, LiveFeatures, build_features, load_inputs
from trainer.train import TrainConfig, label_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="image units fine-tuned, counted from the top")
    parser.add_argument("--posts", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per row (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="var/bench/image_prefix_epoch.json")
    args = parser.parse_args()
    if args.blocks <= 0:
        parser.error("--blocks must be a positive number of units (the whole encoder has nothing to cache)")
    torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    build: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        examples, source = posts(args.posts, Path(tmp))
        inputs = load_inputs(examples)
        store = FeatureStore(Path(tmp) / "cache")
        frozen_model, tokenizer = build_model(ModelConfig())
        started = time.perf_counter()
        frozen = build_features(frozen_model, tokenizer, inputs, store, cpu)
        build["frozen text + image features"] = time.perf_counter() - started
        unfrozen_model, _ = build_model(ModelConfig(image_trainable_blocks=args.blocks))
        started = time.perf_counter()
        cached = build_features(unfrozen_model, tokenizer, inputs, store, cpu)  # text: a cache hit
        build[f"image prefix at unit {cached.image_prefix.start if cached.image_prefix else '?'}"] = (
            time.perf_counter() - started
        )
        if cached.image_prefix is None:
            raise SystemExit("the image encoder could not be split; nothing to compare")
        live_model = copy.deepcopy(unfrozen_model)
        live = LiveFeatures(live_model, tokenizer, inputs, cpu, frozen_text=cached.frozen_text)
        labels = label_tensors(inputs.examples, frozen_model.config.tasks)
        live_name = f"image last {args.blocks} trained, whole encoder live"
        rows = {
            "image frozen (cached)": epoch_seconds(frozen, labels, args.epochs),
            f"image last {args.blocks} trained, frozen part cached": epoch_seconds(cached, labels, args.epochs),
            live_name: epoch_seconds(live, labels, args.epochs),
        }
    naive = rows[live_name]
    threads = torch.get_num_threads()
    print(f"{len(inputs.examples)} {source} posts, batch {TrainConfig().batch_size}, {threads} thread(s)")
    print_epoch_table("image path", rows, naive)
    print(f"{'one-off cache build':<48} {'seconds':>8}")
    for name, seconds in build.items():
        print(f"{name:<48} {seconds:>8.2f}")
    result = {
        "benchmark": "image_prefix_epoch",
        "source": source,
        "posts": len(inputs.examples),
        "blocks": args.blocks,
        "seconds_per_epoch": rows,
        "speedup_cached_vs_live": naive / rows[f"image last {args.blocks} trained, frozen part cached"],
        "build_seconds": build,
        "machine": {"threads": threads, "platform": platform.platform(), "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
