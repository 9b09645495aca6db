"""Where a post's image resize runs, and what each stage costs per post.

The device pool prepares every batch (tokenise, image to the model's square input, uint8
tensor) while the previous batch runs on a GPU that does the forward at 10-12k posts/s
(BENCHMARKS, GPU); that preparation held the pool at 1.5k posts/s. The media decode threads
already decode each image bounded to twice the model's side; with FetchConfig.model_side
(the worker's opt-in --decode-model-input) they also make the model's input, so batch
preparation only copies pixels. Same pixels either way (tests/unit/test_media.py).

Two stages, per post, for both placements:
  decode        stream.media.decode_and_read on the encoded image (one decode thread's work)
  serving       models.inference.Predictor.prepare on a batch of decoded posts, single-threaded
                and on a pool of resize threads, as stream.device_pool runs it on a GPU

    python bench/prepare_cost.py [--posts 256] [--threads 8] [--out var/bench/prepare_cost.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_throughput import default_model_random, timed  # noqa: E402
from models.card import ModelCard  # noqa: E402
from models.inference import Predictor  # noqa: E402
from stream.media import FetchConfig, decode_and_read  # noqa: E402


def encoded_posts(n: int, seed: int = 0) -> tuple[list[str], list[bytes | None]]:
    """Captions and distinct 1000 x 700 JPEGs, photo-like (smooth shapes plus grain, about
    the size of a real photo's file; pure noise would make decoding several times dearer),
    one in eight posts text-only."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)).resize((1000, 700), Image.BICUBIC)
    grain = rng.integers(-8, 9, (700, 1000, 3))
    base = np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    texts, blobs = [], []
    for i in range(n):
        texts.append(" ".join(["a caption with some words in it"] * (1 + i % 5)))
        if i % 8 == 7:
            blobs.append(None)
            continue
        buf = io.BytesIO()
        Image.fromarray(np.roll(base, i * 7, axis=1)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return texts, blobs


def per_post(fn: Callable[[], object], n: int, min_seconds: float) -> float:
    """Mean seconds per post of `fn`, which handles n posts."""
    return timed(fn, torch.device("cpu"), min_seconds, min_calls=2) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=8, help="resize threads (the device pool's on a GPU)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default="var/bench/prepare_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, tokenizer = default_model_random()
    side = model.image_encoder.image_size
    predictor = Predictor(model, tokenizer, ModelCard(config=model.config, version="bench"), torch.device("cpu"))
    texts, blobs = encoded_posts(args.posts)
    placements = {
        "default: the predictor resizes (decode bounds to 2x side)": FetchConfig(max_side=2 * side),
        "opt-in: the decode threads make the model's input": FetchConfig(max_side=2 * side, model_side=side),
    }
    rows = []
    with ThreadPoolExecutor(args.threads) as threads:
        for name, cfg in placements.items():
            images = [None if b is None else decode_and_read(b, None, cfg, None)[0] for b in blobs]
            with_image = [b for b in blobs if b is not None]

            def decode(cfg: FetchConfig = cfg, with_image: list[bytes] = with_image) -> None:
                for b in with_image:
                    decode_and_read(b, None, cfg, None)

            row = {
                "placement": name,
                "image_side_handed_on": max(im.size[0] for im in images if im is not None),
                "decode_ms_per_image": per_post(decode, len(with_image), args.seconds) * 1e3,
                "serving_ms_per_post_1_thread": per_post(
                    lambda images=images: predictor.prepare(texts, images), len(texts), args.seconds
                )
                * 1e3,
                f"serving_ms_per_post_{args.threads}_threads": per_post(
                    lambda images=images: predictor.prepare(texts, images, threads), len(texts), args.seconds
                )
                * 1e3,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    before, now = rows  # default placement, opt-in placement
    keys = [k for k in before if k.endswith("_image") or k.startswith("serving_")]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    kb = np.mean([len(b) for b in blobs if b is not None]) / 1024
    print(f"\n{args.posts} posts (1 in 8 text-only), 1000x700 JPEG ({kb:.0f} KB), model side {side}; {machine}")
    print("| stage, ms per post | default | --decode-model-input | ratio |")
    print("|---|---:|---:|---:|")
    for k in keys:
        print(f"| {k} | {before[k]:.3f} | {now[k]:.3f} | {now[k] / before[k]:.2f} |")
    result = {"machine": machine, "posts": args.posts, "model_side": side, "threads": args.threads, "rows": rows}
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
