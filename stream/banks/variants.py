"""Crops and caption bars: what one whole-image PDQ does not survive, and how the banks still
match them.

Measured (bench/bank_lookup.py): a 5% corner crop moves the PDQ of a picture by about 90 of 256
bits, a 15% caption bar by about 100; PDQ holds only to about 1% crops. Two remedies, one per
side of the match:

- **Bank side, crop variants.** A decided image is banked with the PDQ hashes of the crops a
  repost most often makes: 5% and 10% off each corner, off each single side, and all round
  (`bank_variants`). A repost cropped near one of them lands within the match distance of that
  variant. This is a grid, not crop invariance: crops between its steps (say 7%, or 3% off
  two adjacent sides) match only as far as PDQ's own ~1-2% tolerance reaches; the benchmark
  reports the true-match rate by crop size and corner.
- **Query side, bars trimmed.** A caption bar or letterbox is a band at the top or bottom whose
  rows are nearly all one near-white or near-black colour (text on a bar still leaves most of
  each row the bar's colour); `trim_bars` cuts such bands off, and the worker also looks up the
  repost with them cut, which finds a decided picture that had no bar. The decided image is not
  banked trimmed (see `bank_variants`). A picture that happens to start with flat white rows is
  trimmed as well: that only adds a hash to look up, never removes one.

The variants are computed where the image is at hand and the cost is rare: the console, from
the evidence store's bytes, when a reviewer decides. The worker computes at most one extra hash
per post (the trimmed one, only when a band is found).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from stream.banks.hashing import HASH_MAX_SIDE, PdqHash, pdq_hash

# Crop fractions of the bank-side grid, and the bars trim_bars cuts.
CROP_STEPS = (0.05, 0.10)
MIN_BAR = 0.03  # of the height (or width): thinner bands are borders PDQ ignores anyway
MAX_BAR = 0.40  # thicker ones are more picture than bar
MAX_GAP = 0.06  # rows of caption text inside a bar (of the height), which are mostly ink
FLAT_SHARE = 0.50  # of a row's pixels within FLAT_TOLERANCE of the bar's colour (text leaves more)
FLAT_TOLERANCE = 8  # grey levels: bars are flat; a picture's rows have texture and noise
BAR_DARK, BAR_LIGHT = 40, 215  # a bar's grey level is at most the first or at least the second
MIN_TRIM_SIDE = 16  # images smaller than this a side are not trimmed


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    width, height = image.size
    box = (round(width * left), round(height * top), round(width * (1 - right)), round(height * (1 - bottom)))
    return image.crop(box)


def crop_boxes() -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) fractions cut off, for every variant of the grid."""
    boxes: list[tuple[float, float, float, float]] = []
    for f in CROP_STEPS:
        boxes += [(f, f, 0, 0), (0, f, f, 0), (f, 0, 0, f), (0, 0, f, f)]  # the four corners
        boxes += [(f, 0, 0, 0), (0, f, 0, 0), (0, 0, f, 0), (0, 0, 0, f)]  # each single side
        boxes.append((f / 2, f / 2, f / 2, f / 2))  # all round, the same area as a corner crop
    return boxes


def near_rows(grey: np.ndarray, limit: int) -> np.ndarray:
    """Whether each of the first `limit` rows of `grey` (int) is mostly (FLAT_SHARE) within
    FLAT_TOLERANCE of the first row's colour; all False when that colour is no bar's (caption bars
    and letterboxes are white or black). stream/banks/device_pdq.py computes the same on the device."""
    colour = int(np.median(grey[0]))
    if BAR_DARK < colour < BAR_LIGHT:
        return np.zeros(min(limit, grey.shape[0]), dtype=bool)
    near: np.ndarray = (np.abs(grey[:limit] - colour) <= FLAT_TOLERANCE).mean(axis=1) >= FLAT_SHARE
    return near


def band_length(near: np.ndarray, height: int) -> int:
    """How many rows from the top form one bar, given `near_rows` of an image `height` rows tall. 0: none."""
    if not near.size or not near[0]:
        return 0
    # A line of caption text makes a few rows mostly ink: the bar goes on across such a gap as
    # long as the bar's colour comes back within MAX_GAP of the height.
    max_gap = max(4, round(height * MAX_GAP))
    last = gap = 0
    for row, is_near in enumerate(near):
        if is_near:
            last, gap = row, 0
        else:
            gap += 1
            if gap > max_gap:
                break
    return last + 1


def bars(near_top: np.ndarray, near_bottom: np.ndarray, height: int) -> tuple[int, int] | None:
    """(rows to cut at the top, at the bottom) from `near_rows` of the image and of it upside
    down, or None when it has no bar between MIN_BAR and MAX_BAR of its height."""
    top = band_length(near_top, height)
    bottom = band_length(near_bottom, height)
    top = top if top >= height * MIN_BAR else 0
    bottom = bottom if bottom >= height * MIN_BAR else 0
    if not (top or bottom) or height - top - bottom < 16:
        return None
    return top, bottom


def trim_bars(image: Image.Image) -> Image.Image | None:
    """`image` without the bars at its top and bottom (a caption bar, a letterbox), or None
    when it has none between MIN_BAR and MAX_BAR of its height. Only rows: memes put their
    captions above and below the picture, and a side band is far more often picture."""
    grey = np.asarray(image.convert("L"), dtype=np.int16)
    height, width = grey.shape
    if height < MIN_TRIM_SIDE or width < MIN_TRIM_SIDE:
        return None
    limit = int(height * MAX_BAR)
    cut = bars(near_rows(grey, limit), near_rows(grey[::-1], limit), height)
    if cut is None:
        return None
    return image.crop((0, cut[0], width, height - cut[1]))


def _bounded(image: Image.Image) -> Image.Image:
    if max(image.size) > HASH_MAX_SIDE:
        from models.images import bounded_rgb

        return bounded_rgb(image, HASH_MAX_SIDE)
    return image.convert("RGB") if image.mode != "RGB" else image


def query_hashes(image: Image.Image, full: PdqHash | None = None) -> list[PdqHash]:
    """What the worker looks up for one image: its PDQ, and the PDQ with its bars trimmed when
    it has any. `full`: the image's PDQ when the caller has it already."""
    image = _bounded(image)
    hashes = [full if full is not None else pdq_hash(image)]
    trimmed = trim_bars(image)
    if trimmed is not None:
        hashes.append(pdq_hash(trimmed))
    return hashes


def bank_variants(image: Image.Image) -> list[PdqHash]:
    """The extra PDQ hashes a decided image is banked with (its own hash not included): its
    crop grid. Only usable ones (quality >= 50); duplicates dropped.

    Not the decided image without its own bars: on a meme the caption bar is often what the
    verdict is about, and the same template with another caption must not match it (measured
    on CM-Off-Meme: banking the trimmed picture made 1% of reposts match another meme)."""
    image = _bounded(image)
    seen: set[bytes] = set()
    out: list[PdqHash] = []
    for box in crop_boxes():
        h = pdq_hash(_crop(image, *box))
        if h.usable and h.bits not in seen:
            seen.add(h.bits)
            out.append(h)
    return out
