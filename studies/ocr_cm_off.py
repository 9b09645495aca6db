"""Does the text read from images (Tesseract, eng+hin) help the model on CM-Off-Meme?

Four task-only runs of the ablation machinery (trainer.ablation.run_ablation, frozen
default backbones, the same stratified folds and seeds, its logistic probe alongside) on the
1,308 posts that have an image:

  (a) caption removed: image only  vs  the OCR text as the post's text
  (b) normal posts: caption only   vs  caption + OCR text as the tokenizer's second segment

OCR of every image runs once and is cached next to the features (var/cache/ocr-*), by
content hash. Note: CM-Off's `Text` column is itself the meme's OCR text (transcribed by the
dataset's authors), so (b) adds a second, noisier reading of the same words.

    nice -n 5 .venv/bin/python studies/ocr_cm_off.py [--folds 5] [--seeds 0] [--limit N]
        [--cache var/cache] [--out var/bench/ocr_cm_off]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_THREAD_LIMIT", "1")

import torch
from sample import require_sample  # a sibling module: studies/ is on sys.path when run as a script

from models.config import ModelConfig
from models.ocr import TesseractOcr
from modstream.manifest import Example
from trainer.ablation import AblationConfig, run_ablation
from trainer.features import FeatureStore, load_inputs, read_image_texts
from trainer.importers import import_cm_off_meme
from trainer.stats import corrected_paired_t, format_mean_std

PAIRS = (
    ("a", "image only (caption removed)", "OCR text as the text (caption removed)"),
    ("b", "caption", "caption + OCR segment"),
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]{3,}", text.lower()))


def ocr_quality(examples: list[Example], texts: list[str | None]) -> dict[str, float]:
    """How much of the dataset's own transcription (its Text column) Tesseract recovers."""
    read = [t for t in texts if t is not None]
    recall = [
        len(_words(t) & _words(ex.text)) / len(_words(ex.text))
        for ex, t in zip(examples, texts, strict=True)
        if t is not None and _words(ex.text)
    ]
    return {
        "images": len(texts),
        "read": len(read),
        "failed": len(texts) - len(read),
        "non_empty": sum(bool(t) for t in read),
        "mean_words": round(sum(len(t.split()) for t in read) / max(1, len(read)), 1),
        "caption_word_recall": round(sum(recall) / max(1, len(recall)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, default=0, help="first N posts only (a smoke run)")
    parser.add_argument("--cache", type=Path, default=Path("var/cache"))
    parser.add_argument("--out", type=Path, default=Path("var/bench/ocr_cm_off"))
    args = parser.parse_args()
    require_sample()  # skips clearly when the data is absent
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()

    examples = import_cm_off_meme().examples  # posts with an image (the sample's text-only rows left out)
    if args.limit:
        examples = examples[: args.limit]
    engine = TesseractOcr("eng+hin")
    inputs = load_inputs(examples)
    examples = inputs.examples
    ocr_started = time.perf_counter()
    texts = read_image_texts(inputs, FeatureStore(args.cache), engine, progress=True)
    ocr_seconds = time.perf_counter() - ocr_started
    quality = ocr_quality(examples, texts)
    print(f"OCR ({engine.identity}): {quality} in {ocr_seconds:.0f} s (cached runs: seconds)", flush=True)

    plain = ModelConfig()
    runs: dict[str, tuple[list[Example], ModelConfig]] = {
        "image only (caption removed)": ([dataclasses.replace(e, text="") for e in examples], plain),
        "OCR text as the text (caption removed)": (
            [dataclasses.replace(e, text=t or "") for e, t in zip(examples, texts, strict=True)],
            plain,
        ),
        "caption": (examples, plain),
        "caption + OCR segment": (examples, dataclasses.replace(plain, ocr_segment=True)),
    }
    cfg = AblationConfig(folds=args.folds, seeds=tuple(args.seeds), only=("task",), jobs=1)
    summaries: dict[str, dict[str, Any]] = {}
    per_run: dict[str, dict[tuple[int, int], dict[str, float]]] = {}
    for name, (exs, model_config) in runs.items():
        out = args.out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        shutil.rmtree(out, ignore_errors=True)  # a fresh grid: never resume another setup's runs
        t0 = time.perf_counter()
        summary = run_ablation(exs, model_config, cfg, out, cache_dir=args.cache, device="cpu")
        task = summary["variants"]["task"]["tasks"]
        probe = summary["linear_probe"]
        summaries[name] = {
            "macro_f1": {t: (v["mean"], v["std"]) for t, v in task.items()},
            "probe": probe,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        per_run[name] = {
            (r["fold"], r["seed"]): r["macro_f1"]
            for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())
            if r["variant"] == "task"
        }
        cells = ", ".join(f"{t} {format_mean_std(*v)}" for t, v in summaries[name]["macro_f1"].items())
        print(f"{name}: {cells} ({summaries[name]['seconds']} s)", flush=True)

    tasks = list(plain.tasks)
    lines = [
        "| part | variant | "
        + " | ".join(f"{t} macro-F1" for t in tasks)
        + " | "
        + " | ".join(f"{t} Δ vs without OCR [corrected 95% CI] (wins)" for t in tasks)
        + " | "
        + " | ".join(f"{t} probe" for t in tasks)
        + " |",
        "|" + "---|" * (2 + 3 * len(tasks)),
    ]
    diffs: dict[str, dict[str, Any]] = {}
    for part, without, with_ocr in PAIRS:
        for name in (without, with_ocr):
            s = summaries[name]
            deltas = []
            for t in tasks:
                if name == without:
                    deltas.append("—")
                    continue
                keys = sorted(per_run[without])
                a, b = [per_run[name][k][t] for k in keys], [per_run[without][k][t] for k in keys]
                n_test = len(examples) // args.folds
                d = corrected_paired_t(a, b, len(examples) - n_test, n_test)  # folds share training posts
                diffs.setdefault(name, {})[t] = d.to_dict()
                deltas.append(f"{d.mean:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}] ({d.wins}/{d.n}), p {d.p_value:.2f}")
            lines.append(
                f"| {part} | {name} | "
                + " | ".join(format_mean_std(*s["macro_f1"][t]) for t in tasks)
                + " | "
                + " | ".join(deltas)
                + " | "
                + " | ".join(format_mean_std(*s["probe"][t]) for t in tasks)
                + " |"
            )
    table = "\n".join(lines)
    print(table)
    result = {
        "table": table,
        "variants": summaries,
        "paired_diffs": diffs,
        "ocr": {**quality, "engine": engine.identity, "seconds": round(ocr_seconds, 1)},
        "setup": {
            "posts": len(examples),
            "folds": args.folds,
            "seeds": args.seeds,
            "variant": "task only, frozen default backbones",
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1},
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "result.md").write_text(table + "\n")
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
