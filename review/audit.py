"""The audit trail: every act of a person other than a decision (dismissing an escalation,
requeueing or dropping a dead-lettered item, changing users and tokens, erasing a post) is a
record on the append-only `audit` topic (modstream.records.AuditEvent), written and
acknowledged by the broker *before* the act takes effect. If Kafka cannot take it, the act
does not happen: nothing a person does goes unrecorded.

The console writes through its own producer (review/decisions.py DecisionProducer.send_audit);
commands run from a shell use `record_from_cli`, as `cli:<os user>`.
"""

from __future__ import annotations

import asyncio
import getpass
from typing import Any

from modstream.records import AuditEvent
from review.decisions import AUDIT_TOPIC, DecisionProducer, KafkaUnavailable

__all__ = ["AUDIT_TOPIC", "AuditUnavailable", "cli_actor", "record_from_cli"]


class AuditUnavailable(RuntimeError):
    """The audit record could not be written; the act was not carried out."""


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (a container running as an arbitrary uid)
        return "cli:unknown"


async def _record(bootstrap: str, event: AuditEvent, topic: str, timeout_s: float) -> None:
    producer = DecisionProducer(bootstrap, timeout_s=timeout_s)
    try:
        await producer.send_audit(event, topic)
    finally:
        await producer.close()


def record_from_cli(
    bootstrap: str, action: str, subject: str, *, topic: str = AUDIT_TOPIC, timeout_s: float = 15.0, **detail: Any
) -> AuditEvent:
    """Write one audit record as the shell user; AuditUnavailable when Kafka does not take it."""
    event = AuditEvent(action, cli_actor(), subject, detail)
    try:
        asyncio.run(_record(bootstrap, event, topic, timeout_s))
    except KafkaUnavailable as exc:
        raise AuditUnavailable(f"{exc}; nothing was changed") from exc
    return event
