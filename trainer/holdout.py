"""Fixed holdouts for gating retrained models.

- Base data: an example is held out when a hash of its id falls below `fraction`, so the
  choice never depends on the order, size or growth of the dataset, and every run (and every
  candidate) holds out the same examples.
- Reviewed data: the same rule with its own salt, on the post id: a reviewed post is in the
  holdout for good, so no version ever trains on it (the "newest 20%" rule it replaced moved
  last round's holdout into this round's training, so the current model had seen the
  holdout it was judged on). `resolvable_drop` says how small a drop a holdout of n can tell.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from modstream.manifest import Example
from modstream.records import parse_iso

BASE_FRACTION = 0.1
REVIEWED_FRACTION = 0.2
_SALT = b"modstream-base-holdout\0"
_REVIEWED_SALT = b"modstream-reviewed-holdout\0"


def _below(salt: bytes, example_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(salt + example_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def in_base_holdout(example_id: str, fraction: float = BASE_FRACTION) -> bool:
    return _below(_SALT, example_id, fraction)


def in_reviewed_holdout(post_id: str, fraction: float = REVIEWED_FRACTION) -> bool:
    return _below(_REVIEWED_SALT, post_id, fraction)


def resolvable_drop(n: int) -> float | None:
    """Roughly the smallest difference between two scores in [0, 1] measured on n examples
    that 95% of repeats would not produce by chance (1.96 * sqrt(2 * 0.25 / n), the worst
    case of two proportions): a margin below it judges noise. None for n = 0."""
    return round(1.96 * math.sqrt(0.5 / n), 3) if n > 0 else None


def split_base(examples: Sequence[Example], fraction: float = BASE_FRACTION) -> tuple[list[Example], list[Example]]:
    """(train, holdout) of the base data."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"base holdout fraction must be in (0, 1), got {fraction}")
    train: list[Example] = []
    holdout: list[Example] = []
    for ex in examples:
        (holdout if in_base_holdout(ex.id, fraction) else train).append(ex)
    return train, holdout


def reserve_base_holdout(
    examples: Sequence[Example], source: dict[str, Any], fraction: float = BASE_FRACTION
) -> tuple[list[Example], dict[str, Any]]:
    """A first training's share of the base data: (the examples to train on, the card's
    `training` entries recording the data source and the holdout set aside). Every later
    retrain holds out the same examples (`split_base`), so none of them has ever been trained
    on by any version and the gate judges both models on data neither saw."""
    train, holdout = split_base(examples, fraction)
    return train, {
        "data_source": source,
        "holdouts": {
            "base": {
                "fraction": fraction,
                "rule": BASE_RULE,
                "n": len(holdout),
                "digest": ids_digest(ex.id for ex in holdout),
                "reserved_from": "the first training",
            }
        },
    }


BASE_RULE = "sha256 of a salt and the example id below the fraction (trainer/holdout.py)"


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
    examples: Sequence[Example], fraction: float = REVIEWED_FRACTION
) -> tuple[list[Example], list[Example]]:
    """(train, holdout) by a hash of the post id: the same posts every run, whatever the
    order or growth of the data, and none of them ever trained on. Every example needs a
    valid decision time (checked here, before any training starts)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"reviewed holdout fraction must be in (0, 1), got {fraction}")
    train: list[Example] = []
    holdout: list[Example] = []
    for ex in examples:
        decided_at(ex)
        (holdout if in_reviewed_holdout(ex.id, fraction) else train).append(ex)
    return train, holdout


def ids_digest(ids: Iterable[str]) -> str:
    """Identifies a set of example ids (order-free)."""
    h = hashlib.sha256()
    for example_id in sorted(ids):
        h.update(example_id.encode() + b"\n")
    return h.hexdigest()
