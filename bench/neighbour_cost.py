"""What the labelled-neighbour lookup (models/neighbours.py) adds to serving on this CPU.

`Predictor.run` with the default backbones (MiniLM-L6 + EfficientNet-Lite0 at 224 px,
pretrained weights, untrained head: same cost as a trained one) on synthetic posts, with no
index and with an index of 2,000 / 20,000 (the cap) training posts of random features,
in one process, batch sizes 1 and 64. The ratio is "with the index / without".

    .venv/bin/python bench/neighbour_cost.py [--threads 1] [--out var/bench/neighbour_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from forward_throughput import timed  # a sibling script: bench/ is on sys.path when run as a script

from models.card import ModelCard
from models.config import ModelConfig
from models.inference import Predictor
from models.neighbours import MAX_ROWS, NeighbourIndex
from models.registry import build_model
from modstream.manifest import read_manifest
from trainer.images import load_image
from trainer.synthetic import write_synthetic

INDEX_ROWS = (2_000, MAX_ROWS)
BATCH_SIZES = (1, 64)


def random_index(rows: int, text_dim: int, image_dim: int, tasks: dict[str, list[str]]) -> NeighbourIndex:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, text_dim + image_dim)).astype(np.float32)
    labels = {t: rng.integers(0, len(names), rows) for t, names in tasks.items()}
    return NeighbourIndex.build(x, np.ones(rows, bool), labels, {t: len(n) for t, n in tasks.items()}, text_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="var/bench/neighbour_cost.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per cell")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ModelConfig()
    model, tokenizer = build_model(config)
    model.eval()
    predictor = Predictor(model, tokenizer, ModelCard(config=config, version="bench"))
    with tempfile.TemporaryDirectory() as tmp:
        posts = read_manifest(write_synthetic(Path(tmp), n=max(BATCH_SIZES), seed=11, image_size=256))
        texts = [p.text for p in posts]
        images = [load_image(p.image) if p.image is not None else None for p in posts]
    indexes = {0: None} | {
        rows: random_index(rows, model.text_encoder.dim, model.image_encoder.dim, config.tasks) for rows in INDEX_ROWS
    }
    rows_out = []
    for batch in BATCH_SIZES:
        prepared = predictor.prepare(texts[:batch], images[:batch])
        base = None
        for rows, index in indexes.items():
            model.neighbours = index
            seconds = timed(lambda p=prepared: predictor.run(p), args.seconds)
            base = seconds if rows == 0 else base
            rows_out.append(
                {
                    "batch": batch,
                    "index_rows": rows,
                    "ms_per_batch": round(1000 * seconds, 2),
                    "posts_per_s": round(batch / seconds, 1),
                    "ratio_vs_no_index": round(seconds / base, 3) if base else 1.0,
                }
            )
    print("| batch | index rows | ms per batch | posts/s | time vs no index |")
    print("|---|---|---|---|---|")
    for r in rows_out:
        print(
            f"| {r['batch']} | {r['index_rows'] or 'none'} | {r['ms_per_batch']} | {r['posts_per_s']} "
            f"| {r['ratio_vs_no_index']:.2f}x |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    out.write_text(json.dumps({"machine": machine, "rows": rows_out}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
