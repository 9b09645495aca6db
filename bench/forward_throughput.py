"""Model forward throughput on this machine's CPU with the default backbones
(MiniLM-L6 + EfficientNet-Lite0 at 224 px), batch sizes 1-64.

Two numbers per batch size: the model alone (preprocessed tensors in, logits out) and the
whole predictor (tokenising, image resizing and normalisation included). Inputs are
synthetic posts; weights are the pretrained backbones with an untrained head, which costs
the same as a trained one.

    .venv/bin/python bench/forward_throughput.py [--out var/bench/forward_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from models.card import ModelCard
from models.config import ModelConfig
from models.inference import Predictor
from models.preprocess import ImagePreprocessor, TextPreprocessor
from models.registry import build_model
from modstream.manifest import read_manifest
from trainer.images import load_image
from trainer.synthetic import write_synthetic

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def timed(fn, min_seconds: float, min_calls: int = 3) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="var/bench/forward_throughput.json")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per batch size")
    args = parser.parse_args()

    config = ModelConfig()
    model, tokenizer = build_model(config)
    model.eval()
    predictor = Predictor(model, tokenizer, ModelCard(config=config, version="bench"))
    with tempfile.TemporaryDirectory() as tmp:
        posts = read_manifest(write_synthetic(Path(tmp), n=max(BATCH_SIZES), seed=11, image_size=256))
        texts = [p.text for p in posts]
        images = [load_image(p.image) for p in posts if p.image is not None]
    text_pre = TextPreprocessor(tokenizer, config.max_text_length)
    image_pre = ImagePreprocessor(model.image_encoder.image_size, model.image_encoder.mean, model.image_encoder.std)

    rows = []
    print(f"{'batch':>5} {'model posts/s':>14} {'predictor posts/s':>18} {'ms/batch (model)':>17}")
    for bs in BATCH_SIZES:
        ids, mask = text_pre(texts[:bs])
        pixels, present = image_pre(images[:bs])

        def forward(ids=ids, mask=mask, pixels=pixels, present=present) -> None:
            with torch.inference_mode():
                model(ids, mask, pixels, present)

        model_s = timed(forward, args.seconds)
        full_s = timed(lambda bs=bs: predictor.predict(texts[:bs], images[:bs]), args.seconds)
        rows.append(
            {
                "batch": bs,
                "model_posts_per_s": bs / model_s,
                "predictor_posts_per_s": bs / full_s,
                "model_ms_per_batch": 1000 * model_s,
            }
        )
        print(f"{bs:>5} {bs / model_s:>14.1f} {bs / full_s:>18.1f} {1000 * model_s:>17.1f}")

    result = {
        "benchmark": "forward_throughput",
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "backbones": {"text": config.text_backbone, "image": config.image_backbone},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
