"""A micro-batch's outcomes onto the broker: every post ends as exactly one label or one
dead letter there before the agent returns and faust acks its offsets.

A send that fails for a reason that can pass (broker down, leader moving, buffer full) is
retried until it works: the agent stalls, which is the backpressure we want, and
`modstream_worker_send_blocked` says so. A send that can never succeed (the record is over
the producer's or the broker's size limit) is not retried: its post becomes a dead letter
at stage `sink`, and a dead letter that is itself refused is cut to a 1 KiB prefix. Before
this, one oversized dead letter was retried forever and every later post waited behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from modstream.records import DeadLetter, encode, parse_iso
from stream import metrics
from stream.pipeline import Outcome, count_finished

log = logging.getLogger(__name__)

# What a dead letter the broker refused keeps of its input on the second try.
LAST_RESORT_KEEP = 1024


def is_permanent(exc: BaseException) -> bool:
    """True when resending the same record can never succeed: it is too large for the
    producer or the broker. faust wraps aiokafka's error in ProducerSendError, so the whole
    chain of causes is read."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

    permanent = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, permanent):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


async def send_all(
    topic: Any, records: Sequence[tuple[str | None, bytes]], retry_s: float, name: str = "output"
) -> list[tuple[int, BaseException]]:
    """Sends every record and waits for the broker's acks; retries transient failures until
    they pass. Returns (index into `records`, error) for those that can never be sent."""
    pending = list(range(len(records)))
    refused: list[tuple[int, BaseException]] = []
    try:
        while pending:
            results: list[Any] = []
            for i in pending:
                key, value = records[i]
                try:  # send() itself can raise (buffer full, broker gone, too large), not only its future
                    results.append(await topic.send(key=key.encode() if key else None, value=value, force=True))
                except Exception as exc:
                    results.append(exc)
            futures = [r for r in results if not isinstance(r, BaseException)]
            acked = iter(await asyncio.gather(*futures, return_exceptions=True))
            outcomes = [r if isinstance(r, BaseException) else next(acked) for r in results]
            retry: list[int] = []
            for i, result in zip(pending, outcomes, strict=True):
                if not isinstance(result, BaseException):
                    continue
                if is_permanent(result):
                    refused.append((i, result))
                else:
                    retry.append(i)
            if retry:
                errors = [r for r in outcomes if isinstance(r, BaseException) and not is_permanent(r)]
                metrics.DEPENDENCY_ERRORS.labels("kafka", "send").inc(len(retry))
                metrics.SEND_BLOCKED.labels(name).set(1)
                log.warning("%d sends to %s failed (%r); retrying in %.1f s", len(retry), name, errors[0], retry_s)
                await asyncio.sleep(retry_s)
            pending = retry
    finally:
        metrics.SEND_BLOCKED.labels(name).set(0)
    return refused


def _refused(outcome: Outcome, what: str, exc: BaseException) -> None:
    """The broker will never take this post's `what`: the post becomes a dead letter."""
    post_id = outcome.post.id if outcome.post is not None else None
    log.error("the %s of post %s can never be sent (%r): dead-lettering the post", what, post_id, exc)
    outcome.label = outcome.review = None
    outcome.dead_letter = DeadLetter.from_raw(outcome.raw, "sink", f"too_large: {what} refused ({exc!r})", post_id)


async def write_outcomes(topics: dict[str, Any], outcomes: Sequence[Outcome], retry_s: float) -> None:
    """Review items, then labels (a post with a label has had its review item written), then
    dead letters, including those of posts whose outputs the broker refused."""
    routed = [o for o in outcomes if o.dead_letter is None and o.label is not None and o.review is not None]
    review_records = [(o.review.post_id, encode(o.review)) for o in routed if o.review is not None]
    for i, exc in await send_all(topics["review"], review_records, retry_s, "review"):
        _refused(routed[i], "review item", exc)

    labelled = [o for o in outcomes if o.dead_letter is None and o.label is not None]
    label_records = [(o.label.post_id, encode(o.label)) for o in labelled if o.label is not None]
    for i, exc in await send_all(topics["labels"], label_records, retry_s, "labels"):
        _refused(labelled[i], "label", exc)

    dead = [o for o in outcomes if o.dead_letter is not None]
    letters = [o.dead_letter for o in dead if o.dead_letter is not None]
    refused = await send_all(topics["dlq"], [(d.post_id, encode(d)) for d in letters], retry_s, "dlq")
    if refused:
        cut = [
            DeadLetter.from_raw(
                dead[i].raw,
                letters[i].stage,
                f"{letters[i].reason}; raw cut to {LAST_RESORT_KEEP} bytes: the dead letter was refused ({exc!r})",
                letters[i].post_id,
                keep=LAST_RESORT_KEEP,
            )
            for i, exc in refused
        ]
        for (i, _), letter in zip(refused, cut, strict=True):
            dead[i].dead_letter = letter
        for j, exc in await send_all(topics["dlq"], [(d.post_id, encode(d)) for d in cut], retry_s, "dlq"):
            # Only a broker whose record limit is under a few KiB gets here: say so loudly.
            lost = dead[refused[j][0]]
            log.critical("post %s is lost: even a 1 KiB dead letter was refused (%r)", cut[j].post_id, exc)
            lost.dead_letter = None
            metrics.POSTS.labels("lost").inc()
    count_finished(outcomes)
    observe_labels_sent(outcomes)


def _created_at(outcome: Outcome) -> float | None:
    """The post's created_at as a Unix time, for the produce-to-label latency (None: not given)."""
    stamp = outcome.post.created_at if outcome.post is not None else None
    if not stamp:
        return None
    try:
        return parse_iso(stamp).timestamp()
    except ValueError:
        return None


def observe_labels_sent(outcomes: Sequence[Outcome]) -> None:
    """After the broker acked the labels: counts per model version and produce-to-label latency."""
    now = time.time()
    for o in outcomes:
        if o.label is None or o.dead_letter is not None:
            continue
        metrics.LABELS.labels(o.label.model_version, o.label.route).inc()
        if o.label.route == "bank_match":  # a person's banked verdict, not the model's decisions
            continue
        for task, value in o.label.labels.items():
            decision = "positive" if value.get("decision") else "negative"
            metrics.TASK_DECISIONS.labels(o.label.model_version, task, decision).inc()
        created = _created_at(o)
        if created is not None:
            metrics.PRODUCE_TO_LABEL.observe(max(0.0, now - created))


def dead_letter_batch(raws: Sequence[bytes], exc: BaseException) -> list[Outcome]:
    """The last line of defence of the agent: a batch whose processing raised (a bug) becomes
    dead letters, one per input, rather than an exception that faust would ack past."""
    return [Outcome(raw, dead_letter=DeadLetter.from_raw(raw, "classify", f"internal error: {exc!r}")) for raw in raws]
