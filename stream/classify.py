"""`modstream classify FILE.jsonl`: the labelling pipeline without Kafka, JSONL in and out.

Input lines are posts: {"id", "text", "image": local path (relative to the file) or null}.
Every line yields exactly one output line: a label record, or an error record naming the
line and the reason (a bad line never stops the run).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from models.inference import Predictor
from models.registry import ModelRegistry
from stream.routing import RoutingPolicy, route
from trainer.images import ImageError, load_image

BATCH = 16


@dataclass
class Post:
    id: str
    text: str
    image: Image.Image | None
    media_status: str  # ok, none, or the image error reason


def read_posts(path: Path) -> Iterator[Post | dict[str, Any]]:
    """Posts, or an error record for a line that is not a valid post."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {"error": "invalid_json", "detail": f"{where}: {exc.msg}"}
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not isinstance(obj.get("text"), str):
                yield {
                    "error": "invalid_post",
                    "detail": f"{where}: need string fields 'id' and 'text'",
                }
                continue
            image, status = None, "none"
            if obj.get("image"):
                try:
                    image, status = load_image(path.parent / str(obj["image"])), "ok"
                except ImageError as exc:
                    status = exc.reason
            yield Post(obj["id"], obj["text"], image, status)


def classify_posts(
    posts: list[Post], predictor: Predictor, policy: RoutingPolicy, itm_trusted: bool
) -> list[dict[str, Any]]:
    out = []
    predictions = predictor.predict([p.text for p in posts], [p.image for p in posts])
    for post, prediction in zip(posts, predictions, strict=True):
        decision = route(prediction, predictor.card, policy, itm_trusted)
        out.append(
            {
                "post_id": post.id,
                "media_status": post.media_status,
                **prediction.to_dict(),
                **decision.to_dict(),
            }
        )
    return out


def classify_file(
    input_path: Path,
    output_path: Path | None,
    registry_root: Path,
    version: str = "current",
    device: str = "auto",
) -> int:
    from trainer.fit import pick_device

    loaded = ModelRegistry(registry_root).load(version)
    predictor = Predictor(loaded.model, loaded.tokenizer, loaded.card, pick_device(device))
    policy = RoutingPolicy()
    trusted, why = policy.itm_trusted(loaded.card)
    print(f"model {loaded.card.version}: {why}", file=sys.stderr)
    sink: TextIO = output_path.open("w", encoding="utf-8") if output_path else sys.stdout
    try:
        batch: list[Post] = []

        def flush() -> None:
            for record in classify_posts(batch, predictor, policy, trusted):
                sink.write(json.dumps(record) + "\n")
            batch.clear()

        for item in read_posts(input_path):
            if isinstance(item, Post):
                batch.append(item)
                if len(batch) >= BATCH:
                    flush()
            else:
                sink.write(json.dumps(item) + "\n")
        flush()
    finally:
        if output_path:
            sink.close()
    return 0
