"""The pipeline with device decode on (Pipeline.device_jpegs, the worker's --device-decode): JPEGs
go to the classifier undecoded and are decoded with their batch; everything else decodes on the
host as before. Real MediaFetchers on a loopback server, a real tiny Predictor on the CPU (its
device decode runs torchvision's CPU decoder, the same calls as nvJPEG), a dict for Redis."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image

from models.card import ModelCard
from models.device_decode import EncodedJpeg
from models.inference import Prediction, Predictor
from models.routing.route import RoutingPolicy
from modstream.records import Post, encode
from stream import metrics
from stream.media import FetchConfig, MediaFetcher
from stream.pipeline import MEDIA_ERROR_KEY, Pipeline
from tests.unit.loopback_media import count_decodes, serve_bytes
from tests.unit.test_pipeline import DictCache

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CONFIG = FetchConfig(allow_loopback=True, pdq=False, max_side=64, min_side=32)  # the tiny model's 32 px


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)


JPEG = _encoded(_photo(1), "JPEG")
PNG = _encoded(_photo(2), "PNG")
CMYK = _encoded(_photo(3).convert("CMYK"), "JPEG")
BROKEN = JPEG[:700]  # header intact, scan cut short


class Recording:
    """A tiny real model behind the pipeline's Classifier protocol, recording what it was given;
    `image_hook`: the predictor's (the worker's device PDQ, tests/unit/test_device_pdq.py)."""

    def __init__(self, image_hook: Any = None) -> None:
        from tests.tiny import tiny_model

        model, tok = tiny_model()
        self.card = ModelCard(config=model.config, version="v1")
        self.predictor = Predictor(model, tok, self.card, "cpu", image_hook=image_hook)
        self.images: list[Any] = []

    @property
    def version(self) -> str:
        return "v1"

    async def predict(self, texts: Sequence[str], images: Sequence[Any]) -> list[Prediction | BaseException]:
        self.images += list(images)
        return list(self.predictor.predict(texts, images))


@pytest_asyncio.fixture
async def base() -> AsyncIterator[str]:
    routes = {
        "/a.jpg": (JPEG, "image/jpeg"),
        "/b.png": (PNG, "image/png"),
        "/c.jpg": (CMYK, "image/jpeg"),
        "/broken.jpg": (BROKEN, "image/jpeg"),
    }
    async with serve_bytes(routes) as url:
        yield url


async def _run(posts: list[Post], *, device_jpegs: bool, cache: DictCache | None = None, model=None):  # type: ignore[no-untyped-def]
    model = model or Recording()
    async with MediaFetcher(CONFIG) as fetcher:
        pipeline = Pipeline(model, fetcher, lambda v: model.card, RoutingPolicy(), cache, device_jpegs=device_jpegs)
        outcomes = await pipeline.process([encode(p) for p in posts])
    return outcomes, model


@pytest.mark.asyncio
async def test_a_jpeg_reaches_the_classifier_undecoded_and_other_images_decoded_on_the_host(base, monkeypatch) -> None:
    decodes = count_decodes(monkeypatch)
    posts = [Post("j", "1", (f"{base}/a.jpg",)), Post("p", "2", (f"{base}/b.png",)), Post("c", "3", (f"{base}/c.jpg",))]
    outcomes, model = await _run(posts, device_jpegs=True)
    assert sorted(type(i).__name__ for i in model.images) == ["EncodedJpeg", "Image", "Image"]
    assert len(decodes) == 2  # the PNG and the CMYK JPEG, never the plain JPEG
    encoded = next(i for i in model.images if isinstance(i, EncodedJpeg))
    assert encoded.data == JPEG
    for outcome in outcomes:
        assert outcome.label is not None and outcome.label.media.status == "ok"
        assert outcome.label.itm_match is not None  # every image was seen by the model


@pytest.mark.asyncio
async def test_off_every_image_is_decoded_on_the_host_with_the_labels_it_gives_on(base, monkeypatch) -> None:
    decodes = count_decodes(monkeypatch)
    post = Post("j", "one", (f"{base}/a.jpg",))
    (off,), model = await _run([post], device_jpegs=False)
    assert len(decodes) == 1 and all(isinstance(i, Image.Image) for i in model.images)
    (on,), model = await _run([post], device_jpegs=True)
    assert isinstance(model.images[0], EncodedJpeg) and on.label.itm_match is not None
    for task, value in on.label.labels.items():  # the tolerance; the pixels: tests/unit/test_device_decode.py
        assert value["score"] == pytest.approx(off.label.labels[task]["score"], abs=0.05)


@pytest.mark.asyncio
async def test_a_jpeg_neither_gpu_nor_host_decodes_is_labelled_text_only_with_its_error_and_so_is_its_repost(
    base,
) -> None:
    cache = DictCache()
    failed = metrics.DEVICE_DECODED.labels("failed")._value.get()
    (first,), model = await _run([Post("b1", "caption", (f"{base}/broken.jpg",))], device_jpegs=True, cache=cache)
    assert isinstance(model.images[0], EncodedJpeg)
    label = first.label
    assert label is not None and label.media.status in {"truncated", "corrupt"} and label.media.reason
    assert label.itm_match is None and metrics.DEVICE_DECODED.labels("failed")._value.get() == failed + 1
    (again,), model = await _run([Post("b2", "caption", (f"{base}/broken.jpg",))], device_jpegs=True, cache=cache)
    assert model.images == [] and again.label.dedupe_hit  # from the cache, which says why too
    assert again.label.media.status == label.media.status and again.label.itm_match is None


@pytest.mark.asyncio
async def test_a_forged_media_error_in_the_cache_does_not_change_a_label(base) -> None:
    cache = DictCache()
    await _run([Post("a1", "caption", (f"{base}/a.jpg",))], device_jpegs=True, cache=cache)
    (key,) = cache.data
    for forged in ({"status": "ok'; DROP", "reason": "x"}, {"status": "corrupt", "reason": ["nested"]}, "corrupt"):
        cache.data[key][MEDIA_ERROR_KEY] = forged
        (again,), _ = await _run([Post("a2", "caption", (f"{base}/a.jpg",))], device_jpegs=True, cache=cache)
        assert again.label.dedupe_hit and again.label.media.status == "ok" and again.label.media.reason is None


@pytest.mark.parametrize(
    ("mode", "devices", "banks", "ocr", "expected"),
    [
        ("auto", "cuda:0", False, False, True),  # one GPU, no host stage needs the pixels
        ("auto", "cuda:0,cuda:1", False, False, False),  # one nvJPEG decoder per process: one device
        ("auto", "cpu", False, False, False),  # a CPU worker decodes on its decode threads
        ("auto", "cuda:0", True, False, True),  # the banks' PDQ is taken on the device (the default)
        ("auto", "cuda:0", True, True, False),  # OCR reads host pixels
        ("auto", "cuda:0", False, True, False),
        ("on", "cpu", False, False, True),
        ("on", "cpu", True, False, True),
        ("on", "cuda:0", True, True, False),  # refused, with a warning
        ("on", "cuda:0,cuda:1", False, False, False),
        ("off", "cuda:0", False, False, False),
    ],
)
def test_the_worker_hands_jpegs_to_the_device_only_where_no_host_stage_needs_the_pixels(
    tmp_path, monkeypatch, mode, devices, banks, ocr, expected
) -> None:
    import stream.worker
    from stream.worker import Resources, WorkerSettings

    monkeypatch.setattr(stream.worker, "self_test", lambda device: None)  # this machine has no GPU to test
    resources = Resources(
        WorkerSettings(registry=tmp_path, redis_url=None, devices=devices, banks=banks, device_decode=mode)
    )
    if ocr:
        resources.fetcher = MediaFetcher(CONFIG, ocr=object())  # type: ignore[arg-type]
    assert resources._device_jpegs() is expected
    assert resources._device_jpegs(needs_ocr=True) is False  # a model that reads image text swapping in


def test_a_device_whose_decode_fails_its_self_test_leaves_jpegs_on_the_host(tmp_path, monkeypatch) -> None:
    import stream.worker
    from models.device_decode import self_test
    from stream.worker import Resources, WorkerSettings

    assert self_test("cpu") is None  # the real test passes where the decoder works
    monkeypatch.setattr(stream.worker, "self_test", lambda device: "RuntimeError: no nvJPEG in this build")
    for mode in ("auto", "on"):
        settings = WorkerSettings(registry=tmp_path, redis_url=None, devices="cuda:0", banks=False, device_decode=mode)
        assert Resources(settings)._device_jpegs() is False


def test_the_self_test_reports_a_decoder_that_fails_or_disagrees(monkeypatch) -> None:
    import models.device_decode as device_decode

    def broken(encoded, device):  # type: ignore[no-untyped-def]
        raise RuntimeError("nvjpeg unavailable")

    monkeypatch.setattr(device_decode, "_decode", broken)
    assert "failed" in (device_decode.self_test("cpu") or "")
    monkeypatch.setattr(device_decode, "_decode", lambda enc, dev: [torch.zeros(3, 120, 160, dtype=torch.uint8)])
    assert "grey levels" in (device_decode.self_test("cpu") or "")


@pytest.mark.asyncio
async def test_an_image_the_host_could_not_decode_is_not_called_ok_by_a_device_worker_hitting_the_cache(
    base,
) -> None:
    """A mixed fleet: a host-decoding worker labels a broken JPEG first and caches its result; a
    device-decoding worker serving the repost from the cache never decodes the bytes itself."""
    cache = DictCache()
    (host,), _ = await _run([Post("h1", "caption", (f"{base}/broken.jpg",))], device_jpegs=False, cache=cache)
    assert host.label.media.status in {"truncated", "corrupt"}
    (device,), model = await _run([Post("d1", "caption", (f"{base}/broken.jpg",))], device_jpegs=True, cache=cache)
    assert model.images == [] and device.label.dedupe_hit
    assert device.label.media.status == host.label.media.status and device.label.itm_match is None


def test_the_worker_command_takes_device_decode_into_its_settings(monkeypatch) -> None:
    import stream.worker
    from modstream.cli import build_parser
    from stream.commands import cmd_worker

    seen = []
    monkeypatch.setattr(stream.worker, "run_worker", lambda settings, **_: seen.append(settings))
    monkeypatch.setattr("sys.argv", ["modstream"])  # cmd_worker trims it for faust
    parser = build_parser()
    assert parser.parse_args(["worker"]).device_decode == "auto"
    assert cmd_worker(parser.parse_args(["worker", "--device-decode", "off"])) == 0
    assert seen[0].device_decode == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--device-decode", "gpu"])
