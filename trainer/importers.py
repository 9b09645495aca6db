"""Turn labelled datasets (CSV, Hateful Memes JSONL, the CM-Off-Meme sample) into Examples.

Importers are strict about labels (an unknown value stops the import with the file, row,
column and value, because a silently dropped label skews training) and lenient about
images (a missing or undecodable image is counted and the post kept as text-only or
skipped, because real dumps always have some and the caller decides).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Literal

from models.tasks import DEFAULT_TASKS
from modstream.manifest import Example, write_manifest
from trainer.images import ImageError, load_image

BadImagePolicy = Literal["text-only", "skip"]

DEFAULT_CM_OFF_MEME = Path(__file__).resolve().parents[1].parent / "shared/data/cm-off-meme-sample"
CM_OFF_MEME_ENV = "MODSTREAM_CM_OFF_MEME"

_NOT_HATEFUL, _HATEFUL = DEFAULT_TASKS["hate"]
_NOT_SARCASTIC, _SARCASTIC = DEFAULT_TASKS["sarcasm"]

CM_OFF_MEME_VALUE_MAPS: dict[str, dict[str, str | None]] = {
    "hate": {"off": _HATEFUL, "non-off": _NOT_HATEFUL},
    "sarcasm": {"sarcasm": _SARCASTIC, "non-sarcastic": _NOT_SARCASTIC},
}


class DatasetImportError(ValueError):
    """A source row that cannot be imported; the message names file, row, column and value."""


@dataclass
class ImportResult:
    examples: list[Example] = field(default_factory=list)
    # Rows naming an image file that does not exist.
    missing_images: int = 0
    # Rows whose image exists but does not decode (any ImageError other than `missing`).
    corrupt_images: int = 0
    # Rows left out (bad image with policy "skip", or no image in an image-only preset).
    skipped: int = 0
    # Examples emitted without an image, whatever the reason (no name, or a bad image).
    text_only: int = 0
    source: str = ""
    # ImageError reasons for the missing + corrupt images, for the summary.
    image_errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        images = f"images: {self.missing_images} missing, {self.corrupt_images} corrupt"
        # Break the corrupt count down by reason (truncated, unsupported_format, ...).
        corrupt = sorted((k, v) for k, v in self.image_errors.items() if k != "missing")
        if corrupt:
            images += " (" + ", ".join(f"{k} {v}" for k, v in corrupt) + ")"
        lines = [
            f"{self.source or 'import'}: {len(self.examples)} examples "
            f"({len(self.examples) - self.text_only} with image, {self.text_only} text-only), "
            f"{self.skipped} rows skipped",
            images,
        ]
        for task in sorted({t for ex in self.examples for t in ex.labels}):
            counts = Counter(ex.labels.get(task) for ex in self.examples)
            parts = [f"{label} {n}" for label, n in sorted(counts.items(), key=_label_key)]
            lines.append(f"{task}: " + ", ".join(parts))
        return "\n".join(lines)


def _label_key(item: tuple[str | None, int]) -> tuple[bool, str]:
    # Unlabelled (None) last, the rest alphabetically.
    return (item[0] is None, item[0] or "")


@dataclass(frozen=True)
class _Row:
    """One source record, already parsed, before the image check."""

    where: str  # "file, row N" for messages
    number: int
    id: str
    text: str
    image_name: str | None
    labels: dict[str, str | None]


def _image_path(image_dir: Path, name: str, where: str, column: str) -> Path:
    # Sources are data, not code: keep their image references inside the image folder.
    # Lexical check (no resolve()) so a symlinked dataset folder still works.
    pure = PurePath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise DatasetImportError(f"{where}: column {column!r} value {name!r} must be a path inside {image_dir}")
    return image_dir / pure


def _collect(
    rows: Iterable[_Row],
    *,
    image_dir: Path,
    image_column: str,
    on_missing_image: BadImagePolicy,
    on_corrupt_image: BadImagePolicy,
    duplicate_ids: Literal["error", "append-row"],
    source: str,
) -> ImportResult:
    result = ImportResult(source=source)
    # Parse every row first: a label error should stop the import before minutes of
    # image decoding, and duplicate handling needs to see all ids.
    parsed = list(rows)
    counts = Counter(r.id for r in parsed)
    seen: dict[str, str] = {}
    for row in parsed:
        example_id = row.id
        if counts[example_id] > 1 and duplicate_ids == "append-row":
            # Suffix every copy (not just the later ones) so no id depends on row order.
            example_id = f"{example_id}-row{row.number}"
        if example_id in seen:
            raise DatasetImportError(f"{row.where}: duplicate id {example_id!r} (first used at {seen[example_id]})")
        seen[example_id] = row.where

        image: Path | None = None
        if row.image_name:
            path = _image_path(image_dir, row.image_name, row.where, image_column)
            try:
                load_image(path)
                image = path
            except ImageError as exc:
                result.image_errors[exc.reason] += 1
                if exc.reason == "missing":
                    result.missing_images += 1
                    policy = on_missing_image
                else:
                    result.corrupt_images += 1
                    policy = on_corrupt_image
                if policy == "skip":
                    result.skipped += 1
                    continue
        if image is None:
            result.text_only += 1
        result.examples.append(Example(id=example_id, text=row.text, image=image, labels=dict(row.labels)))
    return result


def _map_label(raw: str, task: str, column: str, value_map: dict[str, str | None], where: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if value in value_map:
        return value_map[value]
    allowed = ", ".join(repr(v) for v in value_map)
    raise DatasetImportError(
        f"{where}: column {column!r} (task {task!r}) has value {value!r}, "
        f"which is not in the value map; allowed: {allowed} (or empty for no label)"
    )


def _csv_rows(
    csv_path: Path,
    *,
    text_column: str,
    image_column: str | None,
    label_columns: dict[str, str],
    value_maps: dict[str, dict[str, str | None]],
    make_id: Callable[[dict[str, str], int], str],
    extra_columns: Iterable[str] = (),
) -> Iterator[_Row]:
    # Strip keys and values once so " off " and "off " match the map.
    maps = {task: {k.strip(): v for k, v in value_maps[task].items()} for task in label_columns}
    try:
        # utf-8-sig: spreadsheet exports often start with a BOM, which would otherwise
        # become part of the first column's name.
        with csv_path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DatasetImportError(f"{csv_path}: file is empty (no header row)")
            header = [h.strip() for h in header]
            needed = [*extra_columns, text_column, *label_columns.values()]
            needed += [image_column] if image_column else []
            missing = [c for c in needed if c not in header]
            if missing:
                raise DatasetImportError(
                    f"{csv_path}: header has no column(s) {', '.join(map(repr, missing))}; "
                    f"columns are {', '.join(map(repr, header))}"
                )
            # Row numbers as a spreadsheet shows them: the header is row 1.
            number = 1
            try:
                for number, cells in enumerate(reader, start=2):
                    if not cells or all(not c.strip() for c in cells):
                        continue
                    where = f"{csv_path}, row {number}"
                    if len(cells) != len(header):
                        raise DatasetImportError(f"{where}: has {len(cells)} fields, the header has {len(header)}")
                    record = dict(zip(header, cells, strict=True))
                    labels = {
                        task: _map_label(record[column], task, column, maps[task], where)
                        for task, column in label_columns.items()
                    }
                    image_name = record[image_column].strip() if image_column else ""
                    yield _Row(
                        where=where,
                        number=number,
                        id=make_id(record, number),
                        text=record[text_column].strip(),
                        image_name=image_name or None,
                        labels=labels,
                    )
            except UnicodeDecodeError as exc:
                raise DatasetImportError(f"{csv_path}, after row {number}: not valid UTF-8 ({exc.reason})") from exc
            except csv.Error as exc:
                raise DatasetImportError(f"{csv_path}, row {number + 1}: {exc}") from exc
    except FileNotFoundError as exc:
        raise DatasetImportError(f"{csv_path}: file does not exist") from exc


def _check_maps(label_columns: dict[str, str], value_maps: dict[str, dict[str, str | None]]) -> None:
    unmapped = [task for task in label_columns if task not in value_maps]
    if unmapped:
        raise ValueError(f"value_maps has no map for task(s) {', '.join(unmapped)}")


def import_csv(
    csv_path: Path,
    *,
    text_column: str,
    label_columns: dict[str, str],
    value_maps: dict[str, dict[str, str | None]],
    id_column: str | None = None,
    image_column: str | None = None,
    image_dir: Path | None = None,
    on_bad_image: BadImagePolicy = "text-only",
) -> ImportResult:
    """Import a CSV with a header row.

    `label_columns` maps task -> column; `value_maps` maps task -> {raw value: label or
    None}. An empty cell means no label; any other value missing from the map raises
    DatasetImportError. Image names are relative to `image_dir` (default: the CSV's
    folder); a missing or undecodable image is counted and the row kept text-only or
    skipped per `on_bad_image`. Ids come from `id_column` (must be unique) or else the row
    number.
    """
    _check_maps(label_columns, value_maps)
    csv_path = Path(csv_path)
    base = (image_dir if image_dir is not None else csv_path.parent).absolute()

    def make_id(record: dict[str, str], number: int) -> str:
        if id_column is None:
            return str(number)
        value = record[id_column].strip()
        if not value:
            raise DatasetImportError(f"{csv_path}, row {number}: column {id_column!r} is empty")
        return value

    rows = _csv_rows(
        csv_path,
        text_column=text_column,
        image_column=image_column,
        label_columns=label_columns,
        value_maps=value_maps,
        make_id=make_id,
        extra_columns=[id_column] if id_column else [],
    )
    return _collect(
        rows,
        image_dir=base,
        image_column=image_column or "image",
        on_missing_image=on_bad_image,
        on_corrupt_image=on_bad_image,
        duplicate_ids="error",
        source=str(csv_path),
    )


def cm_off_meme_root() -> Path:
    """The CM-Off-Meme sample folder: $MODSTREAM_CM_OFF_MEME, else ../shared/data/...

    Read at call time so tests and deployments can point elsewhere without re-importing.
    """
    env = os.environ.get(CM_OFF_MEME_ENV)
    return Path(env) if env else DEFAULT_CM_OFF_MEME


def import_cm_off_meme(
    root: Path | None = None,
    *,
    with_text_only: bool = False,
    on_bad_image: BadImagePolicy = "text-only",
) -> ImportResult:
    """Import the CM-Off-Meme public sample (sample_data.csv + images/).

    Level1 off/non-off -> hate; Sarcasm sarcasm/non-sarcastic -> sarcasm (empty -> None).
    About a third of the rows name an image the sample does not ship: they are left out
    (counted as skipped and missing) unless `with_text_only`, which keeps them text-only.
    `on_bad_image` applies to images that exist but do not decode. Ids are the image
    name's stem, suffixed with the row number if a stem repeats.
    """
    root = Path(root) if root is not None else cm_off_meme_root()
    csv_path = root / "sample_data.csv"
    if not csv_path.is_file():
        raise DatasetImportError(f"{csv_path}: CM-Off-Meme sample not found; set {CM_OFF_MEME_ENV} to its folder")

    def make_id(record: dict[str, str], number: int) -> str:
        stem = PurePath(record["Name"].strip()).stem
        if not stem:
            raise DatasetImportError(f"{csv_path}, row {number}: column 'Name' is empty")
        return stem

    rows = _csv_rows(
        csv_path,
        text_column="Text",
        image_column="Name",
        label_columns={"hate": "Level1", "sarcasm": "Sarcasm"},
        value_maps=CM_OFF_MEME_VALUE_MAPS,
        make_id=make_id,
    )
    return _collect(
        rows,
        image_dir=(root / "images").absolute(),
        image_column="Name",
        on_missing_image="text-only" if with_text_only else "skip",
        on_corrupt_image=on_bad_image,
        duplicate_ids="append-row",
        source=f"cm-off-meme ({root})",
    )


def _hateful_memes_rows(jsonl_path: Path) -> Iterator[_Row]:
    labels_by_value: dict[int, str] = {0: _NOT_HATEFUL, 1: _HATEFUL}
    try:
        fh = jsonl_path.open(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetImportError(f"{jsonl_path}: file does not exist") from exc
    with fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{jsonl_path}, line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetImportError(f"{where}: invalid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict):
                    raise DatasetImportError(f"{where}: expected a JSON object")
                raw_id = obj.get("id")
                # bool is an int subclass; an id of `true` is a data error, not 1.
                if isinstance(raw_id, bool) or not isinstance(raw_id, int | str) or raw_id == "":
                    raise DatasetImportError(f"{where}: field 'id' has value {raw_id!r}")
                text = obj.get("text")
                if not isinstance(text, str):
                    raise DatasetImportError(f"{where}: field 'text' has value {text!r}")
                img = obj.get("img")
                if img is not None and not isinstance(img, str):
                    raise DatasetImportError(f"{where}: field 'img' has value {img!r}")
                label: str | None = None
                if "label" in obj and obj["label"] is not None:
                    raw = obj["label"]
                    # Strict: only the integers 0 and 1 (not true, 1.0 or "1").
                    if type(raw) is not int or raw not in labels_by_value:
                        raise DatasetImportError(f"{where}: field 'label' has value {raw!r}; allowed: 0, 1 or absent")
                    label = labels_by_value[raw]
                yield _Row(
                    where=where,
                    number=lineno,
                    id=str(raw_id),
                    text=text.strip(),
                    image_name=img.strip() if img else None,
                    labels={"hate": label, "sarcasm": None},
                )
        except UnicodeDecodeError as exc:
            raise DatasetImportError(f"{jsonl_path}, after line {lineno}: not valid UTF-8 ({exc.reason})") from exc


def import_hateful_memes(
    jsonl_path: Path,
    *,
    image_root: Path | None = None,
    on_bad_image: BadImagePolicy = "text-only",
) -> ImportResult:
    """Import a Facebook Hateful Memes split (train.jsonl, dev_seen.jsonl, test.jsonl...).

    Lines look like {"id": 42953, "img": "img/42953.png", "label": 0|1, "text": "..."};
    `label` is absent in test splits (-> None). `img` is relative to `image_root`, default
    the JSONL's folder. Hateful Memes has no sarcasm labels, so sarcasm is None.
    """
    jsonl_path = Path(jsonl_path)
    base = (image_root if image_root is not None else jsonl_path.parent).absolute()
    return _collect(
        _hateful_memes_rows(jsonl_path),
        image_dir=base,
        image_column="img",
        on_missing_image=on_bad_image,
        on_corrupt_image=on_bad_image,
        duplicate_ids="error",
        source=str(jsonl_path),
    )


def write_import(result: ImportResult, out_manifest: Path) -> int:
    """Write `result` as a manifest; images under its folder are stored relative."""
    # Importers store absolute image paths; make the manifest path absolute too so
    # Example.to_json can relativise the ones under the manifest's folder.
    return write_manifest(Path(out_manifest).absolute(), result.examples)
