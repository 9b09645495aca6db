"""JSON Schemas (draft 2020-12) of the records on the topics, generated from the record types.

The shape (field names, JSON types, which fields are required, nested records) comes from
the dataclasses in modstream/records.py and their type hints; the rules a type hint cannot say
(length limits, enums, non-empty ids) come from `_RULES` below, which names the constant or
check in records.py each mirrors. `modstream schemas --out schemas/` writes them and
tests/unit/test_schemas.py checks that the committed files equal what this module generates
and that the schemas accept and refuse the same inputs as the parsers.

Unknown fields are allowed everywhere (records.py ignores fields it does not know).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from modstream import records
from modstream.records import (
    ACTIONS,
    AUDIT_ACTIONS,
    DEAD_LETTER_STAGES,
    LABELLING_ACTIONS,
    MAX_ID,
    MAX_IMAGES,
    MAX_TEXT,
    MAX_URL,
    REVIEW_KINDS,
    SCHEMA_VERSION,
    AuditEvent,
    DeadLetter,
    Label,
    MediaInfo,
    ModelUpdate,
    Post,
    ReviewDecision,
    ReviewItem,
    TaskDecision,
)

BASE_ID = "https://modstream.invalid/schemas/"

# Record type -> (file stem, topics it travels on).
TOPIC_RECORDS: dict[type, tuple[str, str]] = {
    Post: ("post", "posts (keyed by post id)"),
    Label: ("label", "labels (keyed by post id)"),
    ReviewItem: ("review-item", "review (keyed by post id); also the `item` field of the Redis review stream"),
    DeadLetter: ("dead-letter", "posts.dlq (keyed by post id when one could be read)"),
    ReviewDecision: ("review-decision", "reviewed (keyed by post id)"),
    ModelUpdate: ("model-update", "model-updates (one partition, no key: every worker reads all of it)"),
    AuditEvent: ("audit-event", "audit (append-only, keyed by subject: a post id or user name)"),
}
NESTED = (MediaInfo, TaskDecision)

_NON_EMPTY = {"pattern": r"\S"}  # records._string: "must not be empty" (blank refused too)

# Rules a type hint cannot express, per (record, field); each mirrors records.py.
_RULES: dict[tuple[type, str], dict[str, Any]] = {
    (Post, "id"): {"minLength": 1, "maxLength": MAX_ID, **_NON_EMPTY},
    (Post, "text"): {"maxLength": MAX_TEXT},
    (Post, "image_urls"): {
        "maxItems": MAX_IMAGES,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_URL},
    },
    (Post, "author"): {"maxLength": MAX_ID, **_NON_EMPTY},
    # Post.from_json checks datetime.fromisoformat; "date-time" documents it (format is an annotation).
    (Post, "created_at"): {"maxLength": 64, "format": "date-time"},
    (Label, "route"): {"enum": ["auto", "review", "bank_match"]},
    (DeadLetter, "stage"): {"enum": list(DEAD_LETTER_STAGES)},
    (TaskDecision, "action"): {"enum": list(ACTIONS)},
    (AuditEvent, "action"): {"enum": list(AUDIT_ACTIONS)},
    (ReviewItem, "kind"): {"enum": list(REVIEW_KINDS)},
    (ReviewDecision, "kind"): {"enum": list(REVIEW_KINDS)},
    (AuditEvent, "actor"): {"minLength": 1, "maxLength": MAX_ID, **_NON_EMPTY},
    (AuditEvent, "subject"): {"minLength": 1, "maxLength": MAX_ID, **_NON_EMPTY},
}

# Fields the parser accepts as missing although the dataclass has no default (or the reverse).
_OPTIONAL_IN_JSON: dict[type, set[str]] = {Post: {"image_urls", "author", "created_at"}}


def _type_schema(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema for one Python type hint (the subset records.py uses)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return {}
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a, defs) for a in args]
        simple = [o.get("type") for o in options]
        if all(isinstance(t, str) and len(o) == 1 for t, o in zip(simple, options, strict=True)):
            return {"type": simple}
        return {"anyOf": options}
    if hint is type(None):
        return {"type": "null"}
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], defs)}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        name = hint.__name__
        if name not in defs:
            defs[name] = {}  # placeholder against recursion
            defs[name] = _object_schema(hint, defs, versioned=False)
        return {"$ref": f"#/$defs/{name}"}
    raise TypeError(f"no JSON Schema mapping for {hint!r}")


def _object_schema(cls: type, defs: dict[str, Any], *, versioned: bool) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, vars(records))
    properties: dict[str, Any] = {}
    required: list[str] = []
    if versioned:
        properties["v"] = {"const": SCHEMA_VERSION, "description": "record schema version"}
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name], defs)
        rules = dict(_RULES.get((cls, f.name), {}))
        if "items" in rules and "items" in schema:
            schema["items"] = rules.pop("items")
        if "type" in schema and isinstance(schema["type"], list) and "null" in schema["type"] and "enum" in rules:
            rules["enum"] = [*rules["enum"], None]
        schema.update(rules)
        properties[f.name] = schema
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if not has_default and f.name not in _OPTIONAL_IN_JSON.get(cls, set()):
            required.append(f.name)
    out: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if cls is Post:
        properties["image_urls"]["type"] = ["array", "null"]  # from_json reads null as no images
    if cls is TaskDecision:
        # TaskDecision.__post_init__: the labelling actions need a label, the others carry none.
        out["if"] = {"properties": {"action": {"enum": list(LABELLING_ACTIONS)}}}
        out["then"] = {"properties": {"label": {"type": "string", "minLength": 1}}, "required": ["label"]}
        out["else"] = {"properties": {"label": {"type": "null"}}}
    return out


def record_schema(cls: type) -> dict[str, Any]:
    stem, topic = TOPIC_RECORDS[cls]
    defs: dict[str, Any] = {}
    body = _object_schema(cls, defs, versioned=True)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{BASE_ID}{stem}.schema.json",
        "title": cls.__name__,
        "description": f"{' '.join(doc.split())} Topic: {topic}. Generated by `modstream schemas` from "
        "modstream/records.py; do not edit by hand.",
        **body,
    }
    if defs:
        schema["$defs"] = dict(sorted(defs.items()))
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[str, str]:
    """File name -> text of every schema."""
    return {f"{stem}.schema.json": render(record_schema(cls)) for cls, (stem, _) in TOPIC_RECORDS.items()}


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in generated().items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def check_schemas(out: Path) -> list[str]:
    """Names of the schema files in `out` that are missing or differ from the generated ones."""
    stale = []
    for name, text in generated().items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale
