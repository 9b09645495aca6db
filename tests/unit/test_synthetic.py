from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modstream.manifest import Example, read_manifest
from trainer.synthetic import PLURALS, SHAPES, generate, write_synthetic

SIZE = 48  # small images keep the tests fast; the rules do not depend on size


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> list[Example]:
    out = tmp_path_factory.mktemp("syn")
    return generate(400, 11, out, image_size=SIZE, mismatch_rate=0.25)


def test_same_inputs_give_byte_identical_output(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", 30, 5, image_size=SIZE)
    b = write_synthetic(tmp_path / "b", 30, 5, image_size=SIZE)
    assert a.read_bytes() == b.read_bytes()
    pngs_a = sorted((tmp_path / "a" / "images").iterdir())
    pngs_b = sorted((tmp_path / "b" / "images").iterdir())
    assert [p.name for p in pngs_a] == [p.name for p in pngs_b] and len(pngs_a) == 30
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(pngs_a, pngs_b, strict=True))
    # A different seed gives different posts.
    c = write_synthetic(tmp_path / "c", 30, 6, image_size=SIZE)
    assert c.read_bytes() != a.read_bytes()


def test_smaller_n_is_a_prefix(tmp_path: Path) -> None:
    big = generate(12, 3, tmp_path / "big", image_size=SIZE)
    small = generate(5, 3, tmp_path / "small", image_size=SIZE)
    assert [(e.id, e.text, e.meta) for e in small] == [(e.id, e.text, e.meta) for e in big[:5]]


def test_ids_paths_and_manifest(tmp_path: Path) -> None:
    manifest = write_synthetic(tmp_path, 4, 9, image_size=SIZE)
    assert manifest == tmp_path / "manifest.jsonl"
    back = read_manifest(manifest)
    assert [e.id for e in back] == [f"syn-9-{i:05d}" for i in range(4)]
    first = json.loads(manifest.read_text().splitlines()[0])
    assert first["image"] == "images/syn-9-00000.png"  # relative: the folder can move
    assert set(first["meta"]) == {
        "mismatched",
        "shape",
        "text_shape",
        "background",
        "colour",
        "mood",
    }
    with Image.open(back[0].image) as img:  # type: ignore[arg-type]
        assert img.format == "PNG" and img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_labels_follow_the_rules(sample: list[Example]) -> None:
    for ex in sample:
        m = ex.meta
        sarcastic = m["mood"] == "praise" and m["background"] == "gloomy"
        hateful = m["mood"] == "hostile" and m["colour"] == "red"
        assert ex.labels["sarcasm"] == ("sarcastic" if sarcastic else "not_sarcastic")
        assert ex.labels["hate"] == ("hateful" if hateful else "not_hateful")
    # The benign confounder (hostile text, non-red shape) actually occurs.
    assert any(e.meta["mood"] == "hostile" and e.meta["colour"] != "red" for e in sample)
    # Praise over a sunny scene is not sarcastic, and occurs too.
    assert any(e.meta["mood"] == "praise" and e.meta["background"] == "sunny" for e in sample)


def test_label_balance(sample: list[Example]) -> None:
    for task, positive in (("hate", "hateful"), ("sarcasm", "sarcastic")):
        rate = sum(e.labels[task] == positive for e in sample) / len(sample)
        assert 0.25 <= rate <= 0.5, (task, rate)


def test_neither_modality_alone_predicts_the_labels(sample: list[Example]) -> None:
    # Within one text mood, the label still varies with the image, and vice versa.
    praise = [e for e in sample if e.meta["mood"] == "praise"]
    assert {e.labels["sarcasm"] for e in praise} == {"sarcastic", "not_sarcastic"}
    red = [e for e in sample if e.meta["colour"] == "red"]
    assert {e.labels["hate"] for e in red} == {"hateful", "not_hateful"}


def test_text_names_the_shape_and_mismatches_are_recorded(sample: list[Example]) -> None:
    for ex in sample:
        m = ex.meta
        assert m["shape"] in SHAPES and m["text_shape"] in SHAPES
        assert PLURALS[m["text_shape"]] in ex.text
        assert m["mismatched"] == (m["shape"] != m["text_shape"])
    rate = sum(e.meta["mismatched"] for e in sample) / len(sample)
    assert 0.17 <= rate <= 0.33  # asked for 0.25


def test_no_mismatches_at_rate_zero(tmp_path: Path) -> None:
    examples = generate(60, 2, tmp_path, image_size=SIZE, mismatch_rate=0.0)
    assert not any(e.meta["mismatched"] for e in examples)


def test_texts_vary(sample: list[Example]) -> None:
    assert len({e.text for e in sample}) > 50


def _red_fraction(pixels: np.ndarray) -> float:
    r, g, b = (pixels[..., k].astype(int) for k in range(3))
    return float(((r > 150) & (g < 110) & (b < 110)).mean())


def test_images_show_what_the_meta_says(sample: list[Example]) -> None:
    brightness: dict[str, list[float]] = {"sunny": [], "gloomy": []}
    for ex in sample[:120]:
        with Image.open(ex.image) as img:  # type: ignore[arg-type]
            pixels = np.asarray(img.convert("RGB"))
        brightness[ex.meta["background"]].append(float(pixels.mean()))
        # The red "group symbol" covers a good part of the frame; blue/green shapes,
        # the sun and the rain contain no red pixels at all.
        red = _red_fraction(pixels)
        if ex.meta["colour"] == "red":
            assert red > 0.03, ex.id
        else:
            assert red < 0.01, ex.id
    assert max(brightness["gloomy"]) < min(brightness["sunny"])


def test_write_synthetic_reuses_and_regenerates(tmp_path: Path) -> None:
    manifest = write_synthetic(tmp_path, 10, 1, image_size=SIZE)
    stamp = manifest.stat().st_mtime_ns
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["n"] == 10 and params["seed"] == 1 and params["image_size"] == SIZE

    assert write_synthetic(tmp_path, 10, 1, image_size=SIZE) == manifest
    assert manifest.stat().st_mtime_ns == stamp  # same parameters: nothing rewritten

    write_synthetic(tmp_path, 6, 1, image_size=SIZE)  # other parameters: regenerated
    assert len(read_manifest(manifest)) == 6
    assert len(list((tmp_path / "images").glob("*.png"))) == 6  # stale images removed

    (tmp_path / "images" / "syn-1-00000.png").unlink()  # a damaged cache is rebuilt
    write_synthetic(tmp_path, 6, 1, image_size=SIZE)
    assert (tmp_path / "images" / "syn-1-00000.png").is_file()


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"image_size": 8}, {"mismatch_rate": 1.5}, {"mismatch_rate": -0.1}])
def test_bad_parameters(tmp_path: Path, kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"n": 2, "image_size": SIZE, "mismatch_rate": 0.1} | kwargs
    with pytest.raises(ValueError):
        generate(
            int(args["n"]),
            0,
            tmp_path,
            image_size=int(args["image_size"]),
            mismatch_rate=args["mismatch_rate"],
        )
