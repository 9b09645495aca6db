"""Fixed holdouts for gating retrained models.

- Base data: an example is held out when a hash of its id falls below `fraction`, so the
  choice never depends on the order, size or growth of the dataset, and every run (and every
  candidate) holds out the same examples.
- Reviewed data: the newest `fraction` of decisions by `meta.decided_at` (at least
  `minimum`), i.e. the data most like what the model will see next.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from datetime import datetime

from modstream.manifest import Example
from modstream.records import parse_iso

BASE_FRACTION = 0.1
REVIEWED_FRACTION = 0.2
REVIEWED_MINIMUM = 5
_SALT = b"modstream-base-holdout\0"


def in_base_holdout(example_id: str, fraction: float = BASE_FRACTION) -> bool:
    digest = hashlib.sha256(_SALT + example_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_base(examples: Sequence[Example], fraction: float = BASE_FRACTION) -> tuple[list[Example], list[Example]]:
    """(train, holdout) of the base data."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"base holdout fraction must be in (0, 1), got {fraction}")
    train: list[Example] = []
    holdout: list[Example] = []
    for ex in examples:
        (holdout if in_base_holdout(ex.id, fraction) else train).append(ex)
    return train, holdout


def decided_at(example: Example) -> datetime:
    """The decision time of a reviewed example; a clear error when it is missing or malformed."""
    raw = example.meta.get("decided_at")
    if not isinstance(raw, str):
        raise ValueError(f"reviewed example {example.id!r} has no meta.decided_at")
    try:
        return parse_iso(raw)  # naive times are UTC, as the dataset sink reads them
    except ValueError as exc:
        raise ValueError(f"reviewed example {example.id!r}: meta.decided_at {raw!r} is not an ISO 8601 time") from exc


def split_reviewed(
    examples: Sequence[Example], fraction: float = REVIEWED_FRACTION, minimum: int = REVIEWED_MINIMUM
) -> tuple[list[Example], list[Example]]:
    """(train, holdout): the holdout is the newest `fraction` of the decisions, at least
    `minimum` of them (all of them when there are fewer); ties in time break on the id."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"reviewed holdout fraction must be in (0, 1), got {fraction}")
    ordered = sorted(examples, key=lambda ex: (decided_at(ex), ex.id))
    # Round before ceil: 0.2 * 35 is 7.000000000000001 in floating point.
    k = min(len(ordered), max(minimum, math.ceil(round(fraction * len(ordered), 9))))
    cut = len(ordered) - k
    return ordered[:cut], ordered[cut:]


def ids_digest(ids: Iterable[str]) -> str:
    """Identifies a set of example ids (order-free)."""
    h = hashlib.sha256()
    for example_id in sorted(ids):
        h.update(example_id.encode() + b"\n")
    return h.hexdigest()
