"""Versioned JSON records on the topics: Post (in), Label, ReviewItem, DeadLetter (out).

Every record carries `"v": 1`. Parsing is strict about what the pipeline relies on and
names the offending field in `RecordError`, so a bad post lands on the dead-letter topic
with a reason a person can act on. Unknown fields are ignored (producers may add them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
MAX_ID = 256
MAX_TEXT = 20_000
MAX_IMAGES = 4
MAX_URL = 2048


class RecordError(ValueError):
    """A record that does not fit its schema; `field` names where, the message why."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name}: {why}")
        self.field = field_name
        self.why = why


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _check_version(obj: dict[str, Any]) -> None:
    version = obj.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecordError("v", f"unsupported schema version {version!r} (this worker reads {SCHEMA_VERSION})")


def _string(
    obj: dict[str, Any], name: str, *, max_len: int, required: bool = True, empty_ok: bool = False
) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise RecordError(name, "is required")
        return None
    if not isinstance(value, str):
        raise RecordError(name, f"must be a string, not {type(value).__name__}")
    if not value.strip() and not empty_ok:
        raise RecordError(name, "must not be empty")
    if len(value) > max_len:
        raise RecordError(name, f"is longer than {max_len} characters")
    return value


def decode_json(raw: bytes | str) -> dict[str, Any]:
    """Bytes off the wire to a JSON object, or RecordError('record', why)."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise RecordError("record", f"not UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise RecordError("record", f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(obj, dict):
        raise RecordError("record", f"expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class Post:
    id: str
    text: str
    image_urls: tuple[str, ...] = ()
    author: str | None = None
    created_at: str | None = None

    @property
    def image_url(self) -> str | None:
        """The image the classifier looks at (the first one)."""
        return self.image_urls[0] if self.image_urls else None

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> Post:
        obj = raw if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        post_id = _string(obj, "id", max_len=MAX_ID)
        text = _string(obj, "text", max_len=MAX_TEXT, empty_ok=True)
        urls = obj.get("image_urls", [])
        if urls is None:
            urls = []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise RecordError("image_urls", "must be a list of URL strings")
        if len(urls) > MAX_IMAGES:
            raise RecordError("image_urls", f"at most {MAX_IMAGES} images per post, got {len(urls)}")
        for i, url in enumerate(urls):
            if not url or len(url) > MAX_URL:
                raise RecordError(f"image_urls[{i}]", f"must be a non-empty URL of at most {MAX_URL} characters")
        created_at = _string(obj, "created_at", max_len=64, required=False)
        if created_at is not None:
            try:
                datetime.fromisoformat(created_at)
            except ValueError as exc:
                raise RecordError("created_at", f"not an ISO 8601 timestamp: {created_at!r}") from exc
        author = _string(obj, "author", max_len=MAX_ID, required=False)
        assert post_id is not None and text is not None
        return cls(post_id, text, tuple(urls), author, created_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "id": self.id,
            "text": self.text,
            "image_urls": list(self.image_urls),
            "author": self.author,
            "created_at": self.created_at,
        }


@dataclass
class MediaInfo:
    """status: ok, none (no image), or the fetch/decode error code."""

    status: str
    url: str | None = None
    content_hash: str | None = None
    reason: str | None = None


@dataclass
class Label:
    """The one final record per post. `labels` maps task -> {score, decision, threshold}."""

    post_id: str
    labels: dict[str, dict[str, Any]]
    itm_match: float | None
    route: str  # auto | review
    reasons: list[str]
    media: MediaInfo
    model_version: str
    timings: dict[str, float] = field(default_factory=dict)
    dedupe_hit: bool = False
    labelled_at: str = field(default_factory=now_iso)

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> Label:
        obj = dict(raw) if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        obj.pop("v", None)
        try:
            obj["media"] = MediaInfo(**obj["media"])
            return cls(**obj)
        except (KeyError, TypeError) as exc:
            raise RecordError("label", str(exc)) from exc


@dataclass
class ReviewItem:
    post_id: str
    text: str
    image_url: str | None
    reasons: list[str]
    label: dict[str, Any]
    queued_at: str = field(default_factory=now_iso)

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}


@dataclass
class DeadLetter:
    """An input that could not be labelled: the raw bytes (as text), where and why."""

    raw: str
    stage: str  # parse | fetch | classify | sink
    reason: str
    post_id: str | None = None
    failed_at: str = field(default_factory=now_iso)

    @classmethod
    def from_raw(cls, raw: bytes | str, stage: str, reason: str, post_id: str | None = None) -> DeadLetter:
        text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
        return cls(text, stage, reason, post_id)

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}


def encode(record: Post | Label | ReviewItem | DeadLetter) -> bytes:
    return json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
