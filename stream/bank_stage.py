"""The worker's verdict-bank stage: before the model, each image is looked up in the banks
(stream/banks: exact content hash first, then PDQ within the configured distance).

- a match in the *violating* bank gives the banked human verdict: the Label says
  `route: bank_match`, which entry, how near and whose decision; the model does not run, the
  post is never routed to review and is not counted as a model prediction;
- a match in the *benign* bank lets the model label the post but keeps it out of the
  uncertainty review queue (people already looked at this image and found it fine);
- a text-only post, an image without a usable hash, and a miss go to the model as before.
"""

from __future__ import annotations

from typing import Any, Protocol

from stream import metrics
from stream.banks.bank import BankEntry, BankMatch
from stream.banks.hashing import PdqHash


class Banks(Protocol):
    """What the pipeline needs from the banks (stream.banks.bank.VerdictBanks)."""

    def match(self, content_hash: str | None, pdq: PdqHash | None) -> BankMatch | None: ...


def look_up(
    banks: Banks | None, content_hash: str | None, pdq: PdqHash | None, *more: PdqHash | None
) -> BankMatch | None:
    """The bank match of one image (None: no banks, no image, or no match), counted. `more`:
    other hashes of the same image (without its caption bars, stream/banks/variants.py); the
    nearest match of any wins, violating at equal distance."""
    if banks is None or (content_hash is None and pdq is None):
        return None
    found = [banks.match(content_hash, pdq), *(banks.match(None, h) for h in more if h is not None)]
    candidates = [m for m in found if m is not None]
    if not candidates:
        return None
    match = min(candidates, key=lambda m: (m.distance, m.entry.bank != "violating"))
    bank = match.entry.bank
    metrics.BANK_MATCHES.labels(bank, match.kind).inc()
    metrics.BANK_DISTANCE.labels(bank).observe(match.distance)
    for task in match.entry.verdicts:
        metrics.BANK_HITS.labels(bank, task).inc()
    return match


def match_record(match: BankMatch) -> dict[str, Any]:
    """What a Label says about its match (Label.bank): enough to find and audit the decision."""
    entry = match.entry
    return {
        "bank": entry.bank,
        "entry_id": entry.entry_id,
        "match": match.kind,
        "distance": match.distance,
        "decision_id": entry.decision_id,
        "decided_by": entry.decided_by,
        "source": entry.source,
        "version": match.version,
    }


def banked_labels(entry: BankEntry, tasks: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """The Label's per-task labels from a banked verdict (0: the task's negative label, the
    first of its label set; 1: its positive one). No score and no threshold: a person decided.
    Tasks of the serving model the entry does not cover, or whose labels are not binary, carry
    no decision (label None) rather than a guess."""
    out: dict[str, dict[str, Any]] = {}
    for task, labels in tasks.items():
        verdict = entry.verdicts.get(task)
        known = verdict is not None and len(labels) == 2
        out[task] = {
            "label": labels[verdict] if known and verdict is not None else None,
            "decision": bool(verdict) if known else None,
            "score": None,
            "threshold": None,
            "source": "bank",
        }
    return out
