"""The banks' PDQ hashes of JPEGs decoded on the device, taken there before the pixels are freed.

Why: with the verdict banks on, a worker decoded every JPEG on the host only to hash it (PDQ
reads pixels), so a GPU worker with banks could not use device decode (models/device_decode.py)
and spent ~2 ms of CPU per photo on the decode and ~1.3 ms on the hash. Here the predictor's
decode hands each full-size image on the device to `DevicePdq`, which returns what the host's
decode stage would have looked up: the image's PDQ and, when it has caption bars, the PDQ without
them (stream/banks/variants.py). The host only copies 2 x 32 bytes and a quality per image back.

How: Meta's PDQ (ThreatExchange pdq/cpp), step for step, as tensor algebra:
- luma with its weights (0.299, 0.587, 0.114);
- its downsample to 64 x 64 - two passes of the Jarosz box filter along rows and columns with a
  window of ceil(side / 128), then picking the pixel at each output's centre - is linear and
  separable, so it is one matrix per side, `Wv @ luma @ Wh.T`, with the (64, side) weights built
  once per side length on the host (`downsample_weights`, float64) from the reference's own box
  windows (its edge windows are clipped and divide by the pixels they hold);
- its quality (the sum of truncated gradients of the 64 x 64 image, / 90, at most 100), the
  16 x 16 corner of the 2-D DCT-II and one bit per coefficient above the median (Torben's,
  the 128th smallest of 256), in float32 where the reference works in float32.
The reference sums in another order (running sums in float32), so a coefficient within rounding
of the median could land on the other side: tests/unit/test_device_pdq.py holds the hashes of the
same pixels within 2 bits of `pdqhash` (in practice equal). Where that does not hold, the host
hashes: an image with a side under HOST_BELOW_SIDE (its decimation repeats rows, and exact-zero
coefficients make bits of rounding noise) is copied to the host, and one over the host's 512 px
hashing bound is first shrunk on the device as the host would (a few bits apart: another
resampler). The device decodes at full size and shrinks to the host decode's size first
(models.device_decode.host_sized): from the host path's hash a mean 0.3 bits on CM-Off memes
(studies/device_pdq_drift.py), far inside the match distance of 31.

What it must never do is let a post skip the banks: a hash that fails here returns None, and the
pipeline then hashes that JPEG on the host (Pipeline._device_match), as it does for a dedupe
entry that carries no device hash.

Cost: per size and chunk of images, the luma, two matrix products (float64: no TF32 can blur
them), the DCT, and one copy of bits and quality to the host; per call, one copy of the bar
test's rows (the caption-bar rule runs on the host, `variants.bars`). An image with bars gets a
second downsample of its rows without them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from models.device_decode import resize_uint8
from models.images import fit_within
from stream.banks import variants
from stream.banks.hashing import HASH_MAX_SIDE, PdqHash, pdq_hash
from stream.banks.variants import query_hashes

log = logging.getLogger(__name__)

PDQ_SIDE = 64  # the downsample's side
DCT_SIDE = 16  # the DCT coefficients kept (1..16 of 64, each way)
# Under this many pixels a side the image is hashed on the host: the reference's decimation then
# repeats rows or columns, several DCT coefficients are exactly zero in exact arithmetic, and
# their bits come down to each implementation's float rounding (a 448 x 16 strip: up to 15 bits
# apart). Such an image is tiny; the host hashes it in microseconds.
HOST_BELOW_SIDE = 64
CHUNK = 64  # images of one size hashed per stack
_JAROSZ_PASSES = 2
_LUMA = (0.299, 0.587, 0.114)
# Pillow's "L" conversion (ITU-R 601-2 in 16-bit fixed point), which the host's bar test reads.
_GREY_WEIGHTS = (19595, 38470, 7471)


@dataclass(frozen=True)
class DeviceHashes:
    """What the worker's bank stage looks up for one image: its PDQ and, when it has caption
    bars, its PDQ without them."""

    pdq: PdqHash
    pdq_trimmed: PdqHash | None = None


def jarosz_window(side: int) -> int:
    """The reference's box window along a side of `side` pixels (computeJaroszFilterWindowSize)."""
    return (side + 2 * PDQ_SIDE - 1) // (2 * PDQ_SIDE)


@lru_cache(maxsize=256)
def downsample_weights(side: int) -> np.ndarray:
    """(64, side) float64: row i weighs the input pixels into output i of PDQ's downsample along
    one axis: two box-filter passes, then the pixel at ((i + 0.5) * side / 64)."""
    window = jarosz_window(side)
    half = (window + 2) // 2  # the reference's half window (7 -> 4, 8 -> 5)
    # Box output k averages inputs [k - left, k + right], clipped to the image.
    left, right = window - half, half - 1
    k = np.arange(side)
    counts = (np.minimum(k + right, side - 1) - np.maximum(k - left, 0) + 1).astype(np.float64)
    picks = ((np.arange(PDQ_SIDE) + 0.5) * side / PDQ_SIDE).astype(np.int64)
    rows = np.zeros((PDQ_SIDE, side))
    rows[np.arange(PDQ_SIDE), picks] = 1.0
    for _ in range(_JAROSZ_PASSES):
        # rows @ B, B[k, j] = 1 / counts[k] for j in k's window: column j sums rows[:, k] / counts[k]
        # over the k whose window holds j, i.e. k in [j - right, j + left].
        sums = np.concatenate([np.zeros((PDQ_SIDE, 1)), np.cumsum(rows / counts, axis=1)], axis=1)
        hi = np.minimum(k + left, side - 1) + 1
        lo = np.maximum(k - right, 0)
        rows = sums[:, hi] - sums[:, lo]
    return rows


def _dct_matrix() -> np.ndarray:
    """(16, 64): the reference's dct_matrix_64, computed in double and kept in float32."""
    i = np.arange(1, DCT_SIDE + 1)[:, None]
    j = np.arange(PDQ_SIDE)[None, :]
    matrix = math.sqrt(2.0 / PDQ_SIDE) * np.cos((math.pi / 2.0 / PDQ_SIDE) * i * (2 * j + 1))
    return matrix.astype(np.float32)


_DCT = _dct_matrix()


class DevicePdq:
    """Callable as the predictor's image hook (models.device_decode.ImageHook): [3, H, W] uint8
    images on one device, each at the host decode's size, in; one DeviceHashes (or None, see
    `__call__`) each out."""

    def __init__(self, trim: bool = True) -> None:
        self.trim = trim  # also hash each image without its caption bars, as the host does
        self._weights: dict[tuple[int, str], Tensor] = {}
        self._failed_once = False

    def __call__(self, images: Sequence[Tensor]) -> list[DeviceHashes | None]:
        """The hashes of `images`; all None when hashing fails (out of device memory, a driver
        error), said once in the log: the pipeline then hashes those JPEGs on the host
        (Pipeline._device_match, counted), so a failure here costs CPU, never a bank match."""
        if not images:
            return []
        try:
            with torch.inference_mode():
                return self._hashes(images)
        except Exception as exc:
            if not self._failed_once:
                log.warning("PDQ on the device failed (%r); those JPEGs are hashed on the host", exc)
                self._failed_once = True
            return [None] * len(images)

    def _hashes(self, images: Sequence[Tensor]) -> list[DeviceHashes | None]:
        out: list[DeviceHashes | None] = [None] * len(images)
        # Images of one size are hashed as one stack (photos come in a few sizes): a handful of
        # kernels per size and chunk, not per image; a chunk bounds the float copies' memory.
        groups: dict[tuple[int, int], list[int]] = {}
        bounded: dict[int, Tensor] = {}
        for i, image in enumerate(images):
            height, width = _bounded_size(int(image.shape[-2]), int(image.shape[-1]), HASH_MAX_SIDE)
            if min(height, width) < HOST_BELOW_SIDE:
                out[i] = self._on_host(image)  # bounded there, by the host's own resampler
                continue
            if (height, width) != tuple(image.shape[-2:]):  # the host hashes at most HASH_MAX_SIDE
                image = bound(image, HASH_MAX_SIDE)
            bounded[i] = image
            groups.setdefault((height, width), []).append(i)
        hashes: dict[int, PdqHash] = {}
        bar_tests: list[tuple[list[int], int, Tensor]] = []
        for (height, width), group in groups.items():
            for start in range(0, len(group), CHUNK):
                rows = group[start : start + CHUNK]
                stack = torch.stack([bounded[i] for i in rows])
                hashes.update(zip(rows, finish(self._downsample(luma(stack))), strict=True))
                if self.trim and height >= variants.MIN_TRIM_SIDE and width >= variants.MIN_TRIM_SIDE:
                    grey = pillow_grey(stack)
                    limit = int(height * variants.MAX_BAR)
                    tests = torch.cat([near_rows(grey, limit), near_rows(grey.flip(-2), limit)], dim=1)
                    bar_tests.append((rows, height, tests))
        trimmed = self._trimmed(bounded, bar_tests) if bar_tests else {}
        for i, h in hashes.items():
            out[i] = DeviceHashes(h, trimmed.get(i))
        return out

    def _trimmed(self, images: dict[int, Tensor], bar_tests: list[tuple[list[int], int, Tensor]]) -> dict[int, PdqHash]:
        """The hashes without their caption bars of the images that have any: the bar test's rows
        come back to the host in one copy, where the host's rule (variants.bars) cuts them."""
        host = torch.cat([tests.flatten() for _, _, tests in bar_tests]).cpu().numpy()
        cuts: dict[int, tuple[int, int]] = {}
        offset = 0
        for rows, height, tests in bar_tests:
            limit = tests.shape[1] // 2
            for i in rows:
                near = host[offset : offset + 2 * limit]
                offset += 2 * limit
                cut = variants.bars(near[:limit], near[limit:], height)
                if cut is not None:
                    cuts[i] = cut
        out: dict[int, PdqHash] = {}
        blocks, rows = [], []
        for i, (top, bottom) in cuts.items():
            picture = images[i][:, top : images[i].shape[1] - bottom]
            if min(picture.shape[-2:]) < HOST_BELOW_SIDE:  # as small images: the host hashes it
                out[i] = self._on_host(picture, trim=False).pdq
                continue
            blocks.append(self._downsample(luma(picture)))
            rows.append(i)
        if blocks:
            out.update(zip(rows, finish(torch.stack(blocks)), strict=True))
        return out

    def _on_host(self, image: Tensor, trim: bool | None = None) -> DeviceHashes:
        """The host's hashes of a small image (stream/banks/variants.query_hashes)."""
        from PIL import Image

        picture = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()), "RGB")
        if not (self.trim if trim is None else trim):
            return DeviceHashes(pdq_hash(picture))
        found = query_hashes(picture)
        return DeviceHashes(found[0], found[1] if len(found) > 1 else None)

    def _downsample(self, y: Tensor) -> Tensor:
        """[..., H, W] luma -> [..., 64, 64] float64, PDQ's blur and decimation. In float64: no
        TF32 (which a GPU process may have turned on for float32 products) can blur a hash."""
        y = y.to(torch.float64)
        return self._weight(y.shape[-2], y.device) @ y @ self._weight(y.shape[-1], y.device).T

    def _weight(self, side: int, device: torch.device) -> Tensor:
        key = (side, str(device))
        if key not in self._weights:
            if len(self._weights) > 512:  # photos come in a few hundred sizes; a raid of odd ones is not kept
                self._weights.clear()
            self._weights[key] = torch.from_numpy(downsample_weights(side)).to(device)
        return self._weights[key]


def _bounded_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) within `max_side`, as the host bounds an image (models.images.fit_within)."""
    if max(height, width) <= max_side:
        return height, width
    new_width, new_height = fit_within((width, height), max_side)
    return new_height, new_width


def bound(image: Tensor, max_side: int) -> Tensor:
    """[..., 3, H, W] uint8 shrunk (aspect kept, bilinear with antialiasing) to at most
    `max_side` a side, as hashing.pdq_hash bounds a larger image (Pillow's bilinear there: the
    pixels differ a little, and so may a few bits)."""
    return resize_uint8(image, _bounded_size(int(image.shape[-2]), int(image.shape[-1]), max_side))


@lru_cache(maxsize=16)
def _constants(device: str) -> tuple[Tensor, Tensor]:
    """(luma weights float32, DCT matrix float64) on `device`, copied there once."""
    return (
        torch.tensor(_LUMA, dtype=torch.float32, device=device),
        torch.from_numpy(_DCT).to(device=device, dtype=torch.float64),
    )


def luma(image: Tensor) -> Tensor:
    """[..., 3, H, W] uint8 -> [..., H, W] float32, PDQ's luma (the reference's is float32)."""
    weights, _ = _constants(str(image.device))
    return torch.einsum("c,...chw->...hw", weights, image.to(torch.float32))


def pillow_grey(image: Tensor) -> Tensor:
    """[..., 3, H, W] uint8 -> [..., H, W] int32, as Pillow's convert("L") rounds it."""
    r, g, b = image.to(torch.int32).unbind(-3)
    w_r, w_g, w_b = _GREY_WEIGHTS
    return (r * w_r + g * w_g + b * w_b + 0x8000) >> 16


def near_rows(grey: Tensor, limit: int) -> Tensor:
    """variants.near_rows on the device: [..., H, W] int -> [..., limit] bool."""
    first = grey[..., 0, :].sort(dim=-1).values
    n = first.shape[-1]
    # numpy's median (the mean of the two middle values), then int(): truncated (they are >= 0).
    colour = torch.div(first[..., (n - 1) // 2] + first[..., n // 2], 2, rounding_mode="floor")
    flat = ((grey[..., :limit, :] - colour[..., None, None]).abs() <= variants.FLAT_TOLERANCE).sum(dim=-1)
    assert variants.FLAT_SHARE == 0.5
    near = flat * 2 >= grey.shape[-1]  # == mean >= FLAT_SHARE, in integers
    is_bar = (colour <= variants.BAR_DARK) | (colour >= variants.BAR_LIGHT)
    return near & is_bar[..., None]


def finish(blocks: Tensor) -> list[PdqHash]:
    """[N, 64, 64] downsampled lumas -> their PDQ hashes (quality, DCT, median bits)."""
    a = blocks.to(torch.float32)  # the reference's buffer64x64 is float32
    # int d = ((u - v) * 100) / 255, truncated; the gradients down the columns and along the rows.
    down = torch.trunc((a[:, :-1, :] - a[:, 1:, :]) * 100 / 255).abs().sum(dim=(1, 2))
    across = torch.trunc((a[:, :, :-1] - a[:, :, 1:]) * 100 / 255).abs().sum(dim=(1, 2))
    quality = torch.clamp(torch.div(down + across, 90, rounding_mode="floor"), max=100)
    _, dct = _constants(str(a.device))
    coeffs = (dct @ a.to(torch.float64) @ dct.T).flatten(1)  # [N, 256], bit k = i * 16 + j
    median = coeffs.kthvalue(DCT_SIDE * DCT_SIDE // 2, dim=1).values  # Torben: the 128th smallest
    bits = coeffs > median[:, None]
    # One copy to the host: the 256 bits, then the quality.
    both = torch.cat([bits.to(torch.int64), quality.to(torch.int64)[:, None]], dim=1).cpu().numpy()
    # Most significant first is bit 255 first (ThreatExchange's hex order, stream/banks/hashing.py).
    packed = np.packbits(both[:, DCT_SIDE * DCT_SIDE - 1 :: -1].astype(np.uint8), axis=1)
    return [PdqHash(row.tobytes(), int(q)) for row, q in zip(packed, both[:, -1], strict=True)]
