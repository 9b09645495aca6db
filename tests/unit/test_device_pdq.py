"""The banks' PDQ taken on the device (stream/banks/device_pdq.py) and its way through the
predictor and the pipeline, on the CPU: torch stands in for the GPU (the same tensor code), and
torchvision's CPU decoder for nvJPEG. Reference: the `pdqhash` binding of Meta's C++ code."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image

from models.device_decode import EncodedJpeg, decode_jpegs_to
from models.images import decode_for_model, jpeg_decode_size
from models.routing.route import RoutingPolicy
from modstream.records import Post, encode
from stream.banks.bank import BankEntry, BankUpdate, VerdictBanks
from stream.banks.device_pdq import DeviceHashes, DevicePdq, downsample_weights, jarosz_window
from stream.banks.hashing import pdq_hash, pdq_hash_rgb
from stream.banks.variants import query_hashes, trim_bars
from stream.media import FetchConfig, MediaFetcher
from stream.pipeline import Pipeline
from tests.reposts import captioned, photo_like
from tests.unit.loopback_media import serve_bytes
from tests.unit.test_pipeline import DictCache
from tests.unit.test_pipeline_device_jpegs import Recording

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _smooth(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    return np.asarray(coarse.resize(size, Image.Resampling.BICUBIC))


# Sizes that walk the reference's box windows (1 to 8 px) and its edge cases: tiny, strips whose
# short side makes the decimation repeat rows (8, 16: hashed on the host), odd sizes, the first
# sizes whose window grows (129, 257), and images over the host's 512 px hashing bound.
SIZES = [
    (5, 5),
    (17, 9),
    (300, 16),
    (8, 300),
    (448, 16),
    (2000, 71),  # bounded to 512 x 18: hashed on the host, bounded there
    (63, 64),
    (64, 64),
    (100, 37),
    (129, 257),
    (320, 240),
    (375, 263),
    (448, 131),
    (512, 300),
]
# Over 512 px a side the device bounds the image with its own resampler (the host: Pillow's), so
# the pixels hashed differ a little.
BEYOND_BOUND = [(1000, 700), (700, 1000), (900, 600), (2000, 520)]


@pytest.mark.parametrize("size", SIZES)
def test_device_pdq_is_the_references_hash_of_the_same_pixels(size: tuple[int, int]) -> None:
    pictures = [np.asarray(photo_like(seed, size)) for seed in range(3)] + [_smooth(seed, size) for seed in range(3)]
    hashes = DevicePdq(trim=False)([_chw(p) for p in pictures])
    for picture, found in zip(pictures, hashes, strict=True):
        assert found is not None and found.pdq_trimmed is None
        # The host's hash: pdqhash's, of the image bounded to 512 px (pdq_hash_rgb if within it).
        reference = pdq_hash(Image.fromarray(picture))
        # Sums in another order: a coefficient within rounding of the median may flip.
        assert found.pdq.distance(reference) <= 2, size
        assert abs(found.pdq.quality - reference.quality) <= 1, size


def test_an_image_over_the_hashing_bound_is_bounded_first_as_the_host_does() -> None:
    distances, unbounded = [], []
    for size in BEYOND_BOUND:
        pictures = [np.asarray(photo_like(seed, size)) for seed in range(6)]
        for picture, found in zip(pictures, DevicePdq(trim=False)([_chw(p) for p in pictures]), strict=True):
            assert found is not None
            reference = pdq_hash(Image.fromarray(picture))
            if reference.usable:
                distances.append(found.pdq.distance(reference))
                unbounded.append(pdq_hash_rgb(picture).distance(reference))
    assert np.mean(distances) <= 3 and max(distances) <= 10, distances
    assert np.mean(unbounded) > np.mean(distances)  # hashing the full size would be further off


def test_device_pdq_agrees_with_the_reference_on_real_memes() -> None:
    from trainer.importers import cm_off_meme_root

    images = cm_off_meme_root() / "images"
    if not images.is_dir():
        pytest.skip(f"the CM-Off-Meme sample is not at {images} (set MODSTREAM_CM_OFF_MEME)")
    paths = sorted(images.glob("*.png"))[:60]
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    found = DevicePdq()([_chw(p) for p in pictures])
    distances = [
        f.pdq.distance(pdq_hash(Image.fromarray(p))) for f, p in zip(found, pictures, strict=True) if f is not None
    ]
    assert len(distances) == len(pictures) and max(distances) <= 2 and np.mean(distances) < 0.2


def test_a_flat_image_and_one_under_five_pixels_hash_as_the_reference_does() -> None:
    flat = np.full((80, 120, 3), 128, np.uint8)
    tiny = np.asarray(photo_like(1, (4, 30)))
    flat_found, tiny_found = DevicePdq()([_chw(flat), _chw(tiny)])
    assert flat_found.pdq.quality == pdq_hash_rgb(flat).quality == 0 and not flat_found.pdq.usable
    reference = pdq_hash_rgb(tiny)
    assert tiny_found.pdq == reference and reference.quality == 0


def test_the_downsample_weights_are_the_references_box_filter() -> None:
    """Two passes of the reference's running-sum box filter (box1DFloat: a window of
    jarosz_window(n), clipped at the edges and divided by what it holds), then decimation."""

    def box(values: np.ndarray, window: int) -> np.ndarray:  # the C++ loop, transcribed
        half = (window + 2) // 2
        out, total, size, right, left, o = np.zeros_like(values), 0.0, 0, 0, 0, 0
        for _ in range(half - 1):
            total, size, right = total + values[right], size + 1, right + 1
        for _ in range(window - half + 1):
            total, size = total + values[right], size + 1
            out[o], right, o = total / size, right + 1, o + 1
        for _ in range(len(values) - window):
            total += values[right] - values[left]
            out[o], left, right, o = total / size, left + 1, right + 1, o + 1
        for _ in range(half - 1):
            total, size = total - values[left], size - 1
            out[o], left, o = total / size, left + 1, o + 1
        return out

    rng = np.random.default_rng(0)
    for n in (5, 64, 127, 128, 129, 300, 1000):
        values = rng.uniform(0, 255, n)
        twice = box(box(values, jarosz_window(n)), jarosz_window(n))
        picks = ((np.arange(64) + 0.5) * n / 64).astype(int)
        assert np.allclose(downsample_weights(n) @ values, twice[picks], atol=1e-9), n


def test_a_captioned_image_gets_the_hosts_hash_without_its_bar_too() -> None:
    data = captioned(photo_like(4, (480, 360)))
    image = Image.open(io.BytesIO(data)).convert("RGB")
    host = query_hashes(image)
    assert len(host) == 2  # the host found the bar
    (found,) = DevicePdq()([_chw(np.asarray(image))])
    assert found.pdq.distance(host[0]) <= 2 and found.pdq_trimmed is not None
    assert found.pdq_trimmed.distance(host[1]) <= 2
    assert found.pdq_trimmed.distance(found.pdq) > 31  # the bar matters: without it, another hash
    (plain,) = DevicePdq()([_chw(np.asarray(photo_like(4, (480, 360))))])
    assert plain.pdq_trimmed is None and trim_bars(photo_like(4, (480, 360))) is None


def test_a_hash_that_fails_on_the_device_gives_none_not_an_error(caplog) -> None:
    broken = torch.zeros(2, 40, 40, dtype=torch.uint8)  # two channels: luma cannot be taken
    assert DevicePdq()([broken, broken]) == [None, None]
    assert "PDQ on the device failed" in caplog.text


def test_jpeg_decode_size_is_the_size_the_host_decodes() -> None:
    rng = np.random.default_rng(3)
    sizes = [(1000, 700), (40000, 300), (300, 40000), (224, 224), (100, 50), (1, 1), (449, 223), (4000, 3000)]
    sizes += [(int(w), int(h)) for w, h in rng.integers(1, 2500, (40, 2))]
    for size in sizes:
        data = _jpeg(Image.new("RGB", size, (10, 20, 30)))
        for side in (224, 32):
            assert decode_for_model(data, side).size == jpeg_decode_size(size, side), (size, side)


def test_the_decoder_does_not_move_a_photos_hash_far() -> None:
    """The device decodes at full size and shrinks to the host decode's size; the host decodes
    at a DCT scale. What the banks match on must barely depend on which one ran."""
    from torchvision.io import ImageReadMode, decode_jpeg

    hook = DevicePdq()
    bodies = [_jpeg(photo_like(seed, (1000, 700))) for seed in range(12)]
    decoded = decode_jpegs_to(bodies, 224, "cpu", hook)
    assert decoded.failed == [] and sorted(decoded.found) == list(range(len(bodies)))
    distances, unshrunk = [], []
    for row, body in enumerate(bodies):
        found = decoded.found[row]
        assert isinstance(found, DeviceHashes)
        host = pdq_hash(decode_for_model(body))
        distances.append(found.pdq.distance(host))
        full = decode_jpeg(torch.frombuffer(bytearray(body), dtype=torch.uint8), mode=ImageReadMode.RGB)
        unshrunk.append(hook([full])[0].pdq.distance(host))  # type: ignore[union-attr]
    # Noisy synthetic photos are the hard case (CM-Off memes: a mean 0.8 bits); the match distance is 31.
    assert max(distances) <= 8 and np.mean(distances) <= 4, distances
    assert np.mean(unshrunk) > 1.5 * np.mean(distances)  # why the hook sees the host decode's size


def test_the_hook_sees_each_image_at_the_host_decode_size_and_failed_rows_not_at_all() -> None:
    seen: list[tuple[int, int]] = []

    def hook(images: Sequence[torch.Tensor]) -> list[object]:
        seen.extend((int(im.shape[2]), int(im.shape[1])) for im in images)
        return [f"found {im.shape[1]}" for im in images]

    good = [_jpeg(photo_like(1, (1000, 700))), _jpeg(photo_like(2, (300, 120)))]
    decoded = decode_jpegs_to([good[0], b"\xff\xd8\xff garbage", good[1]], 224, "cpu", hook)
    assert decoded.failed == [1] and set(decoded.found) == {0, 2}
    assert sorted(seen) == sorted([jpeg_decode_size((1000, 700)), jpeg_decode_size((300, 120))])


def _Recording() -> Recording:
    """A tiny real predictor (32 px input) with the device PDQ as its image hook."""
    return Recording(image_hook=DevicePdq())


def test_a_jpeg_the_device_refuses_is_hashed_on_its_host_fallback(monkeypatch) -> None:
    """Cloaking: a JPEG crafted to fail nvJPEG while libjpeg decodes it must not slip past the
    banks' PDQ. The device refuses it here; the host decodes it and the hook still hashes it."""
    import models.device_decode as device_decode

    def refuse(encoded, device):  # type: ignore[no-untyped-def]
        raise RuntimeError("nvjpeg: unsupported marker")

    monkeypatch.setattr(device_decode, "_decode", refuse)
    data = _jpeg(photo_like(7, (640, 480)))
    (prediction,) = _Recording().predictor.predict(["caption"], [EncodedJpeg(data)])
    found = prediction.image_found
    assert isinstance(found, DeviceHashes) and prediction.image_error is None
    host = pdq_hash(decode_for_model(data, 32))  # the tiny model's side: the host decode's size
    assert found.pdq.distance(host) <= 2


# --- the pipeline: banks on, JPEGs decoded on the device -----------------------------------------

CONFIG = FetchConfig(allow_loopback=True, pdq=True, max_side=64, min_side=32)  # the tiny model's 32 px
BANKED = photo_like(11, (640, 480))
REPOST = _jpeg(BANKED, 60)  # the banked picture re-encoded: other bytes, a near PDQ
OTHER = _jpeg(photo_like(12, (640, 480)))
BENIGN = photo_like(13, (640, 480))


def _bank_entry(entry_id: str, bank: str, image: Image.Image) -> BankEntry:
    pdq = pdq_hash(decode_for_model(_jpeg(image, 95), 32))  # hashed as the console would, another encode
    verdicts = {"hate": 1, "sarcasm": 0} if bank == "violating" else {"hate": 0, "sarcasm": 0}
    return BankEntry(entry_id, bank, "review", None, pdq.hex, pdq.quality, verdicts, "d-" + entry_id, "alice")


@pytest_asyncio.fixture
async def base() -> AsyncIterator[str]:
    routes = {
        "/repost.jpg": (REPOST, "image/jpeg"),
        "/other.jpg": (OTHER, "image/jpeg"),
        "/benign.jpg": (_jpeg(BENIGN, 70), "image/jpeg"),
        "/repost.png": (_png(BANKED), "image/png"),
    }
    async with serve_bytes(routes) as url:
        yield url


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _banks() -> VerdictBanks:
    banks = VerdictBanks()
    banks.apply(BankUpdate.add(_bank_entry("v1", "violating", BANKED)))
    banks.apply(BankUpdate.add(_bank_entry("b1", "benign", BENIGN)))
    return banks


async def _run(
    posts: list[Post], cache: DictCache | None = None, banks: VerdictBanks | None = None, model: Any = None
) -> tuple[list[Any], Recording]:
    model = model or _Recording()
    banks = banks or _banks()
    async with MediaFetcher(CONFIG) as fetcher:
        card_of = lambda v: model.card  # noqa: E731
        pipeline = Pipeline(model, fetcher, card_of, RoutingPolicy(), cache, banks=banks, device_jpegs=True)
        outcomes = await pipeline.process([encode(p) for p in posts])
    return outcomes, model


@pytest.mark.asyncio
async def test_a_repost_decoded_on_the_device_gets_the_banked_verdict(base) -> None:
    posts = [
        Post("r", "look at this", (f"{base}/repost.jpg",)),
        Post("o", "look at this", (f"{base}/other.jpg",)),
        Post("b", "look at this", (f"{base}/benign.jpg",)),
        Post("p", "look at this", (f"{base}/repost.png",)),
    ]
    (repost, other, benign, png), model = await _run(posts)
    assert sum(isinstance(i, EncodedJpeg) for i in model.images) == 3  # every JPEG went undecoded
    label = repost.label
    assert label.route == "bank_match" and label.bank["entry_id"] == "v1" and label.bank["match"] == "pdq"
    assert label.labels["hate"]["source"] == "bank" and label.itm_match is None and repost.review is None
    assert label.media.pdq is not None and label.media.pdq_quality >= 50  # the device's hash, on the Label
    assert other.label.route != "bank_match" and other.label.bank is None and other.label.media.pdq
    assert benign.label.bank["bank"] == "benign" and benign.label.route == "auto"
    assert png.label.route == "bank_match"  # the host path, for comparison


@pytest.mark.asyncio
async def test_a_cached_repost_is_matched_by_the_hash_its_first_decode_took(base) -> None:
    """The first post runs the model and caches its result with the device's PDQ; a repost is
    labelled from the cache without any decode and still meets the bank (which may have grown)."""
    cache = DictCache()
    (first,), _ = await _run([Post("a", "caption", (f"{base}/repost.jpg",))], cache)
    assert first.label.route == "bank_match"
    (again,), model = await _run([Post("b", "caption", (f"{base}/repost.jpg",))], cache)
    assert model.images == []  # nothing decoded, nothing scored
    assert again.label.route == "bank_match" and again.label.bank["entry_id"] == "v1"


@pytest.mark.asyncio
async def test_a_cache_entry_without_the_device_hash_does_not_let_a_repost_skip_the_banks(base) -> None:
    """A dedupe entry written by a worker without banks (or under another signature, or with its
    facts deleted by whoever can write to Redis) carries no PDQ: the repost is hashed on the host."""
    from stream import metrics
    from stream.media_facts import FACTS_KEY

    cache = DictCache()
    await _run([Post("a", "caption", (f"{base}/repost.jpg",))], cache)
    (key,) = cache.data
    del cache.data[key][FACTS_KEY]  # as a worker with --no-banks would have written it
    on_host = metrics.DEVICE_PDQ_ON_HOST._value.get()
    (again,), model = await _run([Post("b", "caption", (f"{base}/repost.jpg",))], cache)
    assert model.images == []  # the model's part came from the cache: nothing decoded on the device
    assert again.label.route == "bank_match" and again.label.bank["entry_id"] == "v1"
    assert metrics.DEVICE_PDQ_ON_HOST._value.get() == on_host + 1 and again.label.media.pdq is not None


@pytest.mark.asyncio
async def test_a_device_hash_that_fails_is_taken_on_the_host_and_cached_with_the_label(base, monkeypatch) -> None:
    from stream import metrics
    from stream.media_facts import FACTS_KEY

    model = _Recording()
    monkeypatch.setattr(model.predictor, "image_hook", lambda images: [None] * len(images))  # out of memory, say
    cache = DictCache()
    on_host = metrics.DEVICE_PDQ_ON_HOST._value.get()
    (first,), _ = await _run([Post("a", "caption", (f"{base}/repost.jpg",))], cache, model=model)
    assert isinstance(model.images[0], EncodedJpeg)  # decoded on the device, hashed on the host
    assert first.label.route == "bank_match" and metrics.DEVICE_PDQ_ON_HOST._value.get() == on_host + 1
    (entry,) = cache.data.values()
    assert entry[FACTS_KEY]["pdq"]["hex"] == first.label.media.pdq  # a repost needs no second try


@pytest.mark.asyncio
async def test_the_device_path_picks_the_entry_the_host_path_picks(base) -> None:
    """stream.bank_stage.look_up's rule on both paths: an exact match of the bytes is taken over
    a PDQ match of the whole image (here a violating entry at the device's own hash)."""
    import hashlib

    from tests.unit.test_pipeline_device_jpegs import CONFIG as HOST_ONLY

    (probe,), _ = await _run([Post("p", "caption", (f"{base}/other.jpg",))], banks=VerdictBanks())
    device_pdq = probe.label.media.pdq  # the hash the device path takes of these bytes
    hateful = {"hate": 1, "sarcasm": 0}
    violating = BankEntry("v2", "violating", "review", None, device_pdq, 90, hateful, "d-v2", "al")
    sha = hashlib.sha256(OTHER).hexdigest()
    benign = BankEntry("b2", "benign", "review", sha, None, None, {"hate": 0, "sarcasm": 0}, "d-b2", "bob")
    for entries, expected in (([violating], "v2"), ([violating, benign], "b2")):
        banks = VerdictBanks()
        for entry in entries:
            banks.apply(BankUpdate.add(entry))
        (device,), _ = await _run([Post("d", "caption", (f"{base}/other.jpg",))], banks=banks)
        model = Recording()
        async with MediaFetcher(replace(HOST_ONLY, pdq=True)) as fetcher:
            pipeline = Pipeline(model, fetcher, lambda v, m=model: m.card, RoutingPolicy(), None, banks=banks)
            (host,) = await pipeline.process([encode(Post("h", "caption", (f"{base}/other.jpg",)))])
        assert device.label.bank["entry_id"] == host.label.bank["entry_id"] == expected


def test_a_trimmed_picture_under_64_rows_is_hashed_on_the_host() -> None:
    """A caption bar can leave a strip whose PDQ the device would take in its noisy regime (its
    decimation repeats rows): that strip is hashed on the host, as the host path hashes it."""
    picture = np.asarray(photo_like(5, (448, 16)))
    framed = np.full((64, 448, 3), 255, np.uint8)  # 64 rows: the whole image is hashed on the device
    framed[24:40] = picture  # white bars of 24 rows above and below, 16 rows of picture
    host = query_hashes(Image.fromarray(framed))
    assert len(host) == 2  # the host trims them
    (found,) = DevicePdq()([_chw(framed)])
    # Taken on the device, this strip's hash was 6 bits off the host's.
    assert found is not None and found.pdq_trimmed == host[1]


def test_a_hook_that_raises_or_miscounts_costs_its_results_not_the_batch() -> None:
    from models.device_decode import call_hook

    bodies = [_jpeg(photo_like(seed, (320, 240))) for seed in range(3)]

    def raising(images: Sequence[torch.Tensor]) -> list[object]:
        raise ValueError("a bug in a hook")

    for hook in (raising, lambda images: ["one answer"]):
        decoded = decode_jpegs_to(bodies, 224, "cpu", hook)
        assert decoded.failed == [] and decoded.found == {0: None, 1: None, 2: None}
    assert call_hook(lambda images: list(range(len(images))), [torch.zeros(1)] * 2) == [0, 1]


def test_a_worker_without_the_pdq_wheel_is_told_at_start(monkeypatch) -> None:
    import sys

    from stream.banks import pdq_native
    from stream.banks.hashing import check_host_pdq

    check_host_pdq()  # here it is installed
    monkeypatch.setattr(pdq_native, "available", lambda: False)
    monkeypatch.setitem(sys.modules, "pdqhash", None)  # import pdqhash -> ImportError
    with pytest.raises(RuntimeError, match="pdqhash"):
        check_host_pdq()
