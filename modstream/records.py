"""Versioned JSON records on the topics: Post (in), Label, ReviewItem, DeadLetter (out).

Every record carries `"v": 1`. Parsing is strict about what the pipeline relies on and
names the offending field in `RecordError`, so a bad post lands on the dead-letter topic
with a reason a person can act on. Unknown fields are ignored (producers may add them).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson

SCHEMA_VERSION = 1
MAX_ID = 256
REVIEW_KINDS = ("routed", "audit")  # why a post is in review (ReviewItem.kind)
MAX_TEXT = 20_000
MAX_IMAGES = 4
MAX_URL = 2048
# A post's bytes on the wire. A valid post is far smaller (20,000 characters of text, four
# URLs); anything bigger is refused before it is parsed, so no input costs more than this.
MAX_POST_BYTES = 256 * 1024
# Nesting of any record (the parser's own limit is 1024; ours are at most three deep).
MAX_JSON_DEPTH = 64
# Every record the project writes fits under the producer's request size with room to spare:
# a record over the limit can never be sent, and retrying it would stall the partition.
MAX_RECORD_BYTES = 1_000_000
# A dead letter keeps its input whole (replayable) up to this size as JSON text, else a prefix.
DEAD_LETTER_RAW_MAX = 512 * 1024
DEAD_LETTER_PREFIX_BYTES = 16 * 1024  # at most 6x that once escaped (a NUL is \u0000)
MAX_REASON = 2000


class RecordError(ValueError):
    """A record that does not fit its schema; `field` names where, the message why."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name}: {why}")
        self.field = field_name
        self.why = why


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_iso(value: str) -> datetime:
    """An ISO 8601 time as an aware datetime (a naive one is UTC); ValueError if not ISO."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


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


def _optional_bool(obj: dict[str, Any], name: str) -> None:
    value = obj.get(name)
    if value is not None and not isinstance(value, bool):
        raise RecordError(name, f"must be true, false or null, not {type(value).__name__}")


def has_control(value: str) -> bool:
    """Control characters (NUL, newlines, escapes) or lone surrogates: fine inside a post's
    text, never in an id that becomes a Kafka key, a Redis key and a log line."""
    return any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in value)


def _known_fields(cls: Any, obj: dict[str, Any]) -> dict[str, Any]:
    """Drops fields this version does not know (producers may add them, see above)."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion (the input is hostile)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def decode_json(raw: bytes | str, max_bytes: int = MAX_POST_BYTES) -> dict[str, Any]:
    """Bytes off the wire to a JSON object, or RecordError('record', why).

    orjson parses (strict UTF-8 and JSON, its own nesting limit of 1024 without touching
    Python's recursion limit: the stdlib parser raised RecursionError on a 10,000-deep post,
    which escaped every `except RecordError`); the size is checked before parsing and the
    depth after."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise RecordError("record", f"{size} bytes, larger than the limit of {max_bytes}")
    try:
        obj = orjson.loads(raw)  # validates UTF-8 itself: the check below runs on failures only
    except orjson.JSONDecodeError as exc:
        if isinstance(raw, bytes):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise RecordError("record", f"not UTF-8 ({bad.reason} at byte {bad.start})") from bad
        raise RecordError("record", f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(obj, dict):
        raise RecordError("record", f"expected a JSON object, got {type(obj).__name__}")
    if _depth(obj) > MAX_JSON_DEPTH:
        raise RecordError("record", f"nested deeper than {MAX_JSON_DEPTH} levels")
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
        if post_id is not None and has_control(post_id):
            raise RecordError("id", "must not contain control characters (it becomes the Kafka key)")
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
    """status: ok, none (no image), or the fetch/decode error code. `pdq`: the image's PDQ
    perceptual hash (64 hex digits, ThreatExchange's form) and `pdq_quality` (0-100; below 50
    it never matches a bank), when the worker hashes images for the verdict banks."""

    status: str
    url: str | None = None
    content_hash: str | None = None
    reason: str | None = None
    pdq: str | None = None
    pdq_quality: int | None = None


@dataclass
class Label:
    """The one final record per post. `labels` maps task -> {score, decision, threshold}.
    `ocr_text`: the text read from the image when the deployment reads it ("" when it found
    none), None when OCR is off, the post has no image, or reading it failed."""

    post_id: str
    labels: dict[str, dict[str, Any]]
    itm_match: float | None
    route: str  # auto | review | bank_match (a person's banked verdict, not the model's: stream/banks)
    reasons: list[str]
    media: MediaInfo
    model_version: str
    timings: dict[str, float] = field(default_factory=dict)
    dedupe_hit: bool = False
    labelled_at: str = field(default_factory=now_iso)
    ocr_text: str | None = None  # absent from records written before OCR: loads as None
    # What routed it: {"policy": name, "source": "card" | "worker", "overrides": {option: value}}
    # (models.routing.route.RoutingPolicy.provenance); None in records written before.
    routing: dict[str, Any] | None = None
    # The verdict bank entry the image matched (stream/banks: bank, entry_id, match kind,
    # distance, decision_id, decided_by, source, bank version), or None. With route bank_match
    # the labels are that entry's verdicts; with a benign match the model's labels stand.
    bank: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> Label:
        obj = dict(raw) if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        obj.pop("v", None)
        try:
            obj["media"] = MediaInfo(**_known_fields(MediaInfo, obj["media"]))
            return cls(**_known_fields(cls, obj))
        except (KeyError, TypeError) as exc:
            raise RecordError("label", str(exc)) from exc


@dataclass
class ReviewItem:
    """A post a human should look at. `label` is the Label record's JSON (scores, ITM match,
    media hash, model version); `tasks` maps each task to its label set, negative first,
    so a console can offer corrections without loading the model card."""

    post_id: str
    text: str
    image_url: str | None
    reasons: list[str]
    label: dict[str, Any]
    tasks: dict[str, list[str]] = field(default_factory=dict)
    queued_at: str = field(default_factory=now_iso)
    # "routed": the model was unsure; "audit": a blind random sample of every post the model
    # labelled, routed or not, shown without the model's output, that measures the live model
    # (stream/audit_sampling.py). A post has one item: an audited post that routing also picked
    # is reviewed once, as `audit`.
    kind: str = "routed"
    # Whether the card's routing policy sent the post to review: true on every routed item; on
    # an audit item, whether routing picked it too (so the routed stratum can be measured on
    # the audit sample). None in records written before (an audit item then was never routed).
    routed_by_policy: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    def blinded(self) -> dict[str, Any]:
        """The item as an audit reviewer may see it: no label, score, decision or ITM match,
        and not whether routing picked it (that says the model was unsure)."""
        out = self.to_json()
        if self.kind == "audit":
            out["label"] = {"media": self.label.get("media"), "post_id": self.post_id}
            out["reasons"] = ["audit"]
            out["routed_by_policy"] = None
        return out

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ReviewItem:
        obj = dict(raw) if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        if obj.get("kind", "routed") not in REVIEW_KINDS:
            raise RecordError("kind", f"must be one of {', '.join(REVIEW_KINDS)}")
        _optional_bool(obj, "routed_by_policy")
        try:
            return cls(**_known_fields(cls, obj))
        except TypeError as exc:
            raise RecordError("review_item", str(exc)) from exc


@dataclass(frozen=True)
class ModelUpdate:
    """On `model-updates` (one ordered stream every worker reads): `version` became CURRENT in
    the registry; `parent` is the version it replaced, `reason` retrain or republish."""

    version: str
    parent: str | None = None
    reason: str = "retrain"

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ModelUpdate:
        obj = dict(raw) if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        version = _string(obj, "version", max_len=MAX_ID)
        assert version is not None
        if has_control(version) or "/" in version or version.startswith("."):
            raise RecordError("version", "must be a plain version name (no path, no control characters)")
        parent = _string(obj, "parent", max_len=MAX_ID, required=False)
        reason = _string(obj, "reason", max_len=64, required=False) or "retrain"
        return cls(version, parent, reason)


# What people do besides deciding items, each recorded on `audit` before it takes effect.
AUDIT_ACTIONS = (
    "escalation_dismissed",
    "dead_requeued",
    "dead_dropped",
    "user_added",
    "user_removed",
    "password_set",
    "token_issued",
    "token_revoked",
    "post_purged",
    "retention_applied",
    "bank_entry_removed",
    "bank_list_imported",
    "gold_item_added",
    "gold_item_removed",
)
MAX_AUDIT_DETAIL = 4096  # characters of the detail's JSON: ids and counts, never post text


@dataclass(frozen=True)
class AuditEvent:
    """On `audit` (append-only, keyed by `subject`): one act of a person other than a decision
    (those are on `reviewed`). `actor` is the console user, or `cli:<os user>` for a command;
    `subject` the post id or user name acted on; `detail` ids and counts (never post text, so
    an erased post stays erased here too)."""

    action: str
    actor: str
    subject: str
    detail: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    at: str = field(default_factory=now_iso)

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> AuditEvent:
        obj = dict(raw) if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        action = _string(obj, "action", max_len=64)
        if action not in AUDIT_ACTIONS:
            raise RecordError("action", f"must be one of {', '.join(AUDIT_ACTIONS)}")
        values = {
            name: _string(obj, name, max_len=MAX_ID, required=name in ("actor", "subject"))
            for name in ("actor", "subject", "event_id", "at")
        }
        for name, value in values.items():
            if value is not None and has_control(value):
                raise RecordError(name, "must not contain control characters")
        detail = obj.get("detail", {})
        if not isinstance(detail, dict) or len(json.dumps(detail, default=str)) > MAX_AUDIT_DETAIL:
            raise RecordError("detail", f"must be an object of at most {MAX_AUDIT_DETAIL} characters")
        event = cls(action, str(values["actor"]), str(values["subject"]), detail)
        if values["event_id"] is not None:
            object.__setattr__(event, "event_id", values["event_id"])
        if values["at"] is not None:
            object.__setattr__(event, "at", values["at"])
        return event


# What a reviewer can do with each task of an item. Only confirm, correct and not_violating
# produce a training label; skip and escalate never do.
ACTIONS = ("confirm", "correct", "not_violating", "skip", "escalate")
LABELLING_ACTIONS = ("confirm", "correct", "not_violating")
# Where a decision stands in double review (ReviewDecision.review_stage, review/agreement.py):
# "single" an item one reviewer decides; "first" the first of two blind reviews (never trains:
# the pair may disagree); "second" a second review that labels nothing (skip, escalate);
# "agreed" / "disagreed" a second review that labels and agrees / disagrees with the first
# (a disagreement goes to the admins' escalations); "settled" an admin's final decision on an
# escalation; "gold" an answer to an admin's gold item (measures the reviewer, never trains).
REVIEW_STAGES = ("single", "first", "second", "agreed", "disagreed", "settled", "gold")
TRAINING_STAGES = ("single", "agreed", "settled")  # the only stages the dataset trains on


@dataclass
class TaskDecision:
    """`label` is the label this decision asserts (None for skip and escalate)."""

    action: str
    label: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise RecordError("action", f"must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if self.action in LABELLING_ACTIONS and not self.label:
            raise RecordError("label", f"action {self.action!r} needs a label")
        if self.action not in LABELLING_ACTIONS and self.label is not None:
            raise RecordError("label", f"action {self.action!r} carries no label")


def reviewer_decision(
    action: str, labels: list[str], model_label: str | None, chosen: str | None = None
) -> TaskDecision:
    """The label an action asserts for one task. `labels` is the task's label set, negative
    first. confirm: the model's label; not_violating: the negative label; correct: `chosen`,
    or for a binary task the label the model did not give."""
    if action == "confirm":
        return TaskDecision(action, model_label)
    if action == "not_violating":
        return TaskDecision(action, labels[0] if labels else None)
    if action == "correct":
        if chosen is None:
            others = [x for x in labels if x != model_label]
            if len(others) != 1:
                raise RecordError("label", "a correction of a task with more than two labels must name the label")
            chosen = others[0]
        if labels and chosen not in labels:
            raise RecordError("label", f"{chosen!r} is not one of {labels}")
        return TaskDecision(action, chosen)
    return TaskDecision(action)


@dataclass
class ReviewDecision:
    """A reviewer's verdict on one review item, written to the `reviewed` topic (keyed by
    post id) before the item is acknowledged in Redis. `decision_id` identifies this
    decision, so a replayed record is recognised; `model_labels` is the model's per-task
    {label, score, decision, threshold} that the decision confirms or corrects."""

    decision_id: str
    post_id: str
    reviewer: str
    decisions: dict[str, TaskDecision]
    model_version: str
    model_labels: dict[str, dict[str, Any]]
    text: str
    image_url: str | None = None
    media_hash: str | None = None
    itm_match: float | None = None
    reasons: list[str] = field(default_factory=list)
    queued_at: str | None = None
    decided_at: str = field(default_factory=now_iso)
    note: str | None = None
    # The hash of the image the reviewer was shown: the scored bytes from the evidence store
    # (== media_hash), or None when shown none ("media unavailable", or a tool that showed the
    # post's URL instead). Only an image the reviewer saw becomes a training image.
    seen_media_hash: str | None = None
    # The reviewer's answer to "do this image and text belong together?" (None: not asked or
    # not answered). Only this becomes an ITM training target for the post's pair: a routed
    # post's pair is not assumed to match (trainer/reviewed.py).
    image_text_match: bool | None = None
    kind: str = "routed"  # the item's: "audit" decisions measure the live model (review/live_quality.py)
    # The item's routed_by_policy: on an audit decision, whether routing picked the post too.
    routed_by_policy: bool | None = None
    # The Kafka principal of the console that wrote it (on a secured cluster, where the ACLs let
    # only consoles write `reviewed`); None on a plaintext one. Consumers cannot see who produced
    # a record, so the console states it and the broker's ACL is what makes it true.
    recorded_by: str | None = None
    # Double review and gold items (REVIEW_STAGES): only "single", "agreed" and "settled"
    # decisions may become training examples (review/dataset.py refuses the others).
    review_stage: str = "single"

    def training_labels(self) -> dict[str, str | None]:
        """task -> label for the dataset; None where the reviewer asserted nothing."""
        return {t: d.label if d.action in LABELLING_ACTIONS else None for t, d in self.decisions.items()}

    @property
    def trains(self) -> bool:
        """May this decision become a training example (its stage; it must label something too)?"""
        return self.review_stage in TRAINING_STAGES

    @property
    def escalated(self) -> bool:
        return any(d.action == "escalate" for d in self.decisions.values())

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ReviewDecision:
        obj = dict(raw) if isinstance(raw, dict) else decode_json(raw)
        _check_version(obj)
        try:
            decisions = obj.pop("decisions")
            if not isinstance(decisions, dict):
                raise RecordError("decisions", "must be an object of task -> {action, label}")
            parsed = {str(t): TaskDecision(**_known_fields(TaskDecision, d)) for t, d in decisions.items()}
            _optional_bool(obj, "routed_by_policy")
            stage = obj.get("review_stage", "single")
            if not isinstance(stage, str) or stage not in REVIEW_STAGES:
                raise RecordError("review_stage", f"must be one of {', '.join(REVIEW_STAGES)}")
            return cls(decisions=parsed, **_known_fields(cls, obj))
        except (KeyError, TypeError) as exc:
            raise RecordError("review_decision", str(exc)) from exc


# Where an input can fail. The worker's stages carry a Post as `raw` (what `dlq replay` may
# send back to `posts`); the sinks' stages carry a review item or a reviewer's decision.
POST_STAGES = ("parse", "fetch", "classify", "sink")
DEAD_LETTER_STAGES = (*POST_STAGES, "review_sink", "dataset_sink")


@dataclass
class DeadLetter:
    """An input that could not be labelled: the raw bytes (as text), where and why.

    `raw` is the whole input while it fits (DEAD_LETTER_RAW_MAX as JSON text), so `dlq
    replay` can send it back; a bigger input keeps only a prefix, `raw_truncated` is true
    and `raw_bytes` / `raw_sha256` name the whole. So a dead letter always fits under
    MAX_RECORD_BYTES: one that did not was retried forever and stalled the worker."""

    raw: str
    stage: str  # one of DEAD_LETTER_STAGES
    reason: str
    post_id: str | None = None
    failed_at: str = field(default_factory=now_iso)
    raw_bytes: int | None = None  # size of the whole input (None in records written before the cap)
    raw_sha256: str | None = None
    raw_truncated: bool = False

    @classmethod
    def from_raw(
        cls, raw: bytes | str, stage: str, reason: str, post_id: str | None = None, *, keep: int | None = None
    ) -> DeadLetter:
        """`keep`: the most bytes of the input to keep (None: the whole input while it fits)."""
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
        limit = DEAD_LETTER_PREFIX_BYTES if keep is None else keep
        whole = keep is None and len(data) <= DEAD_LETTER_RAW_MAX
        text = (data if whole else data[:limit]).decode("utf-8", errors="backslashreplace")
        if whole and _json_size(text) > DEAD_LETTER_RAW_MAX:  # escaping can grow it up to 6x
            whole = False
            text = data[:limit].decode("utf-8", errors="backslashreplace")
        if post_id is not None and (len(post_id) > MAX_ID or has_control(post_id)):
            post_id = None  # salvaged from a hostile record: not fit for a key
        return cls(
            raw=text,
            stage=stage,
            reason=reason if len(reason) <= MAX_REASON else reason[:MAX_REASON] + "…",
            post_id=post_id,
            raw_bytes=len(data),
            raw_sha256=hashlib.sha256(data).hexdigest(),
            raw_truncated=not whole,
        )

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def encode(record: Post | Label | ReviewItem | DeadLetter | ReviewDecision | ModelUpdate | AuditEvent) -> bytes:
    return json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
