"""Text inside images: real Tesseract on rendered text, the worker's cache, failure isolation,
the deployment switch, and the pair encoding that carries the text to the model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from models.card import ModelCard
from models.inference import Predictor
from models.ocr import (
    OCR_MAX_SIDE,
    OCR_MIN_SIDE,
    OcrError,
    OcrUnavailable,
    TesseractOcr,
    clean_text,
    find_tessdata,
    ocr_ready_image,
)
from models.preprocess import PostText, TextPreprocessor
from stream.ocr import OCR_IMAGES, ImageTextReader, ocr_enabled, reader_for
from tests.tiny import tiny_config, tiny_model

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"  # fonts-dejavu-core (deploy/test-tools.sh)


def render(lines: list[str], size: tuple[int, int] = (640, 200)) -> Image.Image:
    image = Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, 36)
    for i, line in enumerate(lines):
        draw.text((20, 20 + 60 * i), line, fill=(10, 10, 10), font=font)
    return image


# --- the engine, for real -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tesseract() -> TesseractOcr:
    return TesseractOcr("eng+hin")


def test_tesseract_reads_rendered_words(tesseract: TesseractOcr) -> None:
    text = tesseract(render(["STOP THE HATE", "moderation works"]))
    words = set(text.lower().split())
    assert {"stop", "the", "hate", "moderation", "works"} <= words, text


def test_a_small_meme_sized_image_is_read_after_upscaling(tesseract: TesseractOcr) -> None:
    small = render(["SARCASM DETECTED"]).resize((224, 70), Image.Resampling.BILINEAR)
    assert {"sarcasm", "detected"} <= set(tesseract(small).lower().split())


def test_an_image_without_text_reads_as_empty(tesseract: TesseractOcr) -> None:
    assert tesseract(Image.new("RGB", (300, 300), (128, 30, 200))) == ""


def test_engines_are_per_thread(tesseract: TesseractOcr) -> None:
    images = [render([f"WORD {w}"]) for w in ("ALPHA", "BRAVO", "CHARLIE", "DELTA")]
    out: dict[int, str] = {}

    def read(i: int) -> None:
        out[i] = tesseract(images[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, word in enumerate(("ALPHA", "BRAVO", "CHARLIE", "DELTA")):
        assert word in out[i], out


def test_missing_language_models_are_a_clear_setup_error(tmp_path: Path) -> None:
    with pytest.raises(OcrUnavailable, match="tesseract-ocr-hin"):
        find_tessdata("eng+hin", tmp_path)
    with pytest.raises(OcrUnavailable, match="not found"):
        TesseractOcr("eng", tessdata=tmp_path)


def test_identity_names_the_engine_and_languages(tesseract: TesseractOcr) -> None:
    assert tesseract.identity.startswith("tesseract-5") and "eng+hin" in tesseract.identity


# --- pure helpers -----------------------------------------------------------------------------


def test_clean_text_drops_noise_lines_and_collapses_spaces() -> None:
    assert clean_text("  STOP   the\n|\n~ ~\n\nhate \n") == "STOP the hate"


@pytest.mark.parametrize(("size", "long_side"), [((225, 100), OCR_MIN_SIDE), ((4000, 1000), OCR_MAX_SIDE)])
def test_ocr_ready_image_bounds_the_long_side(size: tuple[int, int], long_side: int) -> None:
    out = ocr_ready_image(Image.new("RGB", size))
    assert out.mode == "L" and max(out.size) == long_side
    assert abs(out.width / out.height - size[0] / size[1]) < 0.01


# --- the worker's reader: cache and failures ------------------------------------------------


class CountingEngine:
    identity = "fake-1"

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, image: Image.Image) -> str:
        self.calls += 1
        if self.fail:
            raise OcrError("cannot read")
        return f"text {self.calls}"


def test_reader_caches_by_content_hash_not_by_pixels() -> None:
    engine = CountingEngine()
    reader = ImageTextReader(engine, cache_size=8)
    image = Image.new("RGB", (8, 8))
    assert reader.read(image, "h1") == "text 1"
    assert reader.read(image, "h1") == "text 1"  # hit: the engine is not called again
    assert engine.calls == 1
    assert reader.read(image, "h2") == "text 2"  # same pixels, other bytes: read again
    assert reader.read(image, None) == "text 3"  # no hash: never cached
    assert reader.read(image, None) == "text 4"


def test_reader_cache_is_bounded_lru() -> None:
    engine = CountingEngine()
    reader = ImageTextReader(engine, cache_size=2)
    image = Image.new("RGB", (8, 8))
    reader.read(image, "a")
    reader.read(image, "b")
    reader.read(image, "a")  # a is now the most recent
    reader.read(image, "c")  # evicts b
    calls = engine.calls
    reader.read(image, "a")
    assert engine.calls == calls
    reader.read(image, "b")
    assert engine.calls == calls + 1


def test_reader_failure_is_none_and_counted() -> None:
    failed = OCR_IMAGES.labels("failed")
    before = failed._value.get()
    reader = ImageTextReader(CountingEngine(fail=True))
    assert reader.read(Image.new("RGB", (8, 8)), "h") is None
    assert failed._value.get() == before + 1
    assert reader.read(Image.new("RGB", (8, 8)), "h") is None  # a failure is not cached as text


def test_deployment_switch() -> None:
    plain, with_ocr = tiny_config(), tiny_config(ocr_segment=True)
    assert not ocr_enabled("auto", plain) and ocr_enabled("auto", with_ocr)
    assert ocr_enabled("on", plain) and not ocr_enabled("off", plain)
    assert reader_for("auto", plain) is None
    with pytest.raises(OcrUnavailable, match="cannot be served with OCR off"):
        ocr_enabled("off", with_ocr)
    with pytest.raises(ValueError, match="auto, on, off"):
        ocr_enabled("sometimes", plain)


def test_a_model_trained_with_ocr_fails_at_start_without_tesseract(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))
    monkeypatch.setattr("models.ocr.TESSDATA_DIRS", ())
    with pytest.raises(OcrUnavailable, match=r"trained with OCR text.*tesseract-ocr-eng"):
        reader_for("auto", tiny_config(ocr_segment=True))


def test_reader_for_builds_a_working_reader() -> None:
    reader = reader_for("on", tiny_config())
    assert reader is not None
    assert "HELLO" in (reader.read(render(["HELLO THERE"]), "x") or "")


def test_model_config_refuses_empty_languages() -> None:
    with pytest.raises(ValueError, match="ocr_languages"):
        tiny_config(ocr_languages="eng+")


# --- the pair encoding reaches the model ----------------------------------------------------


def test_pair_encoding_puts_the_ocr_text_in_a_second_segment() -> None:
    _, tokenizer = tiny_model()
    pre = TextPreprocessor(tokenizer, 32, ocr_segment=True)
    ids, mask = pre([PostText("caption here", "words in image"), "no image"])
    sep = tokenizer.sep_token_id
    first = ids[0][mask[0].bool()].tolist()
    assert first.count(sep) == 2  # [CLS] caption [SEP] ocr [SEP]
    second = first[first.index(sep) + 1 : -1]
    assert tokenizer.decode(second) == "words in image"
    encoded = tokenizer("caption here", "words in image")
    assert encoded["token_type_ids"].count(1) == len(second) + 1  # the tokenizer marks it as segment B
    plain = ids[1][mask[1].bool()].tolist()
    assert plain.count(sep) == 2 and plain[-2] == sep  # a post without OCR text: an empty second segment


def test_longest_first_truncation_keeps_both_segments() -> None:
    _, tokenizer = tiny_model()
    pre = TextPreprocessor(tokenizer, 16, ocr_segment=True)
    ids, _ = pre([PostText("caption " * 40, "ocr " * 40)])
    row = ids[0].tolist()
    assert len(row) == 16 and row.count(tokenizer.sep_token_id) == 2
    caption_id = tokenizer.convert_tokens_to_ids("caption")
    ocr_id = tokenizer.convert_tokens_to_ids("ocr")
    assert abs(row.count(caption_id) - row.count(ocr_id)) <= 1


def test_without_the_segment_the_ocr_text_is_ignored() -> None:
    _, tokenizer = tiny_model()
    pre = TextPreprocessor(tokenizer, 32)
    with_ocr, _ = pre([PostText("caption here", "words in image")])
    plain, _ = pre(["caption here"])
    assert torch.equal(with_ocr, plain)


def _predictor(ocr_segment: bool) -> Predictor:
    config = tiny_config(ocr_segment=ocr_segment)
    model, tokenizer = tiny_model(config)
    return Predictor(model, tokenizer, ModelCard(config=config, version="v1"))


def test_the_ocr_text_changes_the_prediction_only_of_a_model_trained_with_it() -> None:
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    texts = [PostText("same caption", "kill them all"), PostText("same caption", "have a nice day")]
    for ocr_segment in (True, False):
        a, b = _predictor(ocr_segment).predict(texts, [image, image])
        diff = abs(a.tasks["hate"].score - b.tasks["hate"].score) + abs((a.itm_match or 0) - (b.itm_match or 0))
        assert (diff > 1e-6) == ocr_segment, (ocr_segment, diff)


def test_the_card_says_whether_the_model_expects_the_ocr_segment() -> None:
    import json

    card = ModelCard(config=tiny_config(ocr_segment=True, ocr_languages="eng"), version="v1")
    data = json.loads(card.to_json())
    assert data["config"]["ocr_segment"] is True
    loaded = ModelCard.from_dict(data).config
    assert loaded.ocr_segment and loaded.ocr_languages == "eng"
    for key in ("ocr_segment", "ocr_languages"):  # a card written before OCR existed
        del data["config"][key]
    assert ModelCard.from_dict(data).config.ocr_segment is False
