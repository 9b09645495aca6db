"""The hashes a verdict bank keys on: the exact content hash and Meta's PDQ perceptual hash.

Exact: the sha256 hex of the fetched bytes. The worker already has it (`MediaResult.content_hash`,
from `models.images.content_hash`), the Label carries it and the evidence store files the bytes
under it, so a bank entry names an image by that same string and nothing here recomputes it.

Perceptual: PDQ (ThreatExchange), through the `pdqhash` binding of Meta's C++ reference code,
rather than a port of our own: a 256-bit hash whose Hamming distance survives re-encoding,
resizing, small crops and captions. It is computed from the image the worker already decoded
(RGB, bounded by `FetchConfig.max_side`, 448 px by default; a JPEG photo at the DCT scale
covering the model's input, 375 x 263 for a 1000 x 700 one), never the full upload: PDQ
downsamples to 64x64 itself, so more pixels buy nothing but time, and DESIGN.md caps it at about
512 px. An image larger than that (a caller with a larger decode bound) is shrunk with the
worker's own filter (`models.images.bounded_rgb`) first.

Bit order (checked against facebook/ThreatExchange): `hex` is the form ThreatExchange,
HMA and their hash lists use: 64 lowercase hex digits, most significant bit first, i.e. the
C++ `Hash256::format()` order (words w[15] .. w[0], each as %04hx) and python-threatexchange's
`pdq_hasher._pdq_from_numpy_array` (the `pdqhash.compute` bit vector read as one binary
number). `bits` is the same number as 32 big-endian bytes, so `bits.hex() == hex`. Checked by
hashing ThreatExchange's pdq/data/bridge-mods/aaa-orig.jpg: f8f8f0ce...4e9c9b22, the first of
`PdqSignal.get_examples()`.

Quality: PDQ's own 0-100 measure of how much gradient the image has. ThreatExchange treats a
hash under 50 as too unreliable to match (`PdqSignal.QUALITY_THRESHOLD`): a flat or nearly flat
image hashes to noise that lands near other noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.images import bounded_rgb
from stream.banks import pdq_native

PDQ_BITS = 256
PDQ_BYTES = PDQ_BITS // 8
# Below this quality a hash never matches by PDQ, neither as a query nor as a bank entry
# (ThreatExchange's PdqSignal.QUALITY_THRESHOLD).
MIN_QUALITY = 50
# Meta's match threshold: distance <= 31 of 256 bits (ThreatExchange's PDQ_CONFIDENT_MATCH_THRESHOLD).
MATCH_DISTANCE = 31
# The longest side PDQ sees (DESIGN.md: hash at a bounded size, ~512 px, never the full image).
HASH_MAX_SIDE = 512

# ThreatExchange's PdqSignal.validate_signal_str: lowercase only.
_PDQ_HEX = re.compile(r"[0-9a-f]{64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_pdq_hex(value: object) -> bool:
    return isinstance(value, str) and _PDQ_HEX.fullmatch(value) is not None


def is_sha256_hex(value: object) -> bool:
    """The form of `MediaResult.content_hash` (hashlib's hexdigest: 64 lowercase hex)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


@dataclass(frozen=True)
class PdqHash:
    """A PDQ hash: `bits`, 32 bytes, most significant bit first (the ThreatExchange hex order),
    and its `quality` (0-100)."""

    bits: bytes
    quality: int

    def __post_init__(self) -> None:
        if not isinstance(self.bits, bytes) or len(self.bits) != PDQ_BYTES:
            raise ValueError(f"a PDQ hash is {PDQ_BYTES} bytes")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 0 <= self.quality <= 100:
            raise ValueError("a PDQ quality is an integer from 0 to 100")

    @property
    def hex(self) -> str:
        """64 lowercase hex digits, as ThreatExchange and HMA write a PDQ hash."""
        return self.bits.hex()

    @classmethod
    def from_hex(cls, value: str, quality: int = 100) -> PdqHash:
        """A hash from its ThreatExchange hex form. Shared lists carry no quality; ThreatExchange
        never hashes an image under quality 50 into a signal (PdqSignal.hash_from_bytes returns
        "" for those), so a listed hash counts as full quality unless told otherwise."""
        if not is_pdq_hex(value):
            raise ValueError("a PDQ hash is 64 lowercase hex digits")
        return cls(bytes.fromhex(value), quality)

    @property
    def usable(self) -> bool:
        """Whether this hash may match by PDQ at all (quality >= MIN_QUALITY)."""
        return self.quality >= MIN_QUALITY

    def distance(self, other: PdqHash) -> int:
        """Hamming distance in bits (0-256)."""
        return (int.from_bytes(self.bits, "big") ^ int.from_bytes(other.bits, "big")).bit_count()


def pdq_hash(image: Image.Image) -> PdqHash:
    """PDQ of a decoded image (the worker's `MediaResult.image`), at most HASH_MAX_SIDE px a side.

    CPU work of a few milliseconds: the worker runs it on its decode pool, next to the decode."""
    if max(image.size) > HASH_MAX_SIDE or image.mode != "RGB":
        image = bounded_rgb(image, HASH_MAX_SIDE)  # also converts to RGB (alpha over white)
    return pdq_hash_rgb(np.asarray(image))


def pdq_hash_rgb(rgb: np.ndarray) -> PdqHash:
    """PDQ of an (H, W, 3) uint8 RGB array, hashed at the size given."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError("cannot hash an empty image")
    if pdq_native.available():  # the same C++ and luma, with the GIL released (pdq_native.py)
        bits, native_quality = pdq_native.hash_rgb(rgb)
        return PdqHash(bits, int(native_quality))
    import pdqhash  # here, not at import: a process that never hashes on the host needs no wheel

    # pdqhash reads the buffer directly (a typed Cython argument): it must be C-contiguous.
    vector, quality = pdqhash.compute(np.ascontiguousarray(rgb))
    # pdqhash returns bit 255 first (the ThreatExchange order): packbits keeps that order.
    return PdqHash(np.packbits(vector.astype(np.uint8)).tobytes(), int(quality))


def check_host_pdq() -> None:
    """Raise RuntimeError, saying what to install, when this process cannot take a PDQ hash on
    the host. A worker with the banks on calls it at start: it needs the host's hash even when its
    GPU hashes (small images, failed device hashes), and a missing wheel must stop it there, not
    dead-letter posts later."""
    try:
        pdq_hash_rgb(np.zeros((8, 8, 3), np.uint8))
    except ImportError as exc:
        raise RuntimeError(f"the verdict banks need the pdqhash package ({exc}); install it or run --no-banks") from exc
