"""What reading the text inside images costs the worker per post: the decode pool's work for
one image (stream.media.decode_and_read) without OCR, with OCR on a cold cache, and with the
cache warm (a repost), single-threaded. Also tesserocr against pytesseract (a `tesseract`
process per image) and English alone against eng+hin, to show why the defaults are what
they are.

Images are the CM-Off-Meme sample's (real memes, mostly ~225 px) when ../shared has it,
otherwise rendered text cards (the script says which).

    nice -n 5 .venv/bin/python bench/ocr_cost.py [--images 200] [--out var/bench/ocr_cost.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # Tesseract's OpenMP: one thread, like the measurement

from PIL import Image, ImageDraw, ImageFont

from models.images import content_hash
from models.ocr import OcrError, TesseractOcr, clean_text, ocr_ready_image
from stream.media import FetchConfig, decode_and_read
from stream.ocr import ImageTextReader
from trainer.importers import cm_off_meme_root


def sample_images(n: int) -> tuple[list[bytes], str]:
    folder = cm_off_meme_root() / "images"
    files = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if files:
        return [f.read_bytes() for f in files], f"CM-Off-Meme sample ({len(files)} PNGs)"
    print(f"CM-Off-Meme images not found in {folder}; timing rendered text cards instead")
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 22)
    out = []
    for i in range(n):
        card = Image.new("RGB", (256, 224), (240, 240, 230))
        ImageDraw.Draw(card).text((10, 90), f"WHEN THE MEME {i} HITS", fill=(0, 0, 0), font=font)
        buf = io.BytesIO()
        card.save(buf, "PNG")
        out.append(buf.getvalue())
    return out, f"rendered text cards ({n})"


class PyTesseract:
    """The subprocess binding, for comparison only (pytesseract is not a dependency)."""

    def __init__(self, languages: str) -> None:
        import pytesseract

        self._run = pytesseract.image_to_string
        self.languages = languages
        self.identity = f"pytesseract-{languages}"

    def __call__(self, image: Image.Image) -> str:
        return clean_text(self._run(ocr_ready_image(image), lang=self.languages))


def posts_per_second(step: Callable[[bytes, str], object], images: list[bytes], digests: list[str]) -> float:
    started = time.perf_counter()
    for data, digest in zip(images, digests, strict=True):
        step(data, digest)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--pytesseract-images", type=int, default=40, help="fewer: a process per image is slow")
    parser.add_argument("--out", type=Path, default=Path("var/bench/ocr_cost.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    images, source = sample_images(args.images)
    digests = [content_hash(d) for d in images]
    config = FetchConfig()  # max_side 448, as the default worker
    rows: list[dict[str, object]] = []

    def row(name: str, pps: float, n: int, **extra: object) -> None:
        rows.append({"path": name, "posts_per_s": round(pps, 1), "images": n, **extra})
        print(f"{name:55s} {pps:8.1f} posts/s  ({n} images)", flush=True)

    def decode_with(reader: ImageTextReader | None, data: bytes, digest: str) -> object:
        return decode_and_read(data, digest, config, reader)

    base = posts_per_second(partial(decode_with, None), images, digests)
    row("decode only (OCR off)", base, len(images))
    failed = 0
    for languages in ("eng+hin", "eng"):
        engine = TesseractOcr(languages)
        reader = ImageTextReader(engine, cache_size=len(images) + 1)
        cold = posts_per_second(partial(decode_with, reader), images, digests)
        texts = [reader.read(Image.new("RGB", (1, 1)), h) for h in digests]  # every one cached now
        failed += sum(t is None for t in texts)
        words = sum(len(t.split()) for t in texts if t) / max(1, len(texts))
        row(f"decode + OCR {languages}, tesserocr, cold cache", cold, len(images), mean_words=round(words, 1))
        if languages == "eng+hin":
            warm = posts_per_second(partial(decode_with, reader), images, digests)
            row(f"decode + OCR {languages}, cache hit (repost)", warm, len(images))
    try:
        slow = PyTesseract("eng+hin")
    except ImportError:
        print("pytesseract not installed: its row is skipped")
    else:
        n = min(args.pytesseract_images, len(images))
        reader = ImageTextReader(slow, cache_size=0)
        pps = posts_per_second(partial(decode_with, reader), images[:n], digests[:n])
        row("decode + OCR eng+hin, pytesseract (process per image)", pps, n)
    result = {
        "source": source,
        "rows": rows,
        "ratio_ocr_cold_vs_off": round(float(rows[1]["posts_per_s"]) / base, 3),  # type: ignore[arg-type]
        "failed_reads": failed,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1},
        "tesseract": TesseractOcr("eng").identity,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"OCR eng+hin on a cold cache runs at {result['ratio_ocr_cold_vs_off']:.3f}x the decode-only rate")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except OcrError as exc:
        raise SystemExit(f"OCR failed: {exc}") from exc
