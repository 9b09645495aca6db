from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from modstream.manifest import read_manifest
from trainer.importers import (
    CM_OFF_MEME_ENV,
    DatasetImportError,
    ImportResult,
    cm_off_meme_root,
    import_cm_off_meme,
    import_csv,
    import_hateful_memes,
    write_import,
)

MAPS: dict[str, dict[str, str | None]] = {
    "hate": {"off": "hateful", "non-off": "not_hateful"},
    "sarcasm": {"yes": "sarcastic", "no": "not_sarcastic", "unsure": None},
}
LABEL_COLUMNS = {"hate": "Level1", "sarcasm": "Sarc"}
HEADER = ["pid", "caption", "file", "Level1", "Sarc"]


def _png(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _import(path: Path, image_dir: Path | None = None) -> ImportResult:
    return import_csv(
        path,
        id_column="pid",
        text_column="caption",
        image_column="file",
        image_dir=image_dir,
        label_columns=LABEL_COLUMNS,
        value_maps=MAPS,
    )


def test_csv_import_maps_values_and_images(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "sub" / "b.png")
    path = _write_csv(
        tmp_path / "data.csv",
        [
            ["p1", " hello there ", "a.png", "off", "yes"],
            ["p2", "second", "sub/b.png", " non-off ", ""],  # padded value, empty cell
            ["p3", "third", "", "", "unsure"],  # no image name, mapped to None
        ],
    )
    result = import_csv(
        path,
        id_column="pid",
        text_column="caption",
        image_column="file",
        image_dir=tmp_path / "imgs",
        label_columns=LABEL_COLUMNS,
        value_maps=MAPS,
    )
    by_id = {ex.id: ex for ex in result.examples}
    assert list(by_id) == ["p1", "p2", "p3"]
    assert by_id["p1"].text == "hello there"
    assert by_id["p1"].labels == {"hate": "hateful", "sarcasm": "sarcastic"}
    assert by_id["p2"].labels == {"hate": "not_hateful", "sarcasm": None}
    assert by_id["p3"].labels == {"hate": None, "sarcasm": None}
    assert by_id["p1"].image == (tmp_path / "imgs" / "a.png").absolute()
    assert by_id["p2"].image == (tmp_path / "imgs" / "sub" / "b.png").absolute()
    assert by_id["p3"].image is None
    # A row with no image name is text-only but not a missing image.
    assert (result.text_only, result.missing_images, result.corrupt_images) == (1, 0, 0)
    assert result.skipped == 0
    summary = result.summary()
    assert "3 examples" in summary and "1 text-only" in summary
    assert "hate: hateful 1, not_hateful 1, None 1" in summary


def test_unmapped_value_names_file_row_column_and_value(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "labels.csv",
        [["p1", "t", "", "off", "yes"], ["p2", "t", "", "offensive", "no"]],
    )
    with pytest.raises(DatasetImportError) as info:
        _import(path)
    message = str(info.value)
    assert "labels.csv" in message
    assert "row 3" in message  # header is row 1, so the second data row is row 3
    assert "'Level1'" in message and "'offensive'" in message
    assert "'off'" in message and "'non-off'" in message  # the allowed values


def test_row_numbers_count_records_not_lines(tmp_path: Path) -> None:
    # A quoted newline inside the first record must not shift the second one's number.
    path = _write_csv(
        tmp_path / "multi.csv",
        [["p1", "line one\nline two", "", "off", "yes"], ["p2", "t", "", "off", "maybe"]],
    )
    with pytest.raises(DatasetImportError, match=r"row 3: column 'Sarc'.*'maybe'"):
        _import(path)


def test_missing_column_is_reported_with_the_header(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [["p1", "t", "", "off"]], header=HEADER[:4])
    with pytest.raises(DatasetImportError) as info:
        _import(path)
    assert "'Sarc'" in str(info.value) and "'Level1'" in str(info.value)


def test_short_row_is_an_error(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [["p1", "t", "", "off", "yes"], ["p2", "t"]])
    with pytest.raises(DatasetImportError, match=r"d\.csv, row 3: has 2 fields, the header has 5"):
        _import(path)


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [["p1", "a", "", "off", ""], ["p1", "b", "", "off", ""]])
    with pytest.raises(DatasetImportError, match=r"row 3: duplicate id 'p1'.*row 2"):
        _import(path)


def test_ids_default_to_row_numbers(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [["x", "a", "", "off", ""], ["x", "b", "", "non-off", ""]])
    result = import_csv(path, text_column="caption", label_columns=LABEL_COLUMNS, value_maps=MAPS)
    assert [ex.id for ex in result.examples] == ["2", "3"]
    assert all(ex.image is None for ex in result.examples)


def test_image_path_outside_the_image_dir_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "secret.png")
    path = _write_csv(tmp_path / "d.csv", [["p1", "a", "../secret.png", "off", ""]])
    with pytest.raises(DatasetImportError, match=r"row 2: column 'file' value '\.\./secret\.png'"):
        _import(path, image_dir=tmp_path / "imgs")


def _bad_image_csv(tmp_path: Path) -> Path:
    _png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.png").write_text("plain text with an image name")
    return _write_csv(
        tmp_path / "d.csv",
        [
            ["p1", "a", "good.png", "off", "yes"],
            ["p2", "b", "gone.png", "off", "yes"],
            ["p3", "c", "broken.png", "non-off", "no"],
            ["p4", "d", "notes.png", "non-off", "no"],
            ["p5", "e", "", "non-off", "no"],
        ],
    )


def test_bad_images_become_text_only(tmp_path: Path) -> None:
    result = import_csv(
        _bad_image_csv(tmp_path),
        id_column="pid",
        text_column="caption",
        image_column="file",
        label_columns=LABEL_COLUMNS,
        value_maps=MAPS,
    )
    images = {ex.id: ex.image for ex in result.examples}
    assert images == {
        "p1": (tmp_path / "good.png").absolute(),
        "p2": None,
        "p3": None,
        "p4": None,
        "p5": None,
    }
    assert result.missing_images == 1
    assert result.corrupt_images == 2
    assert result.text_only == 4  # 3 bad images + 1 row without an image name
    assert result.skipped == 0
    assert "1 missing, 2 corrupt" in result.summary()
    assert "unsupported_format 1" in result.summary()


def test_bad_images_skipped(tmp_path: Path) -> None:
    result = import_csv(
        _bad_image_csv(tmp_path),
        id_column="pid",
        text_column="caption",
        image_column="file",
        label_columns=LABEL_COLUMNS,
        value_maps=MAPS,
        on_bad_image="skip",
    )
    assert [ex.id for ex in result.examples] == ["p1", "p5"]
    assert (result.missing_images, result.corrupt_images, result.skipped) == (1, 2, 3)
    assert result.text_only == 1  # only the row with no image name


def test_value_maps_must_cover_every_task(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [["p1", "a", "", "off", ""]])
    with pytest.raises(ValueError, match="sarcasm"):
        import_csv(path, text_column="caption", label_columns=LABEL_COLUMNS, value_maps={"hate": {}})


def test_write_import_round_trips(tmp_path: Path) -> None:
    _png(tmp_path / "out" / "images" / "a.png")
    _png(tmp_path / "elsewhere" / "b.png")
    path = _write_csv(
        tmp_path / "d.csv",
        [["p1", "a", "out/images/a.png", "off", "yes"], ["p2", "b", "elsewhere/b.png", "", ""]],
    )
    result = _import(path)
    manifest = tmp_path / "out" / "manifest.jsonl"
    assert write_import(result, manifest) == 2
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert lines[0]["image"] == "images/a.png"  # under the manifest folder: relative
    assert lines[1]["image"] == str((tmp_path / "elsewhere" / "b.png").absolute())
    back = read_manifest(manifest)
    assert [ex.image for ex in back] == [ex.image for ex in result.examples]
    assert back[0].labels == {"hate": "hateful", "sarcasm": "sarcastic"}


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hateful_memes_layout(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "42953.png")
    _png(tmp_path / "img" / "01235.png")
    _png(tmp_path / "img" / "07777.png")
    train = _jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character"},
            {"id": 1235, "img": "img/01235.png", "label": 1, "text": "hateful caption"},
            {"id": 99, "img": "img/00099.png", "label": 1, "text": "image is missing"},
        ],
    )
    result = import_hateful_memes(train)
    assert [ex.id for ex in result.examples] == ["42953", "1235", "99"]
    assert [ex.labels["hate"] for ex in result.examples] == ["not_hateful", "hateful", "hateful"]
    assert all(ex.labels["sarcasm"] is None for ex in result.examples)
    assert result.examples[1].image == (tmp_path / "img" / "01235.png").absolute()
    assert result.examples[2].image is None
    assert (result.missing_images, result.text_only) == (1, 1)

    # A split file in another folder, with the images found through image_root.
    (tmp_path / "split").mkdir()
    test = _jsonl(
        tmp_path / "split" / "test.jsonl",
        [{"id": 7777, "img": "img/07777.png", "text": "no label in the test split"}],
    )
    result = import_hateful_memes(test, image_root=tmp_path)
    assert result.examples[0].labels == {"hate": None, "sarcasm": None}
    assert result.examples[0].image == (tmp_path / "img" / "07777.png").absolute()


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"id": 1, "img": "img/1.png", "label": 2, "text": "t"}, "label"),
        ({"id": 1, "img": "img/1.png", "label": "1", "text": "t"}, "label"),
        ({"id": 1, "img": "img/1.png", "label": True, "text": "t"}, "label"),
        ({"img": "img/1.png", "label": 0, "text": "t"}, "id"),
        ({"id": 1, "img": "img/1.png", "label": 0}, "text"),
    ],
)
def test_hateful_memes_bad_line_names_file_and_line(tmp_path: Path, row: dict[str, object], field: str) -> None:
    good = {"id": 0, "img": "img/0.png", "label": 0, "text": "fine"}
    path = _jsonl(tmp_path / "dev.jsonl", [good, row])
    with pytest.raises(DatasetImportError) as info:
        import_hateful_memes(path)
    assert f"dev.jsonl, line 2: field '{field}'" in str(info.value)


def _fake_cm_off_meme(root: Path) -> Path:
    # Same layout and columns as the real sample, including *.png files that hold JPEG data.
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / "eng1.png", format="JPEG")
    _png(images / "meme.png")
    _png(images / "meme.jpg")
    header = ["Name", "Text", "Ground truth reality", "Level1", "Level2", "Valence", "Sarcasm"]
    _write_csv(
        root / "sample_data.csv",
        [
            ["eng1.png", "first ", "note", "off", "explicit", "negative", "sarcasm"],
            ["gone.png", "no image", "note", "non-off", "non-off", "neutral", "non-sarcastic"],
            ["meme.png", "dup stem a", "note", "non-off", "non-off", "neutral", ""],
            ["meme.jpg", "dup stem b", "note", "off", "implicit", "negative", "sarcasm"],
        ],
        header=header,
    )
    return root


def test_cm_off_meme_preset_on_a_fake_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_cm_off_meme(tmp_path / "cm")
    monkeypatch.setenv(CM_OFF_MEME_ENV, str(root))
    assert cm_off_meme_root() == root

    result = import_cm_off_meme()
    # Repeated stems get the row number on every copy; unique stems stay as they are.
    assert [ex.id for ex in result.examples] == ["eng1", "meme-row4", "meme-row5"]
    assert [ex.labels for ex in result.examples] == [
        {"hate": "hateful", "sarcasm": "sarcastic"},
        {"hate": "not_hateful", "sarcasm": None},
        {"hate": "hateful", "sarcasm": "sarcastic"},
    ]
    assert result.examples[0].text == "first"
    assert (result.skipped, result.missing_images, result.text_only) == (1, 1, 0)

    with_text = import_cm_off_meme(with_text_only=True)
    assert len(with_text.examples) == 4 and with_text.text_only == 1
    gone = next(ex for ex in with_text.examples if ex.id == "gone")
    assert gone.image is None and gone.labels["hate"] == "not_hateful"


def test_cm_off_meme_missing_folder_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match=CM_OFF_MEME_ENV):
        import_cm_off_meme(tmp_path / "absent")


@pytest.mark.realdata
def test_cm_off_meme_real_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    root = cm_off_meme_root()
    if not (root / "sample_data.csv").is_file():
        pytest.skip(f"CM-Off-Meme sample not found at {root} (set {CM_OFF_MEME_ENV})")
    result = import_cm_off_meme(root)
    examples = result.examples
    assert len(examples) == 1308
    assert all(ex.image is not None and ex.image.is_file() for ex in examples)
    assert (result.skipped, result.missing_images, result.corrupt_images) == (713, 713, 0)
    assert len({ex.id for ex in examples}) == 1308
    # Counts from the sample's README (rows with an image).
    assert Counter(ex.labels["hate"] for ex in examples) == {"hateful": 634, "not_hateful": 674}
    assert Counter(ex.labels["sarcasm"] for ex in examples) == {
        "sarcastic": 840,
        "not_sarcastic": 466,
        None: 2,
    }
