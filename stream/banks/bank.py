"""Verdict banks: what people already decided about an image, matched before the model.

Two banks. "violating": a reviewer (or an imported list) said at least one task's label is
positive for this image; the worker gives the banked verdict instead of the model's. "benign":
every task the decision covered is negative; the model still labels the post, but it stays out
of the uncertainty review queue (the same image was already looked at and found fine).

An entry names its image by the exact content hash (the sha256 of the bytes the reviewer saw,
`MediaResult.content_hash`) and by PDQ. Imported hash lists carry PDQ only.

The match rule, as a trust-and-safety team expects it:
1. Exact content hash first: the very bytes a person judged. It decides even when a PDQ entry
   is as near, since byte identity is stronger evidence than perceptual closeness. If both banks
   hold the bytes (a reversed decision that was not removed), violating wins.
2. Then PDQ within `max_distance` (default 31, Meta's threshold): the nearest entry wins; at
   equal distance violating wins (missing a repost of a violating image costs more than
   reviewing one benign post again). Among equals in one bank, the earliest added.
Hashes of quality below 50 never match by PDQ, as a query or as an entry; the exact hash still
matches them.

Changes arrive as updates (add or remove), idempotent so a replayed topic converges, and each
applied update counts in `version`, so a worker can say which bank state a Label matched
(every worker that read the same updates has the same version).

Entries travel as JSON (bank topic, snapshots): `BankEntry.from_json` is strict, since an
update carries a reviewer's verdict into every worker: a wrong type, an oversized string, a
hash that is not 64 lowercase hex digits, a nested object where a string belongs are a
`RecordError` (a ValueError) naming the field.
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from modstream.records import SCHEMA_VERSION, RecordError, _string, decode_json, has_control, parse_iso
from stream.banks.hashing import MATCH_DISTANCE, MIN_QUALITY, PDQ_BITS, PdqHash, is_pdq_hex, is_sha256_hex
from stream.banks.index import PdqIndex

BANKS: tuple[str, ...] = ("violating", "benign")  # violating first: the tie-break order
UPDATE_OPS: tuple[str, ...] = ("add", "remove")
MAX_ID = 256  # entry ids, decision ids, reviewer names (records.MAX_ID)
MAX_SOURCE = 128
MAX_TASK = 64
MAX_TASKS = 32
MAX_TAG = 64
MAX_TAGS = 32
MAX_TIME = 64
# One entry as JSON is well under 4 KiB at the limits above; refuse anything much bigger unread.
MAX_ENTRY_BYTES = 16 * 1024
MAX_LIST_LIMIT = 1000
MAX_VARIANTS = 48  # extra PDQ hashes of one decided image (stream/banks/variants.py makes 18: its crop grid)
_VARIANT = "\x1f"  # joins an entry id and a variant number in the index (ids have no control characters)
MAX_QUERY = 256


def _text(value: Any, name: str, max_len: int, *, required: bool = True) -> str | None:
    """A one-line identifier-like string: no control characters, bounded, non-empty (the
    records' own string check, plus the control characters an id or a name must not hold)."""
    text = _string({name: value}, name, max_len=max_len, required=required)
    if text is not None and has_control(text):
        raise RecordError(name, "must not contain control characters")
    return text


def _task_name(value: Any, name: str) -> str:
    text = _text(value, name, MAX_TASK)
    assert text is not None
    if not (text[0].isascii() and text[0].isalpha() and all(c.isascii() and (c.isalnum() or c == "_") for c in text)):
        raise RecordError(name, f"task names are ASCII letters, digits and _ (starting with a letter), not {text!r}")
    return text


@dataclass(frozen=True)
class BankEntry:
    """One decided image. `verdicts`: task -> 0/1 for each task the decision covered;
    `pdq_quality` None means not known (a shared list), counted as usable; `tags`: an
    imported list's own labels, kept so an export gives them back."""

    entry_id: str
    bank: str
    source: str
    content_hash: str | None
    pdq: str | None
    pdq_quality: int | None
    verdicts: Mapping[str, int]
    decision_id: str | None = None
    decided_by: str | None = None
    decided_at: str | None = None
    tags: tuple[str, ...] = ()
    # More PDQ hashes of the same decided image: its crops and its picture without caption bars
    # (stream/banks/variants.py), so a cropped or captioned repost matches too. Quality >= 50 each.
    pdq_variants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _text(self.entry_id, "entry_id", MAX_ID)
        if self.bank not in BANKS:
            raise RecordError("bank", f"must be one of {', '.join(BANKS)}, not {self.bank!r}"[:200])
        _text(self.source, "source", MAX_SOURCE)
        if self.content_hash is not None and not is_sha256_hex(self.content_hash):
            raise RecordError("content_hash", "must be a sha256 digest: 64 lowercase hex digits")
        if self.pdq is not None and not is_pdq_hex(self.pdq):
            raise RecordError("pdq", "must be a PDQ hash: 64 lowercase hex digits")
        if self.content_hash is None and self.pdq is None:
            raise RecordError("content_hash", "an entry needs a content hash, a PDQ hash or both")
        quality = self.pdq_quality
        if quality is not None:
            if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
                raise RecordError("pdq_quality", "must be an integer from 0 to 100")
            if self.pdq is None:
                raise RecordError("pdq_quality", "given without a PDQ hash")
        object.__setattr__(self, "verdicts", MappingProxyType(_verdicts(self.verdicts)))
        positive = any(self.verdicts.values())
        if self.bank == "violating" and not positive:
            raise RecordError("verdicts", "a violating entry needs at least one task labelled 1")
        if self.bank == "benign" and positive:
            raise RecordError("verdicts", "a benign entry has every task labelled 0")
        _text(self.decision_id, "decision_id", MAX_ID, required=False)
        _text(self.decided_by, "decided_by", MAX_ID, required=False)
        if _text(self.decided_at, "decided_at", MAX_TIME, required=False) is not None:
            try:
                parse_iso(str(self.decided_at))
            except ValueError:
                raise RecordError("decided_at", "must be an ISO 8601 time") from None
        object.__setattr__(self, "tags", _tags(self.tags))
        object.__setattr__(self, "pdq_variants", _variants(self.pdq_variants, self.pdq))

    @property
    def pdq_hash(self) -> PdqHash | None:
        """The PDQ hash as the index takes it (unknown quality counts as full, see PdqHash.from_hex)."""
        if self.pdq is None:
            return None
        return PdqHash.from_hex(self.pdq, 100 if self.pdq_quality is None else self.pdq_quality)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "entry_id": self.entry_id,
            "bank": self.bank,
            "source": self.source,
            "content_hash": self.content_hash,
            "pdq": self.pdq,
            "pdq_quality": self.pdq_quality,
            "verdicts": dict(self.verdicts),
            "decision_id": self.decision_id,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "tags": list(self.tags),
            "pdq_variants": list(self.pdq_variants),
        }

    @classmethod
    def from_json(cls, raw: bytes | str | Mapping[str, Any]) -> BankEntry:
        """Strict: every field is checked (RecordError naming it); unknown fields are ignored,
        as for every record (a newer producer may add some)."""
        obj = dict(raw) if isinstance(raw, Mapping) else decode_json(raw, max_bytes=MAX_ENTRY_BYTES)
        version = obj.get("v", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecordError("v", f"unsupported schema version {version!r}"[:200])
        tags = obj.get("tags", [])
        if not isinstance(tags, list):
            raise RecordError("tags", "must be a list of strings")
        variants = obj.get("pdq_variants", [])
        if not isinstance(variants, list):
            raise RecordError("pdq_variants", "must be a list of PDQ hashes")
        verdicts = obj.get("verdicts")
        if not isinstance(verdicts, dict):
            raise RecordError("verdicts", "must be an object of task -> 0 or 1")
        return cls(
            entry_id=obj.get("entry_id"),  # type: ignore[arg-type]  # checked in __post_init__
            bank=obj.get("bank"),  # type: ignore[arg-type]
            source=obj.get("source"),  # type: ignore[arg-type]
            content_hash=obj.get("content_hash"),
            pdq=obj.get("pdq"),
            pdq_quality=obj.get("pdq_quality"),
            verdicts=verdicts,
            decision_id=obj.get("decision_id"),
            decided_by=obj.get("decided_by"),
            decided_at=obj.get("decided_at"),
            tags=tuple(tags),
            pdq_variants=tuple(variants),
        )


def _owner(index_id: str) -> str:
    """The entry id of an index id (an entry's own hash, or one of its variants)."""
    return index_id.split(_VARIANT, 1)[0]


def _variants(value: Any, pdq: str | None) -> tuple[str, ...]:
    if not isinstance(value, tuple | list):
        raise RecordError("pdq_variants", "must be a list of PDQ hashes")
    if value and pdq is None:
        raise RecordError("pdq_variants", "given without the image's own PDQ hash")
    if len(value) > MAX_VARIANTS:
        raise RecordError("pdq_variants", f"at most {MAX_VARIANTS}")
    if not all(isinstance(v, str) and is_pdq_hex(v) for v in value):
        raise RecordError("pdq_variants", "each must be a PDQ hash: 64 lowercase hex digits")
    return tuple(value)


def _verdicts(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise RecordError("verdicts", "must be an object of task -> 0 or 1")
    if not value:
        raise RecordError("verdicts", "must name at least one task")
    if len(value) > MAX_TASKS:
        raise RecordError("verdicts", f"at most {MAX_TASKS} tasks")
    out = {}
    for task, label in value.items():
        name = _task_name(task, "verdicts")
        # bool is an int in Python, and JSON true is not a label: refuse it.
        if isinstance(label, bool) or label not in (0, 1) or not isinstance(label, int):
            raise RecordError(f"verdicts.{name}", "must be 0 or 1")
        out[name] = int(label)
    return out


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, tuple | list):
        raise RecordError("tags", "must be a list of strings")
    if len(value) > MAX_TAGS:
        raise RecordError("tags", f"at most {MAX_TAGS} tags")
    for i, tag in enumerate(value):
        text = _text(tag, f"tags[{i}]", MAX_TAG)
        assert text is not None
        if any(c.isspace() for c in text):  # ThreatExchange writes tags space-separated
            raise RecordError(f"tags[{i}]", "must not contain whitespace")
    return tuple(value)


@dataclass(frozen=True)
class BankUpdate:
    """One change to the banks, as it travels on the bank-updates topic."""

    op: str
    entry: BankEntry | None = None
    entry_id: str | None = None

    def __post_init__(self) -> None:
        if self.op not in UPDATE_OPS:
            raise RecordError("op", f"must be one of {', '.join(UPDATE_OPS)}")
        if self.op == "add":
            if not isinstance(self.entry, BankEntry):
                raise RecordError("entry", "an add carries the entry")
            object.__setattr__(self, "entry_id", self.entry.entry_id)
        else:
            if self.entry is not None:
                raise RecordError("entry", "a remove carries only the entry id")
            _text(self.entry_id, "entry_id", MAX_ID)

    @classmethod
    def add(cls, entry: BankEntry) -> BankUpdate:
        return cls("add", entry=entry)

    @classmethod
    def remove(cls, entry_id: str) -> BankUpdate:
        return cls("remove", entry_id=entry_id)

    def to_json(self) -> dict[str, Any]:
        if self.entry is not None:
            return {"v": SCHEMA_VERSION, "op": self.op, "entry": self.entry.to_json()}
        return {"v": SCHEMA_VERSION, "op": self.op, "entry_id": self.entry_id}

    @classmethod
    def from_json(cls, raw: bytes | str | Mapping[str, Any]) -> BankUpdate:
        obj = dict(raw) if isinstance(raw, Mapping) else decode_json(raw, max_bytes=MAX_ENTRY_BYTES + 1024)
        op = obj.get("op")
        if op == "add":
            entry = obj.get("entry")
            if not isinstance(entry, dict):
                raise RecordError("entry", "an add carries the entry as an object")
            return cls.add(BankEntry.from_json(entry))
        if op == "remove":
            return cls.remove(obj.get("entry_id"))  # type: ignore[arg-type]  # checked in __post_init__
        raise RecordError("op", f"must be one of {', '.join(UPDATE_OPS)}")


@dataclass(frozen=True)
class BankMatch:
    """Why a post matched: the entry, how near (bits; 0 for an exact match), how ("exact" or
    "pdq"), and the banks' version at the time."""

    entry: BankEntry
    distance: int
    kind: str
    version: int = field(default=0, compare=False)


class VerdictBanks:
    """The violating and benign banks of one worker (or console), fed by `apply`."""

    def __init__(self, *, max_distance: int = MATCH_DISTANCE) -> None:
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or not 0 <= max_distance <= PDQ_BITS:
            raise ValueError(f"max_distance must be an integer from 0 to {PDQ_BITS}")
        self.max_distance = max_distance
        self._entries: dict[str, BankEntry] = {}
        # content hash -> entry ids holding it, in the order they were added (a dict as an ordered set)
        self._by_content: dict[str, dict[str, None]] = {}
        self._pdq = {bank: PdqIndex() for bank in BANKS}
        self._version = 0

    @property
    def version(self) -> int:
        """How many updates were applied (no-ops included: the position in the update stream)."""
        return self._version

    def __len__(self) -> int:
        return len(self._entries)

    def sizes(self) -> dict[str, int]:
        """Entries per bank (the bank size metric)."""
        counts = dict.fromkeys(BANKS, 0)
        for entry in self._entries.values():
            counts[entry.bank] += 1
        return counts

    def get(self, entry_id: str) -> BankEntry | None:
        return self._entries.get(entry_id)

    def entries(self) -> Iterator[BankEntry]:
        """Every entry, in the order added (a snapshot writes these)."""
        return iter(list(self._entries.values()))

    # -- updates ----------------------------------------------------------------------------

    def apply(self, update: BankUpdate) -> bool:
        """Apply one update; True if the banks changed. Idempotent: adding an entry that is
        already there as it is, or removing one that is not, changes nothing."""
        self._version += 1
        if update.op == "remove":
            assert update.entry_id is not None
            return self._remove(update.entry_id)
        entry = update.entry
        assert entry is not None
        if self._entries.get(entry.entry_id) == entry:
            return False
        self._remove(entry.entry_id)  # re-adding an id replaces its entry
        self._entries[entry.entry_id] = entry
        if entry.content_hash is not None:
            self._by_content.setdefault(entry.content_hash, {})[entry.entry_id] = None
        pdq = entry.pdq_hash
        if pdq is not None:
            self._pdq[entry.bank].add(entry.entry_id, pdq)  # refuses quality < MIN_QUALITY itself
        for i, variant in enumerate(entry.pdq_variants):
            self._pdq[entry.bank].add(f"{entry.entry_id}{_VARIANT}{i}", PdqHash.from_hex(variant))
        return True

    def _remove(self, entry_id: str) -> bool:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return False
        if entry.content_hash is not None:
            holders = self._by_content[entry.content_hash]
            del holders[entry_id]
            if not holders:
                del self._by_content[entry.content_hash]
        self._pdq[entry.bank].remove(entry_id)
        for i in range(len(entry.pdq_variants)):
            self._pdq[entry.bank].remove(f"{entry_id}{_VARIANT}{i}")
        return True

    # -- matching ---------------------------------------------------------------------------

    def match(self, content_hash: str | None, pdq: PdqHash | None) -> BankMatch | None:
        """The entry that decides this image, or None (the rule is in the module docstring)."""
        exact = self._exact(content_hash)
        if exact:
            return BankMatch(exact[0], 0, "exact", self._version)
        if pdq is None or not pdq.usable:
            return None
        best: tuple[str, int] | None = None
        for bank in BANKS:  # violating first: a benign entry must be strictly nearer to win
            hits = self._pdq[bank].nearest(pdq, self.max_distance, k=1)
            if hits and (best is None or hits[0][1] < best[1]):
                best = hits[0]
        if best is None:
            return None
        return BankMatch(self._entries[_owner(best[0])], best[1], "pdq", self._version)

    def _exact(self, content_hash: str | None) -> builtins.list[BankEntry]:
        """Entries holding exactly these bytes, violating first, then in the order added."""
        if content_hash is None:
            return []
        holders = [self._entries[i] for i in self._by_content.get(content_hash, ())]
        return sorted(holders, key=lambda e: BANKS.index(e.bank))  # stable: keeps the order added

    def nearest(
        self,
        pdq: PdqHash | None,
        k: int = 5,
        max_distance: int | None = None,
        *,
        content_hash: str | None = None,
    ) -> builtins.list[BankMatch]:
        """Precedent for a review page: up to `k` decided images nearest to this one, exact
        matches first, then by PDQ distance (violating first at equal distance)."""
        if k < 1:
            return []
        radius = self.max_distance if max_distance is None else max_distance
        found = [BankMatch(e, 0, "exact", self._version) for e in self._exact(content_hash)]
        seen = {m.entry.entry_id for m in found}
        if pdq is not None and pdq.usable:
            hits = [
                (distance, rank, position, entry_id)
                for rank, bank in enumerate(BANKS)
                # Several hits may be one entry's variants: ask for enough to find k entries.
                for position, (hit_id, distance) in enumerate(
                    self._pdq[bank].nearest(pdq, radius, k=(k + len(seen)) * (1 + MAX_VARIANTS))
                )
                for entry_id in (_owner(hit_id),)
            ]
            for distance, _, _, entry_id in sorted(hits):
                if entry_id not in seen:
                    found.append(BankMatch(self._entries[entry_id], distance, "pdq", self._version))
                    seen.add(entry_id)
        return found[:k]

    # -- curation ---------------------------------------------------------------------------

    def search(self, query: str, limit: int = 50) -> builtins.list[BankEntry]:
        """Entries an admin may mean by `query`: a prefix of an entry id, a content hash, a PDQ
        hash or a decision id, or a part of a source, a reviewer's name or a tag
        (case-insensitive), in the order added. A linear pass: the console's, not the worker's."""
        text = _text(query, "query", MAX_QUERY)
        assert text is not None
        needle = text.strip().lower()
        limit = _limit(limit)

        def hit(e: BankEntry) -> bool:
            prefixed = (e.entry_id.lower(), e.content_hash or "", e.pdq or "", (e.decision_id or "").lower())
            contained = (e.source.lower(), (e.decided_by or "").lower(), *(t.lower() for t in e.tags))
            return any(v.startswith(needle) for v in prefixed) or any(needle in v for v in contained)

        return list(itertools.islice(filter(hit, self._entries.values()), limit))

    def list(
        self, bank: str | None = None, source: str | None = None, offset: int = 0, limit: int = 50
    ) -> builtins.list[BankEntry]:
        """A page of entries, in the order added, optionally of one bank and one source."""
        if bank is not None and bank not in BANKS:
            raise ValueError(f"bank must be one of {', '.join(BANKS)}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError("offset must be an integer >= 0")
        limit = _limit(limit)
        chosen = (
            e
            for e in self._entries.values()
            if (bank is None or e.bank == bank) and (source is None or e.source == source)
        )
        return builtins.list(itertools.islice(chosen, offset, offset + limit))


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    return limit


__all__ = [
    "BANKS",
    "MIN_QUALITY",
    "BankEntry",
    "BankMatch",
    "BankUpdate",
    "VerdictBanks",
]
