"""A PDQ nearest-neighbour index for a worker's banks: 1,000,000+ hashes in one process.

Why multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with
Multi-Index Hashing", CVPR 2012; ThreatExchange's own C++ PDQ index, pdq/cpp/index/mih.h, is
the same idea) in numpy, and not a scan or FAISS: measured by bench/bank_lookup.py on the
2-core VM, 1,000,000 random hashes, a query within distance 31: a numpy bit-packed scan
(XOR + np.bitwise_count, `multi_index=False` here) ~4.5 ms, FAISS IndexBinaryFlat ~1.2-1.4 ms,
FAISS IndexBinaryMultiHash in its exact 16 x 16-bit setting ~2.3 ms, this index ~0.25-0.4 ms.
A scan costs the whole bank per post; this costs the few buckets a query can share a chunk
with, and it needs no new dependency (BENCHMARKS.md, "Verdict banks"). FAISS is faster on
small banks (10k: ~15 vs ~50 µs), where neither matters next to a post's cost.

How: the 256 bits are cut into 16 chunks of 16 bits. Two hashes within distance r agree to
within floor(r / 16) bits on at least one chunk (pigeonhole), so for r = 31 the candidates are
the hashes whose chunk j is within 1 bit of the query's chunk j, for some j: 16 x 17 buckets.
Each chunk's table is a counting sort of the slots by chunk value (`_order`, with bucket
offsets `_starts`): ~70 MiB at 1M hashes, next to the 32 MiB of hashes. Every candidate
is then checked by its exact distance, so the result is exactly a scan's.

Updates stay cheap and never rebuild per call: a hash is appended to a slot array that grows
geometrically (amortised O(1)); the newest slots (the tail, at most `tail_limit`) are not in the
tables and are scanned directly; a removal is a tombstone (O(1)). The tables are rebuilt, and
tombstones dropped (compaction), lazily, at the next query after the tail or the tombstones
pass their limits, so loading a whole bank costs one build (~0.5 s at 1M), not one per add.

Hashes of quality below hashing.MIN_QUALITY never match: `add` does not store them (and drops an
entry's earlier hash), `nearest` answers them with nothing.

Not thread-safe: the worker applies bank updates and matches on one thread (its event loop).
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

from stream.banks.hashing import PdqHash

_WORDS = 4  # 256 bits as 4 uint64 words
_CHUNKS = 16  # 16 chunks of 16 bits
_CHUNK_VALUES = 1 << 16
# Above this per-chunk radius, the candidate lists approach the whole bank: scan instead.
_MAX_CHUNK_RADIUS = 3


@cache
def _flip_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask with at most `radius` bits set (1, 17, 137, 697 masks for 0..3)."""
    masks = [0]
    for bits in range(1, radius + 1):
        masks.extend(sum(1 << b for b in combo) for combo in itertools.combinations(range(16), bits))
    return np.array(masks, dtype=np.int64)


def _words(pdq: PdqHash) -> np.ndarray:
    # Little-endian words of the 32 bytes: any fixed layout gives the same Hamming distances,
    # and a fixed one keeps stored hashes and queries comparable on every platform.
    return np.frombuffer(pdq.bits, dtype="<u8").astype(np.uint64)


_SHIFTS = np.array([0, 16, 32, 48], dtype=np.uint64)
# Where each chunk's bucket offsets start in the flattened (16 x 65537) offset table.
_TABLE_BASE = (np.arange(_CHUNKS, dtype=np.int64) * (_CHUNK_VALUES + 1))[:, None]


def _chunks(words: np.ndarray) -> np.ndarray:
    """The 16 chunk values of one hash, in the tables' order (chunk 4w+k = bits 16k.. of word w)."""
    return ((words[:, None] >> _SHIFTS) & np.uint64(0xFFFF)).astype(np.int64).ravel()


class PdqIndex:
    """entry id -> PDQ hash, queried for the nearest hashes within a Hamming distance.

    `multi_index=False` keeps a plain scan (no tables): the baseline the benchmark compares.
    """

    def __init__(self, *, tail_limit: int = 8192, multi_index: bool = True, initial_capacity: int = 1024) -> None:
        if tail_limit < 0:
            raise ValueError("tail_limit must be >= 0")
        self._tail_limit = tail_limit
        self._multi_index = multi_index
        # Column-major (4, capacity): a scan reads each word as one contiguous array (a row-major
        # (N, 4) scan broadcasts over a length-4 inner axis and is ~3x slower).
        self._hashes = np.zeros((_WORDS, max(16, initial_capacity)), dtype=np.uint64)
        self._alive = np.zeros(self._hashes.shape[1], dtype=bool)
        self._ids: list[str | None] = []  # per slot; None once removed
        self._slot: dict[str, int] = {}
        self._dead = 0
        # Tables over slots [0, _indexed); slots from _indexed on are the scanned tail.
        self._indexed = 0
        self._order = np.zeros(0, dtype=np.int32)
        self._starts = np.zeros(_CHUNKS * (_CHUNK_VALUES + 1), dtype=np.int64)  # flattened (16, 65537)

    # -- updates ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._slot

    def add(self, entry_id: str, pdq: PdqHash) -> bool:
        """Store (or replace) `entry_id`'s hash; False when its quality is too low to be stored
        (then the entry has no hash here at all)."""
        self.remove(entry_id)
        if not pdq.usable:
            return False
        slot = len(self._ids)
        if slot == self._hashes.shape[1]:
            self._grow(2 * slot)
        self._hashes[:, slot] = _words(pdq)
        self._alive[slot] = True
        self._ids.append(entry_id)
        self._slot[entry_id] = slot
        return True

    def remove(self, entry_id: str) -> bool:
        """Forget `entry_id` (a tombstone until the next compaction); False if it was not here."""
        slot = self._slot.pop(entry_id, None)
        if slot is None:
            return False
        self._alive[slot] = False
        self._ids[slot] = None
        self._dead += 1
        return True

    def _grow(self, capacity: int) -> None:
        hashes = np.zeros((_WORDS, capacity), dtype=np.uint64)
        hashes[:, : self._hashes.shape[1]] = self._hashes
        alive = np.zeros(capacity, dtype=bool)
        alive[: self._alive.shape[0]] = self._alive
        self._hashes, self._alive = hashes, alive

    # -- maintenance ------------------------------------------------------------------------

    def optimize(self) -> None:
        """Drop tombstones and index every slot now (otherwise done lazily by `nearest`)."""
        if self._dead:
            self._compact()
        self._build()

    def _maintain(self) -> None:
        used = len(self._ids)
        if self._dead > max(1024, used // 4):
            self._compact()
            self._build()
        elif self._multi_index and used - self._indexed > self._tail_limit:
            self._build()

    def _compact(self) -> None:
        """Renumber the live slots 0..n-1 in their order (so ties stay in insertion order)."""
        used = len(self._ids)
        live = np.flatnonzero(self._alive[:used])
        capacity = max(16, 2 * len(live))
        hashes = np.zeros((_WORDS, capacity), dtype=np.uint64)
        hashes[:, : len(live)] = self._hashes[:, live]
        alive = np.zeros(capacity, dtype=bool)
        alive[: len(live)] = True
        ids = [self._ids[i] for i in live.tolist()]
        self._hashes, self._alive, self._ids = hashes, alive, ids
        self._slot = {entry_id: slot for slot, entry_id in enumerate(ids) if entry_id is not None}
        self._dead = 0
        self._indexed = 0
        self._order = np.zeros(0, dtype=np.int32)

    def _build(self) -> None:
        if not self._multi_index:
            return
        n = len(self._ids)
        order = np.empty((_CHUNKS, n), dtype=np.int32)
        starts = np.empty((_CHUNKS, _CHUNK_VALUES + 1), dtype=np.int64)
        for chunk in range(_CHUNKS):
            word, shift = divmod(chunk, 4)
            values = ((self._hashes[word, :n] >> np.uint64(16 * shift)) & np.uint64(0xFFFF)).astype(np.uint16)
            # A stable sort of 16-bit keys is numpy's radix sort: slots stay in order per bucket.
            order[chunk] = np.argsort(values, kind="stable")
            starts[chunk, 0] = chunk * n  # offsets into the flattened (16 * n) order
            np.cumsum(np.bincount(values, minlength=_CHUNK_VALUES), out=starts[chunk, 1:])
            starts[chunk, 1:] += chunk * n
        self._order, self._starts, self._indexed = order.reshape(-1), starts.reshape(-1), n

    # -- queries ----------------------------------------------------------------------------

    def nearest(self, query: PdqHash, max_distance: int, k: int = 5) -> list[tuple[str, int]]:
        """Up to `k` (entry id, distance) within `max_distance`, nearest first; equal distances
        in the order the entries were added. Empty for a query of quality below hashing.MIN_QUALITY."""
        if k < 1 or max_distance < 0 or not query.usable or not self._slot:
            return []
        self._maintain()
        words = _words(query)
        slots, distances = self._indexed_within(words, max_distance)
        if self._indexed < len(self._ids):
            tail_slots, tail_distances = self._scan_within(words, max_distance, self._indexed, len(self._ids))
            slots = np.concatenate((slots, tail_slots))
            distances = np.concatenate((distances, tail_distances))
        live = self._alive[slots]
        slots, distances = slots[live], distances[live]
        # A hash near the query in several chunks is found once per chunk: keep one.
        slots, first = np.unique(slots, return_index=True)
        distances = distances[first]
        best = np.lexsort((slots, distances))[:k]  # by distance, then slot (= insertion order)
        return [(self._id(int(slots[i])), int(distances[i])) for i in best]

    def _id(self, slot: int) -> str:
        entry_id = self._ids[slot]
        assert entry_id is not None  # only live slots get here
        return entry_id

    def _indexed_within(self, words: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, distance) of the indexed slots within `max_distance` (dead ones included, and
        a slot once per chunk that found it)."""
        n = self._indexed
        chunk_radius = max_distance // _CHUNKS
        if n == 0 or chunk_radius > _MAX_CHUNK_RADIUS:
            return self._scan_within(words, max_distance, 0, n)
        masks = _flip_masks(chunk_radius)
        # Expected candidates for random hashes: past ~1/8 of the bank a scan is cheaper.
        if _CHUNKS * len(masks) / _CHUNK_VALUES > 1 / 8:
            return self._scan_within(words, max_distance, 0, n)
        buckets = (_chunks(words)[:, None] ^ masks[None, :]) + _TABLE_BASE  # (16, probes) into _starts
        lo = np.take(self._starts, buckets).ravel()
        lengths = np.take(self._starts, buckets + 1).ravel() - lo
        # The concatenated ranges [lo, lo + length) as one index array, without a loop.
        ends = np.cumsum(lengths)
        positions = np.repeat(lo - (ends - lengths), lengths) + np.arange(int(ends[-1]))
        slots = self._order[positions]
        # Word by word, dropping a candidate as soon as it is out of reach: for a random
        # candidate the first two words are usually enough, so most of its 4 words (4 cache
        # misses, the cost of a query) are never read.
        distances = np.zeros(len(slots), dtype=np.int64)
        for w in range(_WORDS):
            distances += np.bitwise_count(self._hashes[w, slots] ^ words[w])
            near = distances <= max_distance
            slots, distances = slots[near], distances[near]
        return slots.astype(np.int64), distances

    def _scan_within(
        self, words: np.ndarray, max_distance: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(slot, distance) of slots [start, stop) within `max_distance`, by a scan."""
        # uint16 holds 0..256 and keeps the pass over the whole bank at a quarter of int64's traffic.
        distances = np.zeros(stop - start, dtype=np.uint16)
        for w in range(_WORDS):
            distances += np.bitwise_count(self._hashes[w, start:stop] ^ words[w])
        near = np.flatnonzero(distances <= max_distance)
        return near + start, distances[near].astype(np.int64)
