"""Verdict banks (issue 20): what PDQ costs, how fast a bank lookup is, and what it matches.

(a) PDQ hashing, ms per image, at the worker's decoded size (`decode_for_model`: a JPEG photo
    375 px, at most 448 px): synthetic posts and CM-Off-Meme images.
(b) Lookup, µs per query, with 10k / 100k / 1M random banked hashes, max distance 31, k = 5:
    the chosen index (stream.banks.index.PdqIndex, multi-index hashing), the same index as a
    plain numpy bit-packed scan, and FAISS IndexBinaryFlat (k-NN and range search, one thread),
    measured in the same run so the choice shows its reason. FAISS rows are skipped when
    faiss-cpu is not installed (it is not a dependency of the project). Two query kinds: a
    banked hash with 0-30 bits flipped (a repost) and a random hash (a miss, most posts).
(c) Match rates at distances 16, 24, 31, 40, 48. True: a repost (JPEG q60, resized to 80%,
    cropped 5%, caption bar: tests/reposts.py) within the distance of its original. False,
    per pair: two different images within the distance. False, per query: a repost whose
    nearest other image (a bank of every other original) is within the distance. Plus a sweep
    of crop and caption-bar sizes at distance 31. Images: the synthetic generator's and, when
    present, CM-Off-Meme's (read at run time from its folder, never copied; skipped with a
    message when absent).

    .venv/bin/python bench/bank_lookup.py [--sizes 10000,100000,1000000] [--queries 400]
        [--images 300] [--out var/bench/bank_lookup.json]

Prints tables and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.images import MAX_SIDE, decode_for_model  # noqa: E402
from stream.banks.hashing import MATCH_DISTANCE, PdqHash, pdq_hash  # noqa: E402
from stream.banks.index import PdqIndex  # noqa: E402
from stream.banks.variants import bank_variants, query_hashes  # noqa: E402
from tests.reposts import REPOSTS, encode, worker_pdq  # noqa: E402
from trainer.importers import CM_OFF_MEME_ENV, cm_off_meme_root  # noqa: E402
from trainer.synthetic import generate  # noqa: E402

DISTANCES = (16, 24, 31, 40, 48)


# -- (a) hashing ------------------------------------------------------------------------------


def hashing_cost(sources: dict[str, list[bytes]]) -> list[dict[str, Any]]:
    rows = []
    for name, blobs in sources.items():
        decoded = [decode_for_model(data) for data in blobs]
        pdq_hash(decoded[0])  # warm-up
        times = []
        for image in decoded:
            started = time.perf_counter()
            pdq_hash(image)
            times.append(1000 * (time.perf_counter() - started))
        sizes = [max(image.size) for image in decoded]
        rows.append(
            {
                "images": name,
                "n": len(times),
                "longest_side_px_median": int(statistics.median(sizes)),
                "ms_mean": round(statistics.fmean(times), 2),
                "ms_p95": round(float(np.percentile(times, 95)), 2),
            }
        )
    return rows


# -- (b) lookup -------------------------------------------------------------------------------


def _queries(rng: np.random.Generator, banked: np.ndarray, n: int) -> dict[str, list[PdqHash]]:
    hits = []
    for _ in range(n):
        bits = np.unpackbits(banked[int(rng.integers(len(banked)))])
        bits[rng.choice(256, int(rng.integers(0, 31)), replace=False)] ^= 1
        hits.append(PdqHash(np.packbits(bits).tobytes(), 100))
    misses = [PdqHash(rng.integers(0, 256, 32, dtype=np.uint8).tobytes(), 100) for _ in range(n)]
    return {"repost": hits, "miss": misses}


def _per_query_us(fn: Callable[[PdqHash], object], queries: list[PdqHash]) -> float:
    fn(queries[0])
    started = time.perf_counter()
    for query in queries:
        fn(query)
    return 1e6 * (time.perf_counter() - started) / len(queries)


def lookup_cost(sizes: list[int], n_queries: int) -> list[dict[str, Any]]:
    faiss: Any = None
    try:
        faiss = importlib.import_module("faiss")  # measured only: not a dependency of the project
    except ImportError:
        print("faiss-cpu not installed: FAISS rows skipped", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for size in sizes:
        banked = rng.integers(0, 256, size=(size, 32), dtype=np.uint8)
        queries = _queries(rng, banked, n_queries)
        hashes = [PdqHash(row.tobytes(), 100) for row in banked]
        for name, multi_index in (("PdqIndex, multi-index hashing (chosen)", True), ("numpy bit-packed scan", False)):
            index = PdqIndex(multi_index=multi_index)
            started = time.perf_counter()
            for i, pdq in enumerate(hashes):
                index.add(str(i), pdq)
            index.optimize()
            load_s = time.perf_counter() - started
            row: dict[str, Any] = {"index": name, "banked": size, "load_s": round(load_s, 2)}
            for kind, qs in queries.items():
                row[f"us_{kind}"] = round(_per_query_us(partial(index.nearest, max_distance=MATCH_DISTANCE), qs), 1)
            rows.append(row)
            del index
        if faiss is not None:
            faiss.omp_set_num_threads(1)  # a worker matches one post at a time, on its own thread
            flat = faiss.IndexBinaryFlat(256)
            started = time.perf_counter()
            flat.add(banked)
            load_s = time.perf_counter() - started

            def knn(q: PdqHash, ix: Any = flat) -> object:
                return ix.search(np.frombuffer(q.bits, np.uint8)[None], 5)

            def within(q: PdqHash, ix: Any = flat) -> object:
                return ix.range_search(np.frombuffer(q.bits, np.uint8)[None], MATCH_DISTANCE + 1)  # radius is exclusive

            for name, search in (("faiss IndexBinaryFlat, k-NN", knn), ("faiss IndexBinaryFlat, range", within)):
                row = {"index": name, "banked": size, "load_s": round(load_s, 2)}
                for kind, qs in queries.items():
                    row[f"us_{kind}"] = round(_per_query_us(search, qs), 1)
                rows.append(row)
            del flat
    return rows


# -- (c) match rates --------------------------------------------------------------------------


def _bar(fraction: float) -> Callable[[Image.Image], bytes]:
    def make(image: Image.Image) -> bytes:
        width, height = image.size
        out = Image.new("RGB", (width, height + round(height * fraction)), (255, 255, 255))
        out.paste(image, (0, round(height * fraction)))
        return encode(out)

    return make


def _crop(fraction: float, centred: bool, corner: str = "top-left") -> Callable[[Image.Image], bytes]:
    def make(image: Image.Image) -> bytes:
        width, height = image.size
        dx, dy = round(width * fraction), round(height * fraction)
        if centred:
            box = (dx // 2, dy // 2, width - dx + dx // 2, height - dy + dy // 2)
        elif corner == "top-left":
            box = (dx, dy, width, height)
        else:  # bottom-right
            box = (0, 0, width - dx, height - dy)
        return encode(image.crop(box))

    return make


# Between and beyond the crop grid the bank variants are made for (stream/banks/variants.py:
# 5% and 10% off a corner, a side or all round), so the rows show where matching stops.
SWEEP: dict[str, Callable[[Image.Image], bytes]] = {
    **{f"crop {p}% top-left": _crop(p / 100, False) for p in (1, 2, 3, 5, 7, 10, 15)},
    **{f"crop {p}% bottom-right": _crop(p / 100, False, "bottom-right") for p in (3, 7)},
    **{f"crop {p}% centred": _crop(p / 100, True) for p in (2, 5)},
    **{f"plain bar {p}%": _bar(p / 100) for p in (3, 5, 10, 15, 25)},
}


def _variant_rows(blobs: list[bytes], usable: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every banked hash of each usable original as a review decision banks it: its own PDQ
    plus its crop and bar variants; and the original (index into `usable`) each row belongs to."""
    rows: list[PdqHash] = []
    owners: list[int] = []
    for position, i in enumerate(usable):
        image = decode_for_model(blobs[i])
        hashes = [pdq_hash(image), *bank_variants(image)]
        rows += hashes
        owners += [position] * len(hashes)
    return _words(rows), np.array(owners)


def _words(hashes: list[PdqHash]) -> np.ndarray:
    return np.frombuffer(b"".join(h.bits for h in hashes), dtype=np.uint64).reshape(-1, 4)


def _distances_to(words: np.ndarray, query: PdqHash) -> np.ndarray:
    return np.bitwise_count(words ^ np.frombuffer(query.bits, dtype=np.uint64)).sum(axis=1)


def _repost_groups(words: np.ndarray, within: int) -> list[int]:
    """A group id per image: images joined by a chain of pairs within `within` bits (union-find)."""
    parent = list(range(len(words)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in range(len(words) - 1):
        d = np.bitwise_count(words[row + 1 :] ^ words[row]).sum(axis=1)
        for other in np.flatnonzero(d <= within):
            parent[root(row + 1 + int(other))] = root(row)
    return [root(i) for i in range(len(words))]


def match_rates(name: str, blobs: list[bytes], n_reposts: int, *, has_reposts: bool) -> dict[str, Any]:
    """`has_reposts`: the set holds its own reposts (CM-Off-Meme does: the same meme re-posted,
    rescaled, recropped). Then pairs within the largest distance are one "repost group" and a
    repost is only counted as a false match on an image outside its group."""
    originals = [worker_pdq(data) for data in blobs]
    usable = [i for i, h in enumerate(originals) if h.usable]
    words = _words([originals[i] for i in usable])
    pair_counts = dict.fromkeys(DISTANCES, 0)
    for row in range(len(usable) - 1):
        d = np.bitwise_count(words[row + 1 :] ^ words[row]).sum(axis=1)
        for t in DISTANCES:
            pair_counts[t] += int((d <= t).sum())
    pairs = len(usable) * (len(usable) - 1) // 2
    groups = _repost_groups(words, max(DISTANCES)) if has_reposts else list(range(len(usable)))
    grouped = sum(1 for g in groups if groups.count(g) > 1) if has_reposts else 0
    # Reposts of the first n_reposts usable images.
    chosen = usable[:n_reposts]
    variant_words, owners = _variant_rows(blobs, usable)
    true = {kind: dict.fromkeys(DISTANCES, 0) for kind in (*REPOSTS, *SWEEP)}
    true_v = {kind: dict.fromkeys(DISTANCES, 0) for kind in (*REPOSTS, *SWEEP)}
    false_v = dict.fromkeys(DISTANCES, 0)
    sweep_distances: dict[str, list[int]] = {kind: [] for kind in SWEEP}
    false_query = dict.fromkeys(DISTANCES, 0)
    queries = 0
    group_of = np.array(groups)
    for i in chosen:
        image = Image.open(io.BytesIO(blobs[i])).convert("RGB")
        own = usable.index(i)
        for kind, make in {**REPOSTS, **SWEEP}.items():
            data = make(image)
            repost = worker_pdq(data)
            d = _distances_to(words, repost)
            mine = int(d[own])
            # As the worker and the banks do it: the repost's hashes (whole, and without caption
            # bars) against every banked hash of the originals (their own and their variants).
            decoded = decode_for_model(data)
            looked_up = [h for h in query_hashes(decoded) if h.usable]
            dv = np.min([_distances_to(variant_words, h) for h in looked_up], axis=0) if looked_up else None
            if dv is not None:
                mine_v = int(dv[owners == own].min())
                for t in DISTANCES:
                    true_v[kind][t] += mine_v <= t
                if kind in REPOSTS:
                    other_v = dv[group_of[owners] != group_of[own]]
                    nearest_v = int(other_v.min()) if len(other_v) else 256
                    for t in DISTANCES:
                        false_v[t] += nearest_v <= t
            if kind in SWEEP:
                sweep_distances[kind].append(mine)
            for t in DISTANCES:  # a repost of quality < 50 never matches by PDQ
                true[kind][t] += repost.usable and mine <= t
            if kind in REPOSTS and repost.usable:
                queries += 1
                others = d[group_of != group_of[own]]
                nearest_other = int(others.min()) if len(others) else 256
                for t in DISTANCES:
                    false_query[t] += nearest_other <= t
    n = len(chosen)
    return {
        "images": name,
        "originals": len(blobs),
        "low_quality_originals": len(blobs) - len(usable),
        "images_in_repost_groups": grouped,
        "reposted": n,
        "true_match_rate": {kind: {t: round(c / n, 3) for t, c in counts.items()} for kind, counts in true.items()},
        "true_match_rate_with_variants": {
            kind: {t: round(c / n, 3) for t, c in counts.items()} for kind, counts in true_v.items()
        },
        "false_match_rate_per_repost_with_variants": {t: round(c / max(1, queries), 4) for t, c in false_v.items()},
        "banked_hashes_per_image": round(len(variant_words) / max(1, len(usable)), 1),
        "sweep_median_distance": {kind: int(statistics.median(v)) for kind, v in sweep_distances.items()},
        "pairs_within": pair_counts,
        "pairs": pairs,
        "false_match_rate_per_repost": {t: round(c / max(1, queries), 4) for t, c in false_query.items()},
        "repost_queries": queries,
    }


def image_sources(n_synthetic: int, tmp: Path) -> dict[str, list[bytes]]:
    examples = generate(n_synthetic, seed=20, out_dir=tmp, image_size=MAX_SIDE)
    sources = {"synthetic": [Path(str(e.image)).read_bytes() for e in examples]}
    root = cm_off_meme_root()
    images = sorted((root / "images").glob("*.png")) if (root / "images").is_dir() else []
    if images:
        sources["cm-off-meme"] = [p.read_bytes() for p in images]
    else:
        print(f"CM-Off-Meme sample not at {root} (set {CM_OFF_MEME_ENV}): its rows are skipped", file=sys.stderr)
    return sources


# -- output -----------------------------------------------------------------------------------


def print_tables(result: dict[str, Any]) -> None:
    print("\n(a) PDQ hashing at the decoded size")
    print("| images | n | longest side (median) | ms mean | ms p95 |\n|---|---|---|---|---|")
    for r in result["hashing"]:
        print(f"| {r['images']} | {r['n']} | {r['longest_side_px_median']} px | {r['ms_mean']} | {r['ms_p95']} |")
    print("\n(b) lookup, max distance 31, k = 5 (µs per query, one thread)")
    print("| index | banked | µs, repost query | µs, miss | load s |\n|---|---|---|---|---|")
    for r in result["lookup"]:
        print(f"| {r['index']} | {r['banked']:,} | {r['us_repost']} | {r['us_miss']} | {r['load_s']} |")
    for rates in result["match_rates"]:
        print(
            f"\n(c) {rates['images']}: {rates['reposted']} images reposted, {rates['originals']} originals"
            f" ({rates['low_quality_originals']} of quality < 50; {rates['images_in_repost_groups']} in repost groups)"
        )
        print("| rate | " + " | ".join(f"≤ {t}" for t in DISTANCES) + " |\n|---|" + "---|" * len(DISTANCES))
        for kind in REPOSTS:
            row = rates["true_match_rate"][kind]
            print(f"| true: {kind}, whole-image PDQ | " + " | ".join(f"{row[t]:.1%}" for t in DISTANCES) + " |")
            row = rates["true_match_rate_with_variants"][kind]
            print(f"| true: {kind}, with variants | " + " | ".join(f"{row[t]:.1%}" for t in DISTANCES) + " |")
        row = rates["false_match_rate_per_repost"]
        print("| false: repost near another image | " + " | ".join(f"{row[t]:.2%}" for t in DISTANCES) + " |")
        row = rates["false_match_rate_per_repost_with_variants"]
        print(
            f"| false, with variants ({rates['banked_hashes_per_image']} hashes per image) | "
            + " | ".join(f"{row[t]:.2%}" for t in DISTANCES)
            + " |"
        )
        within = rates["pairs_within"]
        label = "false" if rates["images_in_repost_groups"] == 0 else "pairs of originals (the sample's own reposts)"
        print(
            f"| {label}: pairs within ({rates['pairs']:,} pairs) | "
            + " | ".join(f"{within[t]} ({within[t] / rates['pairs']:.4%})" for t in DISTANCES)
            + " |"
        )
        print("| sweep (distance 31) | median distance | true match | with variants |\n|---|---|---|---|")
        for kind, median in rates["sweep_median_distance"].items():
            with_v = rates["true_match_rate_with_variants"][kind][31]
            print(f"| {kind} | {median} | {rates['true_match_rate'][kind][31]:.1%} | {with_v:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="banked hashes, comma-separated")
    parser.add_argument("--queries", type=int, default=400, help="queries of each kind per index")
    parser.add_argument("--synthetic", type=int, default=300, help="synthetic images")
    parser.add_argument("--images", type=int, default=300, help="images reposted per source")
    parser.add_argument("--out", default="var/bench/bank_lookup.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sources = image_sources(args.synthetic, Path(tmp))
        result: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "hashing": hashing_cost(sources),
            "lookup": lookup_cost([int(s) for s in args.sizes.split(",")], args.queries),
            "match_rates": [
                match_rates(name, blobs, args.images, has_reposts=name == "cm-off-meme")
                for name, blobs in sources.items()
            ],
        }
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
