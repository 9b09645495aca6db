"""The dataset manifest: one JSON object per line.

    {"id": "p1", "text": "...", "image": "images/p1.png" | null,
     "labels": {"hate": "hateful" | null, "sarcasm": "sarcastic" | null}}

`image` is a path relative to the manifest's folder (or absolute). A task's label is null
when the source does not label that task; the task loss ignores it.

Ids are unique, except in an append-only manifest (the reviewed dataset: a re-decided post
gets a new line at the end): read it with `latest=True`, where a later line for an id replaces
the earlier one.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    image: Path | None
    labels: dict[str, str | None] = field(default_factory=dict)
    # Free-form extras a source wants to keep (e.g. synthetic ground truth); not used by training.
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        image: str | None = None
        if self.image is not None:
            image = str(self.image.relative_to(root)) if root and self.image.is_relative_to(root) else str(self.image)
        out: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "image": image,
            "labels": self.labels,
        }
        if self.meta:
            out["meta"] = self.meta
        return out


def _parse(obj: Any, root: Path, where: str) -> Example:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in (("id", str), ("text", str)):
        if not isinstance(obj.get(key), kind):
            raise ManifestError(f"{where}: field {key!r} must be a string")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise ManifestError(f"{where}: field 'image' must be a path string or null")
    labels = obj.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in labels.items()
    ):
        raise ManifestError(f"{where}: field 'labels' must map task names to a label string or null")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: field 'meta' must be an object")
    path = None if image is None else (root / image if not Path(image).is_absolute() else Path(image))
    return Example(id=obj["id"], text=obj["text"], image=path, labels=dict(labels), meta=meta)


def read_manifest(path: Path, *, latest: bool = False) -> list[Example]:
    """Every example; `latest`: an append-only manifest, the last line per id (in the order
    of those last lines)."""
    if not latest:
        return list(iter_manifest(path))
    last: dict[str, Example] = {}
    for example in iter_manifest(path, duplicates=True):
        last.pop(example.id, None)  # re-inserted at the end: the order of the latest lines
        last[example.id] = example
    return list(last.values())


def complete_part(path: Path) -> tuple[bytes, bool]:
    """The manifest's bytes up to its last newline, and whether a partial last line was cut
    off (a line being appended, or an append cut short by a crash)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end], end != len(data)


def read_complete_lines(path: Path, *, latest: bool = False) -> list[Example]:
    """Like read_manifest, but safe while a writer appends: a partial last line is left out
    until it is whole. Image paths resolve against `path`'s folder either way."""
    data, cut = complete_part(path)
    if not cut:
        return read_manifest(path, latest=latest)
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / path.name
        snapshot.write_bytes(data)
        examples = read_manifest(snapshot, latest=latest)
    root = Path(tmp)
    return [
        dataclasses.replace(ex, image=path.parent / ex.image.relative_to(root))
        if ex.image is not None and ex.image.is_relative_to(root)
        else ex
        for ex in examples
    ]


def iter_manifest(path: Path, *, duplicates: bool = False) -> Iterator[Example]:
    """Every line as an Example; a repeated id is an error unless `duplicates`."""
    root = path.parent
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: invalid JSON ({exc.msg})") from exc
            example = _parse(obj, root, where)
            if example.id in seen and not duplicates:
                raise ManifestError(f"{where}: duplicate id {example.id!r}")
            seen.add(example.id)
            yield example


def write_manifest(path: Path, examples: Iterable[Example]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for example in examples:
            fh.write(json.dumps(example.to_json(path.parent), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count
