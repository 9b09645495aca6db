"""What decoding a post's image yields besides its pixels, kept in its dedupe cache entry, so a
repost labelled from that entry is not decoded at all, in whichever worker process it lands.

A repost with the same text and bytes gets the model's label from the dedupe cache (Redis,
shared by every worker), but the verdict banks still need the image's PDQ hashes - a reviewer
may have banked the picture since the label was cached - and its Label carries them and the
text read from the image. Those are a pure function of the bytes and of the decode's settings
(`MediaFetcher.decode_signature`), so the post that ran the model stores them beside its label
and a repost takes them from there: the worker downloads the bytes (their content hash is the
cache key), asks the cache, and decodes only on a miss. Within one process, reposts of the same
bytes under any text skip decoding through the decode memo (stream/decode_memo.py) as well.

An entry whose facts are missing (written before this existed), were taken under another
signature, or do not parse is simply not used: the post is decoded as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream.banks.hashing import PdqHash

FACTS_KEY = "media"
# Text read from a meme is a few lines; a longer value in the cache is not ours.
MAX_OCR_CHARS = 20_000


@dataclass(frozen=True)
class MediaFacts:
    signature: str  # MediaFetcher.decode_signature of the decode that found them
    pdq: PdqHash | None = None
    pdq_trimmed: PdqHash | None = None
    ocr_text: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "pdq": _hash_json(self.pdq),
            "pdq_trimmed": _hash_json(self.pdq_trimmed),
            "ocr_text": self.ocr_text,
        }

    @classmethod
    def from_cached(cls, cached: dict[str, Any] | None, signature: str) -> MediaFacts | None:
        """The facts in a dedupe cache entry, when they were taken under `signature` and are well
        formed; None otherwise (the caller decodes)."""
        if not isinstance(cached, dict):
            return None
        obj = cached.get(FACTS_KEY)
        if not isinstance(obj, dict) or obj.get("signature") != signature:
            return None
        text = obj.get("ocr_text")
        if text is not None and (not isinstance(text, str) or len(text) > MAX_OCR_CHARS):
            return None
        try:
            return cls(signature, _hash_of(obj.get("pdq")), _hash_of(obj.get("pdq_trimmed")), text)
        except (TypeError, ValueError):
            return None


def _hash_json(value: PdqHash | None) -> dict[str, Any] | None:
    return None if value is None else {"hex": value.hex, "quality": value.quality}


def _hash_of(obj: Any) -> PdqHash | None:
    """PdqHash.from_hex checks the hex's form and the quality's type and range (ValueError)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ValueError("not a PDQ hash")
    # an absent field gets a value from_hex refuses, like any other bad one
    return PdqHash.from_hex(obj.get("hex", ""), obj.get("quality", -1))
