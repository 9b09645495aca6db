"""`modstream classify FILE.jsonl`: the worker's pipeline without Kafka, JSONL in and out.

Input lines are Post records (`{"id", "text", "image_urls": [...]}`). An image URL is
fetched through the same SSRF-guarded fetcher as the worker's; a URL without a scheme is
a local file relative to the input file (for datasets and the bundled sample). Every line
yields exactly one output line: a Label record, or a DeadLetter naming the stage and the
reason (a bad line never stops the run).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from models.devices import pick_device
from models.images import MAX_BYTES, ImageError, content_hash
from models.inference import Predictor
from models.registry import ModelRegistry
from models.routing.route import RoutingPolicy
from modstream.records import encode
from stream.device_pool import DevicePool
from stream.media import FetchConfig, MediaFetcher, MediaResult, decode_and_read
from stream.ocr import reader_for
from stream.pipeline import Pipeline

BATCH = 64


class LocalOrWebFetcher:
    """http(s) URLs through the guarded MediaFetcher; scheme-less paths from `base_dir`."""

    def __init__(self, web: MediaFetcher, base_dir: Path) -> None:
        self.web = web
        self.base_dir = base_dir

    def _local(self, ref: str) -> MediaResult:
        started = time.perf_counter()
        path = self.base_dir / ref
        try:
            data = _read_capped(path)
            digest = content_hash(data)
            # Decoded as the web fetcher decodes (its bounds), on this thread.
            image, text, pdq, trimmed = decode_and_read(data, digest, self.web.config, self.web.ocr)
        except ImageError as exc:
            exc = ImageError(exc.reason, f"{path}: {exc}") if not str(exc).startswith(str(path)) else exc
            return MediaResult(ref, exc.reason, reason=str(exc), elapsed_s=time.perf_counter() - started)
        return MediaResult(
            ref, "ok", image=image, content_hash=digest, final_url=str(path), attempts=1, ocr_text=text,
            pdq=pdq, pdq_trimmed=trimmed,
        )  # fmt: skip

    async def fetch_many(self, urls: Sequence[str], *, decode: bool = True) -> list[MediaResult]:
        """Always decoded: the CLI keeps no dedupe cache whose facts could stand in for a decode."""
        remote = [u for u in urls if urlsplit(u).scheme]
        fetched = iter(await self.web.fetch_many(remote))
        local = [asyncio.to_thread(self._local, u) for u in urls if not urlsplit(u).scheme]
        loaded = iter(await asyncio.gather(*local))
        return [next(fetched) if urlsplit(u).scheme else next(loaded) for u in urls]

    async def decode(self, result: MediaResult) -> None:
        await self.web.decode(result)


def _read_capped(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The file's bytes, refusing a missing, unreadable or oversized file with an ImageError."""
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # one byte past the cap detects an oversized file
    except FileNotFoundError as exc:
        raise ImageError("missing", f"{path}: image file does not exist") from exc
    except OSError as exc:
        raise ImageError("unreadable", f"{path}: cannot read image ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{path}: image file is over {max_bytes:,} bytes")
    return data


def read_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield line.rstrip(b"\r\n")


def _chunks(lines: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def classify_stream(
    lines: Iterator[bytes],
    sink: TextIO,
    registry_root: Path,
    version: str,
    device: str,
    base_dir: Path,
    allow_loopback: bool = False,
    ocr: str = "auto",
) -> dict[str, int]:
    # Before the model loads: a model trained with OCR text and no Tesseract fails here, saying what to install.
    reader = reader_for(ocr, ModelRegistry(registry_root).card(version).config)
    loaded = ModelRegistry(registry_root).load(version)
    pool = DevicePool(lambda d: Predictor(loaded.model, loaded.tokenizer, loaded.card, d), [pick_device(device)])
    policy = RoutingPolicy()
    print(f"model {loaded.card.version}: {policy.describe(loaded.card)}", file=sys.stderr)
    counts = {"labelled": 0, "review": 0, "dead_letter": 0}
    # Keep decoded images no larger than twice what the model looks at (see models.images).
    side = loaded.model.image_encoder.image_size
    fetch = FetchConfig(allow_loopback=allow_loopback, max_side=2 * side, min_side=side)
    await pool.start()
    try:
        async with MediaFetcher(fetch, ocr=reader) as web:
            pipeline = Pipeline(pool, LocalOrWebFetcher(web, base_dir), lambda version: loaded.card, policy)
            for batch in _chunks(lines, BATCH):
                for outcome in await pipeline.process(batch):
                    record = outcome.dead_letter or outcome.label
                    assert record is not None
                    sink.write(encode(record).decode() + "\n")
                    counts["dead_letter" if outcome.dead_letter else "labelled"] += 1
                    counts["review"] += bool(outcome.review)
    finally:
        await pool.close()
    return counts


def classify_file(
    input_path: Path,
    output_path: Path | None,
    registry_root: Path,
    version: str = "current",
    device: str = "auto",
    allow_loopback: bool = False,
    ocr: str = "auto",
) -> int:
    sink: TextIO = output_path.open("w", encoding="utf-8") if output_path else sys.stdout
    try:
        counts = asyncio.run(
            classify_stream(
                read_lines(input_path), sink, registry_root, version, device, input_path.parent, allow_loopback, ocr
            )
        )
    finally:
        if output_path:
            sink.close()
    print(
        f"{counts['labelled']} labelled ({counts['review']} to review), {counts['dead_letter']} dead-lettered",
        file=sys.stderr,
    )
    return 0
