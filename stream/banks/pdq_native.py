"""PDQ with the GIL released: Meta's C++ hash function called through ctypes.

Why: `pdqhash.compute` (Cython) holds the GIL for the whole hash (its C++ call has no `nogil`
block). In the worker that is ~2 ms per image during which the event loop, the fetches and the
device pool's Python wait (BENCHMARKS.md, "Verdict banks": banks on cost more posts/s than their
CPU share predicted). A ctypes call releases the GIL for the duration of the foreign call, so the
hash runs beside the rest of the worker like the decode does.

What: the binding's extension module exports the reference C++ functions with default
visibility; `pdqHash256FromFloatLuma` is looked up by its (Itanium ABI) mangled name and called
on a float32 luma computed exactly as `pdqhash.compute` computes it (float64 weights, then
float32), so the hashes are bit for bit the binding's (tests/unit/test_banks.py checks many
images). If a pdqhash build does not export the symbol, `available()` is False and
stream/banks/hashing.py falls back to `pdqhash.compute` (same hash, GIL held).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# void facebook::pdq::hashing::pdqHash256FromFloatLuma(float* fullBuffer1, float* fullBuffer2,
#     int numRows, int numCols, float buffer64x64[64][64], float buffer16x64[16][64],
#     float buffer16x16[16][16], Hash256& hash, int& quality)
_SYMBOL = "_ZN8facebook3pdq7hashing23pdqHash256FromFloatLumaEPfS2_iiPA64_fS4_PA16_fRNS1_7Hash256ERi"


class _Hash256(ctypes.Structure):
    _fields_ = [("w", ctypes.c_uint16 * 16)]


def _load() -> Any:
    try:
        import pdqhash.bindings as bindings

        fn = getattr(ctypes.CDLL(bindings.__file__), _SYMBOL)
    except ImportError as exc:  # no pdqhash at all: only a process that never hashes on the host runs so
        log.warning("PDQ on the host is unavailable: %s", exc)
        return None
    except (OSError, AttributeError) as exc:  # another build of pdqhash: fall back
        log.warning("PDQ without the GIL released: %s (using pdqhash.compute)", exc)
        return None
    p = ctypes.c_void_p
    fn.argtypes = [p, p, ctypes.c_int, ctypes.c_int, p, p, p, ctypes.POINTER(_Hash256), ctypes.POINTER(ctypes.c_int)]
    fn.restype = None
    return fn


_HASH256: Any = None
_LOADED = False


def _function() -> Any:
    """The C++ function, looked up on first use (importing this module needs no pdqhash)."""
    global _HASH256, _LOADED
    if not _LOADED:
        _HASH256, _LOADED = _load(), True
    return _HASH256


def available() -> bool:
    return _function() is not None


def luma(rgb: np.ndarray) -> np.ndarray:
    """The float32 luma pdqhash.compute hashes (its own expression: float64 weights, then float32)."""
    return np.ascontiguousarray((rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114).astype(np.float32))


def hash_rgb(rgb: np.ndarray) -> tuple[bytes, int]:
    """(32 bytes most significant bit first, quality) of an (H, W, 3) uint8 array; GIL released
    during the C++ call. The caller checks shape and dtype."""
    function = _function()
    if function is None:
        raise RuntimeError("pdqHash256FromFloatLuma is not exported by this pdqhash build")
    gray = luma(rgb)
    scratch = np.zeros_like(gray)  # the Jarosz filter's second full-size buffer
    b64x64 = np.zeros((64, 64), np.float32)
    b16x64 = np.zeros((16, 64), np.float32)
    b16x16 = np.zeros((16, 16), np.float32)
    out = _Hash256()
    quality = ctypes.c_int(0)
    function(
        gray.ctypes.data,
        scratch.ctypes.data,
        gray.shape[0],
        gray.shape[1],
        b64x64.ctypes.data,
        b16x64.ctypes.data,
        b16x16.ctypes.data,
        ctypes.byref(out),
        ctypes.byref(quality),
    )
    # Hash256::format() order: words w[15] .. w[0], each most significant bit first.
    return np.array(out.w[::-1], dtype=">u2").tobytes(), quality.value
