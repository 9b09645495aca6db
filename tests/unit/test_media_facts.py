"""A repost labelled from the dedupe cache is not decoded, in any worker process: the cache entry
carries the decode's facts (stream/media_facts.py). Real MediaFetchers (one per simulated worker
process, each with its own decode memo) on a loopback server, the real verdict banks, a dict for
Redis and a fake model."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from models.routing.route import RoutingPolicy
from modstream.records import Post, encode
from stream import metrics
from stream.banks.bank import BankUpdate, VerdictBanks
from stream.banks.hashing import PdqHash
from stream.media import FetchConfig, MediaFetcher
from stream.media_facts import FACTS_KEY, MAX_OCR_CHARS, MediaFacts
from stream.pipeline import Pipeline
from tests.unit.loopback_media import count_decodes, serve_bytes
from tests.unit.test_bank_stage import _entry
from tests.unit.test_pipeline import CARD, DictCache, FakeClassifier

CONFIG = FetchConfig(allow_loopback=True, pdq=True, max_side=448)


def _photo() -> bytes:
    rng = np.random.default_rng(7)
    coarse = Image.fromarray(rng.integers(0, 256, (14, 20, 3), dtype=np.uint8)).resize((400, 280), Image.BICUBIC)
    buf = io.BytesIO()
    coarse.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest_asyncio.fixture
async def photo_url() -> AsyncIterator[str]:
    async with serve_bytes({"/photo.jpg": (_photo(), "image/jpeg")}) as base:
        yield f"{base}/photo.jpg"


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return count_decodes(monkeypatch)


async def _label(cache: DictCache, banks: VerdictBanks, post: Post, config: FetchConfig = CONFIG):
    """One post through a fresh worker process's pipeline (a fetcher of its own: an empty memo)."""
    classifier = FakeClassifier()
    async with MediaFetcher(config) as fetcher:
        pipeline = Pipeline(classifier, fetcher, lambda v: CARD, RoutingPolicy(), cache, banks=banks)
        (out,) = await pipeline.process([encode(post)])
    return out, classifier


def _skipped() -> float:
    return metrics.DECODE_SKIPPED._value.get()


@pytest.mark.asyncio
async def test_a_repost_in_another_worker_is_labelled_from_the_cache_without_decoding(photo_url, decodes) -> None:
    cache, banks = DictCache(), VerdictBanks()
    first, model = await _label(cache, banks, Post("p1", "look at this", (photo_url,)))
    assert first.label.media.status == "ok" and model.calls == [["look at this"]] and len(decodes) == 1
    (entry,) = cache.data.values()
    assert entry[FACTS_KEY]["pdq"]["hex"] == first.label.media.pdq  # the facts ride with the label

    skipped = _skipped()
    again, model = await _label(cache, banks, Post("p2", "look at this", (photo_url,)))
    assert len(decodes) == 1 and model.calls == [] and _skipped() == skipped + 1
    label = again.label
    assert label.dedupe_hit and label.media.status == "ok" and label.route == first.label.route
    assert (label.media.pdq, label.media.pdq_quality) == (first.label.media.pdq, first.label.media.pdq_quality)
    assert label.media.content_hash == first.label.media.content_hash and label.labels == first.label.labels


@pytest.mark.asyncio
async def test_a_picture_banked_after_its_label_was_cached_is_still_matched_by_pdq_without_decoding(
    photo_url, decodes
) -> None:
    cache, banks = DictCache(), VerdictBanks()
    first, _ = await _label(cache, banks, Post("p1", "look at this", (photo_url,)))
    # A reviewer banks a near copy of the picture (its PDQ, not these bytes) after the label was cached.
    banks.apply(BankUpdate.add(_entry("e1", "violating", pdq=first.label.media.pdq)))
    again, model = await _label(cache, banks, Post("p2", "look at this", (photo_url,)))
    assert len(decodes) == 1 and model.calls == []
    assert again.label.route == "bank_match" and again.label.bank["match"] == "pdq"
    assert again.label.bank["entry_id"] == "e1" and again.review is None


@pytest.mark.asyncio
async def test_a_repost_with_other_text_or_under_another_decode_signature_is_decoded(photo_url, decodes) -> None:
    cache, banks = DictCache(), VerdictBanks()
    await _label(cache, banks, Post("p1", "look at this", (photo_url,)))
    recaptioned, model = await _label(cache, banks, Post("p2", "another caption", (photo_url,)))
    assert len(decodes) == 2 and model.calls == [["another caption"]]  # the model needs the pixels
    assert not recaptioned.label.dedupe_hit
    no_pdq = FetchConfig(allow_loopback=True, pdq=False, max_side=448)
    other, model = await _label(cache, banks, Post("p3", "look at this", (photo_url,)), no_pdq)
    assert len(decodes) == 3 and model.calls == []  # decoded (facts of another signature), label still cached
    assert other.label.dedupe_hit and other.label.media.pdq is None


@pytest.mark.asyncio
async def test_forged_facts_in_the_cache_are_not_used(photo_url, decodes) -> None:
    cache, banks = DictCache(), VerdictBanks()
    first, _ = await _label(cache, banks, Post("p1", "look at this", (photo_url,)))
    (key,) = cache.data
    cache.data[key][FACTS_KEY]["pdq"] = {"hex": "zz" * 32, "quality": 100}
    again, _ = await _label(cache, banks, Post("p2", "look at this", (photo_url,)))
    assert len(decodes) == 2 and again.label.media.pdq == first.label.media.pdq  # decoded, its own hash


@pytest.mark.asyncio
async def test_posts_of_one_batch_with_the_same_text_and_bytes_decode_once(photo_url, decodes) -> None:
    cache, banks, model = DictCache(), VerdictBanks(), FakeClassifier()
    async with MediaFetcher(CONFIG) as fetcher:
        pipeline = Pipeline(model, fetcher, lambda v: CARD, RoutingPolicy(), cache, banks=banks)
        outs = await pipeline.process([encode(Post(f"p{i}", "same", (photo_url,))) for i in range(5)])
    assert all(o.label is not None and o.label.media.pdq for o in outs)
    assert len(decodes) == 1 and model.calls == [["same"]]


SIG = "side=448;pdq=1;ocr=-"
GOOD = {"signature": SIG, "pdq": {"hex": "ab" * 32, "quality": 90}, "pdq_trimmed": None, "ocr_text": "hi"}


def test_facts_round_trip() -> None:
    facts = MediaFacts(SIG, PdqHash.from_hex("ab" * 32, 90), None, "hi")
    assert MediaFacts.from_cached({FACTS_KEY: facts.to_json()}, SIG) == facts
    assert MediaFacts.from_cached({FACTS_KEY: GOOD}, SIG) == facts


@pytest.mark.parametrize(
    "facts",
    [
        None,
        "not a dict",
        [GOOD],
        {**GOOD, "signature": "side=224;pdq=1;ocr=-"},
        {**GOOD, "signature": None},
        {**GOOD, "pdq": {"hex": "AB" * 32, "quality": 90}},  # ThreatExchange hex is lowercase
        {**GOOD, "pdq": {"hex": "ab" * 31, "quality": 90}},
        {**GOOD, "pdq": {"hex": "ab" * 32, "quality": 101}},
        {**GOOD, "pdq": {"hex": "ab" * 32, "quality": "90"}},
        {**GOOD, "pdq": {"hex": "ab" * 32}},
        {**GOOD, "pdq": "ab" * 32},
        {**GOOD, "pdq_trimmed": {"hex": {"nested": ["deep"]}, "quality": 90}},
        {**GOOD, "ocr_text": 42},
        {**GOOD, "ocr_text": "x" * (MAX_OCR_CHARS + 1)},
    ],
)
def test_malformed_or_foreign_facts_are_refused(facts: Any) -> None:
    assert MediaFacts.from_cached({FACTS_KEY: facts}, SIG) is None
    assert MediaFacts.from_cached(None, SIG) is None and MediaFacts.from_cached({"labels": {}}, SIG) is None


@pytest.mark.asyncio
async def test_a_swap_to_other_sides_decodes_again_instead_of_serving_decodes_of_the_old_size(
    photo_url, decodes
) -> None:
    from dataclasses import replace

    async with MediaFetcher(CONFIG) as fetcher:
        await fetcher.fetch(photo_url)
        fetcher.reconfigure(replace(CONFIG, decode_workers=1))  # the same decode signature: the memo stays
        again = await fetcher.fetch(photo_url)
        assert len(decodes) == 1 and again.decoded_before
        fetcher.reconfigure(replace(CONFIG, max_side=128, min_side=64))  # a model with a 64 px input
        resized = await fetcher.fetch(photo_url)
        assert len(decodes) == 2 and not resized.decoded_before and max(resized.image.size) <= 128
