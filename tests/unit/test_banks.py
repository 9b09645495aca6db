"""Verdict banks (stream/banks): hashes, the PDQ index, the match rule, JSON and ThreatExchange
CSV. Pure and fast: images are drawn here or come from the synthetic generator."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.images import MAX_SIDE, MODEL_SIDE, bounded_rgb, decode_image
from modstream.records import RecordError
from stream.banks import pdq_native
from stream.banks.bank import BankEntry, BankUpdate, VerdictBanks
from stream.banks.hashing import HASH_MAX_SIDE, PdqHash, pdq_hash, pdq_hash_rgb
from stream.banks.index import PdqIndex
from stream.banks.te_csv import TeCsvError, read_te_csv, write_te_csv
from stream.banks.variants import bank_variants, query_hashes
from tests.reposts import REPOSTS, captioned, cropped_5, encode, jpeg_60, photo_like, resized_80, worker_pdq
from trainer.synthetic import generate

# The first of ThreatExchange's PdqSignal.get_examples(): pdq/data/bridge-mods/aaa-orig.jpg.
TE_BRIDGE = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
# reference_image() below, hashed by ThreatExchange's C++ reference (pdq/cpp,
# pdqHash256FromFloatLuma on the same float luma as pdqhash computes, printed with
# Hash256::format()): quality 100.
REFERENCE_HEX = "5a9594a02928db6d235f8bdf09ff235583d57c2afc88d48a7c22f4827e0afca8"
SHA_A = "a" * 64
SHA_B = "b" * 64
WHEN = "2026-01-02T03:04:05.000+00:00"


def reference_image() -> np.ndarray:
    """Integer arithmetic only, so every platform draws the same pixels."""
    y, x = np.mgrid[0:300, 0:400]
    r = (x * 7 + y * 3) % 256
    g = ((x // 40 + y // 40) % 2) * 200 + 20
    b = (x * y // 97) % 256
    return np.stack([r, g, b], axis=2).astype(np.uint8)


def flipped(pdq: PdqHash, bits: list[int], quality: int = 100) -> PdqHash:
    """`pdq` with the given bit positions inverted: a hash at a known distance."""
    value = int.from_bytes(pdq.bits, "big")
    for bit in bits:
        value ^= 1 << bit
    return PdqHash(value.to_bytes(32, "big"), quality)


def random_hash(rng: np.random.Generator, quality: int = 100) -> PdqHash:
    return PdqHash(rng.integers(0, 256, 32, dtype=np.uint8).tobytes(), quality)


def entry(
    entry_id: str,
    bank: str = "violating",
    *,
    content_hash: str | None = None,
    pdq: PdqHash | None = None,
    source: str = "review",
    tags: tuple[str, ...] = (),
    pdq_variants: tuple[str, ...] = (),
) -> BankEntry:
    return BankEntry(
        entry_id=entry_id,
        bank=bank,
        source=source,
        content_hash=content_hash,
        pdq=pdq.hex if pdq else None,
        pdq_quality=pdq.quality if pdq else None,
        verdicts={"hate": 1 if bank == "violating" else 0, "sarcasm": 0},
        decision_id=f"d-{entry_id}",
        decided_by="alice",
        decided_at=WHEN,
        tags=tags,
        pdq_variants=pdq_variants,
    )


def banks_with(*entries: BankEntry, max_distance: int = 31) -> VerdictBanks:
    banks = VerdictBanks(max_distance=max_distance)
    for e in entries:
        banks.apply(BankUpdate.add(e))
    return banks


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- hashing ---------------------------------------------------------------------------------


def test_pdq_hex_is_threatexchange_reference_order() -> None:
    pdq = pdq_hash_rgb(reference_image())
    assert pdq.hex == REFERENCE_HEX
    assert pdq.quality == 100


def test_the_worker_hashes_with_the_gil_released_and_the_bindings_result() -> None:
    # pdq_native calls the binding's own C++ through ctypes (GIL released); with the pinned
    # pdqhash it must be the path taken, and give pdqhash.compute's hash bit for bit.
    import pdqhash

    assert pdq_native.available(), "pdqhash no longer exports pdqHash256FromFloatLuma"
    rng = np.random.default_rng(7)
    images = [reference_image(), np.asarray(photo_like(3, size=(448, 314)))]
    images += [
        rng.integers(0, 256, (int(rng.integers(1, 200)), int(rng.integers(1, 200)), 3), dtype=np.uint8)
        for _ in range(20)
    ]
    for rgb in images:
        vector, quality = pdqhash.compute(np.ascontiguousarray(rgb))
        expected = PdqHash(np.packbits(vector.astype(np.uint8)).tobytes(), int(quality))
        assert pdq_native.hash_rgb(rgb) == (expected.bits, expected.quality)
        assert pdq_hash_rgb(rgb) == expected


def test_known_threatexchange_hash_roundtrips_through_hex() -> None:
    pdq = PdqHash.from_hex(TE_BRIDGE)
    assert pdq.hex == TE_BRIDGE
    assert pdq.bits == bytes.fromhex(TE_BRIDGE)
    # Most significant bit first: the first hex digit (f) is bits 255..252.
    assert flipped(pdq, [255]).hex[0] == "7"
    assert flipped(pdq, [0]).hex[-1] == "3"


@pytest.mark.parametrize(
    "value",
    ["f" * 63, "f" * 65, "F" * 64, "g" + "f" * 63, " " + "f" * 63, 12, None],
)
def test_from_hex_refuses_what_threatexchange_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        PdqHash.from_hex(value)  # type: ignore[arg-type]


def test_a_large_image_is_hashed_at_the_bounded_size() -> None:
    big = photo_like(1, size=(1600, 1200))
    at_bound = pdq_hash_rgb(np.asarray(bounded_rgb(big, HASH_MAX_SIDE)))
    full_size = pdq_hash_rgb(np.asarray(big))
    assert full_size != at_bound  # the bound changes the hash, so the next line can tell
    assert pdq_hash(big) == at_bound


def test_a_flat_image_hashes_below_quality_50() -> None:
    assert pdq_hash(Image.new("RGB", (300, 200), (120, 120, 120))).quality < 50
    assert pdq_hash(photo_like(2)).quality >= 50


# -- matching reposts --------------------------------------------------------------------------


def _banked(images: list[Image.Image]) -> VerdictBanks:
    banks = VerdictBanks()
    for i, image in enumerate(images):
        data = encode(image)
        banks.apply(BankUpdate.add(entry(f"e{i}", content_hash=sha(data), pdq=worker_pdq(data))))
    return banks


@pytest.fixture(scope="module")
def synthetic_images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    examples = generate(12, seed=21, out_dir=tmp_path_factory.mktemp("syn"), image_size=256)
    return [Image.open(Path(str(e.image))).convert("RGB") for e in examples]


@pytest.mark.parametrize("repost", [jpeg_60, resized_80], ids=["jpeg_q60", "resized_80"])
def test_reencoded_and_resized_reposts_match_their_entry(repost, synthetic_images) -> None:
    images = [photo_like(seed) for seed in range(4)] + synthetic_images[:4]
    banks = _banked(images)
    for i, image in enumerate(images):
        data = repost(image)
        found = banks.match(sha(data), worker_pdq(data))
        assert found is not None and found.entry.entry_id == f"e{i}"
        assert found.kind == "pdq" and found.distance <= 31


# Measured (bench/bank_lookup.py, BENCHMARKS.md "Verdict banks"): PDQ over the whole image moves
# ~90 bits for a 5% corner crop and ~100 for a 15% caption bar, on photos, memes and synthetic
# scenes alike; it holds only to ~1% crops and bars under ~3%. Whole-image PDQ alone misses them:
@pytest.mark.parametrize("repost", [cropped_5, captioned], ids=["cropped_5", "caption_bar"])
def test_cropped_and_captioned_reposts_are_missed_by_whole_image_pdq_alone(repost) -> None:
    images = [photo_like(seed) for seed in range(4)]
    banks = _banked(images)
    assert all(banks.match(sha(d), worker_pdq(d)) is None for d in (repost(image) for image in images))


# ... and match once the entry carries its crop and bar variants and the worker also looks up
# the picture without its bars (stream/banks/variants.py).
@pytest.mark.parametrize("repost", [cropped_5, captioned], ids=["cropped_5", "caption_bar"])
def test_cropped_and_captioned_reposts_match_an_entry_with_its_variants(repost) -> None:
    images = [photo_like(seed) for seed in range(4)]
    banks = VerdictBanks()
    for i, image in enumerate(images):
        data = encode(image)
        decoded = decode_image(data, max_side=MAX_SIDE, min_side=MODEL_SIDE)
        variants = tuple(v.hex for v in bank_variants(decoded))
        banks.apply(BankUpdate.add(entry(f"e{i}", content_hash=sha(data), pdq=worker_pdq(data), pdq_variants=variants)))
    for i, image in enumerate(images):
        data = repost(image)
        found = [banks.match(None, h) for h in query_hashes(decode_image(data, max_side=MAX_SIDE, min_side=MODEL_SIDE))]
        best = min((m for m in found if m is not None), key=lambda m: m.distance)
        assert best.entry.entry_id == f"e{i}" and best.distance <= 31


def test_unrelated_images_match_nothing(synthetic_images) -> None:
    banks = _banked([photo_like(seed) for seed in range(10)] + synthetic_images[:6])
    unrelated = [photo_like(seed) for seed in range(100, 110)] + synthetic_images[6:]
    for image in unrelated:
        for make in REPOSTS.values():
            data = make(image)
            assert banks.match(sha(data), worker_pdq(data)) is None


def test_low_quality_hash_never_matches_by_pdq_but_its_exact_hash_does() -> None:
    data = encode(Image.new("RGB", (300, 200), (90, 90, 90)))
    low = worker_pdq(data)
    assert low.quality < 50
    banks = banks_with(entry("flat", content_hash=sha(data), pdq=low))
    assert banks.match(SHA_B, low) is None  # same hash, other bytes: no PDQ match
    assert banks.match(SHA_B, PdqHash(low.bits, 100)) is None  # the entry's hash was never indexed
    found = banks.match(sha(data), low)
    assert found is not None and (found.kind, found.distance) == ("exact", 0)


def test_removing_an_entry_stops_its_matches() -> None:
    image = photo_like(5)
    data = encode(image)
    banks = banks_with(entry("e", content_hash=sha(data), pdq=worker_pdq(data)))
    repost = jpeg_60(image)
    assert banks.match(sha(data), None) is not None
    assert banks.match(sha(repost), worker_pdq(repost)) is not None
    assert banks.apply(BankUpdate.remove("e")) is True
    assert banks.match(sha(data), None) is None
    assert banks.match(sha(repost), worker_pdq(repost)) is None
    assert banks.nearest(worker_pdq(repost), content_hash=sha(data)) == []


# -- the match rule ---------------------------------------------------------------------------


def test_nearest_entry_wins_across_banks() -> None:
    query = random_hash(np.random.default_rng(0))
    banks = banks_with(
        entry("violating-10", pdq=flipped(query, list(range(10)))),
        entry("benign-5", "benign", pdq=flipped(query, list(range(100, 105)))),
    )
    found = banks.match(None, query)
    assert found is not None and (found.entry.entry_id, found.distance) == ("benign-5", 5)


def test_violating_wins_a_tie_even_when_added_later() -> None:
    query = random_hash(np.random.default_rng(1))
    banks = banks_with(
        entry("benign-7", "benign", pdq=flipped(query, list(range(7)))),
        entry("violating-7", pdq=flipped(query, list(range(50, 57)))),
    )
    found = banks.match(None, query)
    assert found is not None and (found.entry.entry_id, found.distance) == ("violating-7", 7)


def test_exact_bytes_decide_before_any_pdq_entry() -> None:
    query = random_hash(np.random.default_rng(2))
    banks = banks_with(
        entry("benign-exact", "benign", content_hash=SHA_A, pdq=flipped(query, list(range(20)))),
        entry("violating-pdq", pdq=query),  # distance 0 by PDQ
    )
    found = banks.match(SHA_A, query)
    assert found is not None and (found.entry.entry_id, found.kind) == ("benign-exact", "exact")
    # Both banks holding the same bytes (a reversal not yet removed): violating.
    banks.apply(BankUpdate.add(entry("violating-exact", content_hash=SHA_A)))
    found = banks.match(SHA_A, query)
    assert found is not None and found.entry.entry_id == "violating-exact"


def test_max_distance_is_inclusive_and_configurable() -> None:
    query = random_hash(np.random.default_rng(3))
    at_31 = entry("at-31", pdq=flipped(query, list(range(31))))
    assert banks_with(at_31).match(None, query) is not None
    assert banks_with(at_31, max_distance=30).match(None, query) is None
    assert banks_with(entry("at-32", pdq=flipped(query, list(range(32))))).match(None, query) is None
    found = banks_with(entry("at-40", pdq=flipped(query, list(range(40)))), max_distance=40).match(None, query)
    assert found is not None and found.distance == 40


def test_updates_are_idempotent_and_counted_in_the_version() -> None:
    query = random_hash(np.random.default_rng(4))
    banks = VerdictBanks()
    first = entry("e", pdq=query)
    assert banks.apply(BankUpdate.add(first)) is True
    assert banks.apply(BankUpdate.add(first)) is False  # a replayed update
    moved = entry("e", pdq=flipped(query, list(range(100))))
    assert banks.apply(BankUpdate.add(moved)) is True  # same id: replaces
    assert banks.match(None, query) is None
    assert banks.match(None, flipped(query, list(range(100)))) is not None
    assert banks.apply(BankUpdate.remove("missing")) is False
    assert banks.version == 4 and len(banks) == 1
    found = banks.match(None, flipped(query, list(range(100))))
    assert found is not None and found.version == 4


def test_nearest_gives_precedent_exact_first_then_by_distance() -> None:
    query = random_hash(np.random.default_rng(5))
    banks = banks_with(
        entry("far", "benign", pdq=flipped(query, list(range(20)))),
        entry("near", pdq=flipped(query, list(range(3)))),
        entry("tie-benign", "benign", pdq=flipped(query, list(range(200, 208)))),
        entry("tie-violating", pdq=flipped(query, list(range(100, 108)))),
        entry("same-bytes", "benign", content_hash=SHA_A),
        entry("too-far", pdq=flipped(query, list(range(60)))),
    )
    found = banks.nearest(query, k=10, content_hash=SHA_A)
    assert [(m.entry.entry_id, m.distance, m.kind) for m in found] == [
        ("same-bytes", 0, "exact"),
        ("near", 3, "pdq"),
        ("tie-violating", 8, "pdq"),
        ("tie-benign", 8, "pdq"),
        ("far", 20, "pdq"),
    ]
    assert [m.entry.entry_id for m in banks.nearest(query, k=2)] == ["near", "tie-violating"]
    assert banks.nearest(PdqHash(query.bits, 10)) == []  # a low-quality query finds no precedent


def test_search_and_list_for_admins() -> None:
    rng = np.random.default_rng(6)
    pdq = random_hash(rng)
    banks = banks_with(
        entry("r1", content_hash=SHA_A, pdq=pdq),
        entry("r2", "benign", content_hash=SHA_B),
        entry("gifct:1", pdq=random_hash(rng), source="gifct-list", tags=("Terror_Content",)),
    )
    assert [e.entry_id for e in banks.search(pdq.hex[:8])] == ["r1"]
    assert [e.entry_id for e in banks.search("bbbb")] == ["r2"]
    assert [e.entry_id for e in banks.search("GIFCT")] == ["gifct:1"]
    assert [e.entry_id for e in banks.search("terror")] == ["gifct:1"]
    assert [e.entry_id for e in banks.search("ALICE", limit=2)] == ["r1", "r2"]
    assert [e.entry_id for e in banks.list(bank="violating")] == ["r1", "gifct:1"]
    assert [e.entry_id for e in banks.list(source="review", offset=1)] == ["r2"]
    assert [e.entry_id for e in banks.list(limit=1, offset=2)] == ["gifct:1"]
    assert banks.sizes() == {"violating": 2, "benign": 1}
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"bank": "other"}):
        with pytest.raises(ValueError):
            banks.list(**bad)
    with pytest.raises(ValueError):
        banks.search("   ")


# -- the index ---------------------------------------------------------------------------------


def brute_force(stored: dict[str, PdqHash], query: PdqHash, radius: int) -> list[tuple[str, int]]:
    """Every stored hash within `radius`, by distance then insertion order (dicts keep it):
    bit by bit, nothing shared with the index's code."""
    ids = list(stored)
    bits = np.unpackbits(np.frombuffer(b"".join(h.bits for h in stored.values()), np.uint8).reshape(-1, 32), axis=1)
    distances = (bits != np.unpackbits(np.frombuffer(query.bits, np.uint8))).sum(axis=1)
    hits = [(ids[i], int(distances[i])) for i in np.flatnonzero(distances <= radius)]
    return sorted(hits, key=lambda hit: hit[1])  # stable: insertion order among equals


def test_index_agrees_with_brute_force_through_removals_and_compaction() -> None:
    rng = np.random.default_rng(7)
    index = PdqIndex(tail_limit=500)
    stored: dict[str, PdqHash] = {}
    for i in range(6000):
        pdq = random_hash(rng)
        if i % 7 == 0 and stored:  # near-duplicates of earlier hashes: real neighbours to find
            base = list(stored.values())[int(rng.integers(len(stored)))]
            pdq = flipped(base, [int(b) for b in rng.choice(256, int(rng.integers(0, 40)), replace=False)])
        if i % 10 == 5:  # exact copies (one image banked twice): ties, which keep insertion order
            pdq = list(stored.values())[int(rng.integers(len(stored)))]
        index.add(f"h{i}", pdq)
        stored[f"h{i}"] = pdq

    def check() -> None:
        values = list(stored.values())
        for q in range(40):
            base = values[int(rng.integers(len(values)))]
            if q % 4 == 1:  # a hash stored more than once
                base = next(h for h in values[int(rng.integers(len(values) // 2)) :] if values.count(h) > 1)
            query = flipped(base, [int(b) for b in rng.choice(256, int(rng.integers(0, 30)), replace=False)])
            if q % 5 == 0:
                query = random_hash(rng)
            for radius in (0, 8, 15, 16, 31, 47, 48, 63, 80):
                assert index.nearest(query, radius, k=10_000) == brute_force(stored, query, radius)
            assert index.nearest(query, 31, k=3) == brute_force(stored, query, 31)[:3]
        # The worst case for a 16-way split: differences spread evenly over every aligned 16-bit
        # block, so no block is within fewer bits than the pigeonhole bound allows.
        for distance, radius in ((16, 16), (31, 31), (47, 47), (15, 15)):
            base_id = list(stored)[int(rng.integers(len(stored)))]
            bits = [16 * (c % 16) + c // 16 for c in range(distance)]  # block c % 16, bit c // 16 in it
            query = flipped(stored[base_id], bits)
            found = index.nearest(query, radius, k=10_000)
            assert (base_id, distance) in found
            assert found == brute_force(stored, query, radius)

    check()
    for entry_id in list(stored)[::3]:  # a third removed: more tombstones than the compaction limit
        assert index.remove(entry_id)
        del stored[entry_id]
    check()
    assert index._dead == 0  # the queries above compacted the index
    for i in range(6000, 7000):  # a tail after compaction
        pdq = random_hash(rng)
        index.add(f"h{i}", pdq)
        stored[f"h{i}"] = pdq
    check()
    assert len(index) == len(stored)


def test_index_ties_keep_insertion_order() -> None:
    pdq = random_hash(np.random.default_rng(8))
    index = PdqIndex()
    for entry_id in ("a", "b", "c"):
        index.add(entry_id, pdq)
    assert index.nearest(pdq, 0) == [("a", 0), ("b", 0), ("c", 0)]
    index.add("b", pdq)  # re-added: now the newest
    assert index.nearest(pdq, 0) == [("a", 0), ("c", 0), ("b", 0)]


def test_index_neither_stores_nor_answers_low_quality_hashes() -> None:
    pdq = random_hash(np.random.default_rng(9))
    index = PdqIndex()
    assert index.add("low", PdqHash(pdq.bits, 49)) is False
    assert "low" not in index and index.nearest(pdq, 31) == []
    index.add("good", pdq)
    assert index.nearest(PdqHash(pdq.bits, 49), 31) == []
    assert index.add("good", PdqHash(pdq.bits, 10)) is False  # a low-quality replacement drops it
    assert index.nearest(pdq, 31) == []


def test_index_grows_geometrically(monkeypatch: pytest.MonkeyPatch) -> None:
    grows: list[int] = []
    original = PdqIndex._grow

    def counting(self: PdqIndex, capacity: int) -> None:
        grows.append(capacity)
        original(self, capacity)

    monkeypatch.setattr(PdqIndex, "_grow", counting)
    index = PdqIndex(initial_capacity=16)
    rng = np.random.default_rng(10)
    for i in range(20_000):
        index.add(str(i), random_hash(rng))
    assert len(grows) <= 11  # 16 -> 32 -> ... -> 32768: doubling, not one copy per add


# -- JSON ------------------------------------------------------------------------------------


def test_entry_and_update_json_roundtrip() -> None:
    e = entry("r1", content_hash=SHA_A, pdq=PdqHash.from_hex(TE_BRIDGE, 87), tags=("x",))
    assert BankEntry.from_json(json.dumps(e.to_json())) == e
    for update in (BankUpdate.add(e), BankUpdate.remove("r1")):
        assert BankUpdate.from_json(json.dumps(update.to_json()).encode()) == update


def _valid() -> dict[str, object]:
    return entry("r1", content_hash=SHA_A, pdq=PdqHash.from_hex(TE_BRIDGE, 90)).to_json()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"entry_id": 7}, "entry_id"),
        ({"entry_id": "x" * 257}, "entry_id"),
        ({"entry_id": "a\nb"}, "entry_id"),
        ({"entry_id": None}, "entry_id"),
        ({"bank": "grey"}, "bank"),
        ({"bank": ["violating"]}, "bank"),
        ({"source": {"name": "review"}}, "source"),
        ({"content_hash": "a" * 65}, "content_hash"),
        ({"content_hash": "A" * 64}, "content_hash"),
        ({"pdq": "f" * 65}, "pdq"),
        ({"pdq": "z" * 64}, "pdq"),
        ({"pdq": {"hex": TE_BRIDGE}}, "pdq"),
        ({"content_hash": None, "pdq": None, "pdq_quality": None}, "content_hash"),
        ({"pdq_quality": "90"}, "pdq_quality"),
        ({"pdq_quality": True}, "pdq_quality"),
        ({"pdq_quality": 101}, "pdq_quality"),
        ({"pdq": None}, "pdq_quality"),
        ({"verdicts": ["hate"]}, "verdicts"),
        ({"verdicts": {}}, "verdicts"),
        ({"verdicts": {"hate": 2}}, "verdicts.hate"),
        ({"verdicts": {"hate": True}}, "verdicts.hate"),
        ({"verdicts": {"hate": {"label": 1}}}, "verdicts.hate"),
        ({"verdicts": {"ha te": 1}}, "verdicts"),
        ({"verdicts": {f"t{i}": 1 for i in range(33)}}, "verdicts"),
        ({"verdicts": {"hate": 0}}, "verdicts"),  # violating with nothing positive
        ({"bank": "benign"}, "verdicts"),  # benign with a positive task
        ({"decided_at": "yesterday"}, "decided_at"),
        ({"decided_by": "x" * 300}, "decided_by"),
        ({"decision_id": 12}, "decision_id"),
        ({"tags": "a b"}, "tags"),
        ({"tags": ["a b"]}, "tags[0]"),
        ({"tags": [{"x": 1}]}, "tags[0]"),
        ({"tags": ["t"] * 33}, "tags"),
        ({"v": 2}, "v"),
    ],
)
def test_entry_from_json_names_the_bad_field(change: dict[str, object], field: str) -> None:
    obj = {**_valid(), **change}
    with pytest.raises(RecordError) as caught:
        BankEntry.from_json(json.dumps(obj))
    assert caught.value.field == field


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"entry_id": "' + b"x" * 20_000 + b'"}',
        b"\xff\xfe",
        ("[" * 100 + "]" * 100).encode(),
    ],
    ids=["not-json", "array", "oversized", "not-utf8", "deep"],
)
def test_entry_from_json_refuses_what_is_not_a_record(raw: bytes) -> None:
    with pytest.raises(RecordError) as caught:
        BankEntry.from_json(raw)
    assert caught.value.field == "record"


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"op": "drop", "entry_id": "x"}, "op"),
        ({"op": "add", "entry": "r1"}, "entry"),
        ({"op": "add", "entry": {**_valid(), "pdq": 1}}, "pdq"),
        ({"op": "remove", "entry_id": ["x"]}, "entry_id"),
        ({"op": "remove"}, "entry_id"),
    ],
)
def test_update_from_json_names_the_bad_field(obj: dict[str, object], field: str) -> None:
    with pytest.raises(RecordError) as caught:
        BankUpdate.from_json(json.dumps(obj))
    assert caught.value.field == field


# -- ThreatExchange CSV -------------------------------------------------------------------------

HEADER = "signal_type,signal_str,collab,category,tags\r\n"


def test_threatexchange_dataset_csv_imports() -> None:
    # As `threatexchange dataset -P --csv` writes it: DictWriter, "\r\n", a quoted collab.
    second = "0" * 63 + "1"
    text = (
        HEADER
        + f'pdq,{TE_BRIDGE},"Sample, Signals",INVESTIGATION_SEED,media_type_photo bridge\r\n'
        + f'pdq,{second},"Sample, Signals",POSITIVE_CLASS,hate=1 sarcasm=0\r\n'
    )
    entries = read_te_csv(text, source="Sample, Signals", verdicts={"hate": 1}, imported_by="admin", imported_at=WHEN)
    assert [(e.entry_id, e.bank, e.pdq, dict(e.verdicts), e.tags) for e in entries] == [
        (f"Sample, Signals:{TE_BRIDGE}", "violating", TE_BRIDGE, {"hate": 1}, ("media_type_photo", "bridge")),
        (f"Sample, Signals:{second}", "violating", second, {"hate": 1, "sarcasm": 0}, ()),
    ]
    assert all(e.source == "Sample, Signals" and e.decided_by == "admin" and e.content_hash is None for e in entries)


@pytest.mark.parametrize(
    ("bank", "category", "tags"),
    [("violating", "INVESTIGATION_SEED", "tag{i} hate=1 sarcasm={odd}"), ("benign", "NEGATIVE_CLASS", "hate=0")],
)
def test_export_of_an_imported_list_reimports_to_the_same_entries(bank: str, category: str, tags: str) -> None:
    rng = np.random.default_rng(11)
    rows = [f"pdq,{random_hash(rng).hex},,{category},{tags.format(i=i, odd=i % 2)}" for i in range(50)]
    entries = read_te_csv("\n".join([HEADER.strip(), *rows]), source="ncii", bank=bank, imported_at=WHEN)
    banks = VerdictBanks()
    for e in entries:
        banks.apply(BankUpdate.add(e))
    out = io.StringIO()
    assert write_te_csv(banks.list(source="ncii", limit=1000), out).written == 50
    assert read_te_csv(out.getvalue(), source="ncii", bank=bank, imported_at=WHEN) == entries


def test_export_of_review_entries_shares_hashes_not_reviewers() -> None:
    pdq = PdqHash.from_hex(TE_BRIDGE, 90)
    reviewed = [
        entry("r1", content_hash=SHA_A, pdq=pdq),
        entry("r2", "benign", content_hash=SHA_B),  # no PDQ: nothing to share
        entry("r3", content_hash=SHA_B, pdq=PdqHash(b"\x01" * 32, 30)),  # ThreatExchange never shares < 50
    ]
    out = io.StringIO()
    report = write_te_csv(reviewed, out)
    assert (report.written, report.without_pdq, report.low_quality) == (1, 1, 1)
    assert out.getvalue() == HEADER + f"pdq,{TE_BRIDGE},review,POSITIVE_CLASS,hate=1 sarcasm=0\r\n"
    (back,) = read_te_csv(out.getvalue(), source="review", imported_at=WHEN)
    assert (back.pdq, back.bank, dict(back.verdicts)) == (pdq.hex, "violating", {"hate": 1, "sarcasm": 0})
    assert back.decided_by is None and back.decision_id is None and back.content_hash is None


def test_an_imported_list_matches_reposts_of_its_images() -> None:
    images = [photo_like(seed) for seed in range(30, 34)]
    rows = [f"pdq,{worker_pdq(encode(image)).hex},partner,POSITIVE_CLASS,hate=1" for image in images]
    banks = VerdictBanks()
    for e in read_te_csv("\n".join([HEADER.strip(), *rows]), source="partner"):
        banks.apply(BankUpdate.add(e))
    for image, row in zip(images, rows, strict=True):
        data = jpeg_60(image)
        found = banks.match(sha(data), worker_pdq(data))
        assert found is not None and found.entry.pdq == row.split(",")[1] and found.entry.source == "partner"


GOOD = f"pdq,{TE_BRIDGE},list,POSITIVE_CLASS,hate=1"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 0, "empty input"),
        (f"signal,hash\n{GOOD}", 1, "header"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,POSITIVE_CLASS", 2, "expected 5 fields"),
        (f"{HEADER}{GOOD},extra", 2, "expected 5 fields"),
        (f"{HEADER}photo_md5,{'a' * 32},list,POSITIVE_CLASS,", 2, "signal type"),
        (f"{HEADER}pdq,{TE_BRIDGE}0,list,POSITIVE_CLASS,", 2, "not a PDQ hash"),
        (f"{HEADER}pdq,{TE_BRIDGE.upper()},list,POSITIVE_CLASS,", 2, "not a PDQ hash"),
        (f"{HEADER}pdq,{TE_BRIDGE},other list,POSITIVE_CLASS,", 2, "collab"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,VERY_BAD,", 2, "category"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,NEGATIVE_CLASS,", 2, "cannot go into the violating bank"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,DISPUTED,", 2, "cannot go into"),
        (f"{HEADER}{GOOD}\n{GOOD}", 3, "same hash as line 2"),
        (f"{HEADER}{GOOD}\n\n{GOOD}", 3, "empty line"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,POSITIVE_CLASS,{'t' * 9000}", 2, "longer than"),
        (f'{HEADER}pdq,{TE_BRIDGE},"list,POSITIVE_CLASS,', 2, "not a CSV row"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,POSITIVE_CLASS,a\x00b", 2, "NUL"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,POSITIVE_CLASS,", 2, "pass verdicts="),
        (f"{HEADER}pdq,{TE_BRIDGE},list,POSITIVE_CLASS,hate=0", 2, "at least one task labelled 1"),
        (f"{HEADER}pdq,{TE_BRIDGE},list,POSITIVE_CLASS,{'x' * 65} hate=1", 2, "tags[0]"),
    ],
)
def test_a_malformed_list_is_refused_at_its_line(text: str, line: int, message: str) -> None:
    with pytest.raises(TeCsvError) as caught:
        read_te_csv(text, source="list")
    assert caught.value.line == line
    assert message in str(caught.value)


def test_a_list_is_bounded_in_lines_and_line_length() -> None:
    rng = np.random.default_rng(12)
    rows = [f"pdq,{random_hash(rng).hex},,POSITIVE_CLASS,hate=1" for _ in range(5)]
    assert len(read_te_csv("\n".join([HEADER.strip(), *rows]), source="s", max_lines=6)) == 5
    with pytest.raises(TeCsvError) as caught:
        read_te_csv("\n".join([HEADER.strip(), *rows]), source="s", max_lines=5)
    assert caught.value.line == 6
    # One endless line is read in bounded pieces: the reader stops at the bound, not the end.
    endless = io.StringIO(HEADER + "pdq," + "f" * 5_000_000)
    with pytest.raises(TeCsvError, match="longer than") as caught:
        read_te_csv(endless, source="s")
    assert caught.value.line == 2
    assert endless.tell() < 10_000
