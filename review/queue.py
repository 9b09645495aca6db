"""Review claims on the Redis stream `modstream:review` through the consumer group `reviewers`.

Each reviewer is a consumer of the group, so XREADGROUP hands an entry to exactly one of
them. What a claim does, in order:

1. the reviewer's own pending entry comes back first (XPENDING for that consumer, then a
   renewal: see below), so a page reload never grabs a second item;
2. else an entry abandoned longer than `claim_timeout_s` is taken over (XAUTOCLAIM, which
   counts a delivery); one delivered more than `max_deliveries` times goes to the dead-letter
   stream instead (XADD + XACK in one MULTI), so a poison item cannot cycle forever;
3. else a new entry (XREADGROUP `>`).

An entry whose post already has a decision (the `decided:` marker written right after the
decision reached Kafka, before XACK) is acked and passed over: that covers a crash between
the produce and the XACK, and items decided in Label Studio. Pending entries are never
trimmed; the dead-letter stream keeps the entry, its delivery count and the reason.

A claim idle longer than the timeout can be taken over, so a reviewer still working on it
renews it: `renew` (the console page's heartbeat, every claim_timeout/3, and the submit path
right before the decision is produced) resets the entry's idle clock, but only if the caller
still holds it. The owner check and the XCLAIM
... JUSTID to the caller run in one Lua script, so a renewal can never take an entry back
from a reviewer whose XAUTOCLAIM got there first. `complete`, `release` and `escalate` check
the owner in the same script as their writes: a reviewer who lost the claim is refused
(NotClaimed) and nothing is marked, acked or copied, so the entry stays pending for its
holder.

A decision that labels nothing does not end an item: a skip puts it back at the end of the
queue for someone else (`release`), an escalation moves it to the escalated stream for
admins (`escalate`), so neither loses it.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from modstream.records import RecordError, ReviewItem, encode

STREAM = "modstream:review"
GROUP = "reviewers"
DEAD = "modstream:review:dead"
ESCALATED = "modstream:review:escalated"  # items a reviewer escalated, for admins (or a T&S lead)
DECISIONS_WINDOW_S = 3600
DECISIONS_KEEP_S = 24 * 3600
# Double review (review/agreement.py): after the first of two blind reviews the entry stays
# pending, parked under this consumer (not a possible user name: those start with a letter or
# digit) until a different reviewer claims it; its first verdict waits in `pair:<post id>`.
PARKED = "~second-review"
SECOND_SCAN = 200  # parked entries a claim looks through for one its caller did not review first
PAIRS_KEEP = 100_000  # finished pairs kept for agreement statistics (their own stream, trimmed)
GOLD_RESULTS_KEEP = 100_000


class QueueError(RuntimeError):
    """A claim or acknowledgement that cannot be done (the message says why)."""


class NotClaimed(QueueError):
    """The entry is not (or no longer) claimed by this reviewer."""


_ENTRY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")

# Every script starts with the same owner check: XPENDING for the one entry, its consumer
# compared with the caller. Inside a script nothing can run in between (no XAUTOCLAIM by
# another reviewer), so the check and the writes that follow are one step.
_OWNER_CHECK = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local owner = ''
if #rows > 0 then owner = rows[1][2] end
if owner ~= ARGV[3] then return {0, owner} end
"""

# KEYS: stream. ARGV: group, entry id, reviewer. XCLAIM with min-idle 0 and JUSTID resets
# the idle clock without counting a delivery; it drops an entry deleted from the stream.
_RENEW = (
    _OWNER_CHECK
    + """
local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
if #got == 0 then return {0, ''} end
return {1, owner}
"""
)

# KEYS: stream, decided marker, decisions zset. ARGV: group, entry id, reviewer, decision id,
# marker ttl, now, zset member, cutoff. The marker first, then XACK, as `complete` documents.
_COMPLETE = (
    _OWNER_CHECK
    + """
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], 0, ARGV[8])
return {1, owner}
"""
)

# KEYS: stream. ARGV: group, entry id, reviewer. A fresh entry at the end with the same
# post_id and item, the old one acked; {-1, ''} when the entry is gone from the stream.
_RELEASE = (
    _OWNER_CHECK
    + """
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entries == 0 then return {-1, ''} end
local flat = entries[1][2]
local fields = {post_id = '', item = '', prior = '0'}
for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
-- The new entry carries the deliveries of every entry before it, so an item every reviewer
-- skips reaches the dead-letter stream after max_deliveries instead of cycling forever.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local delivered = 1
if #pending > 0 then delivered = tonumber(pending[1][4]) end
local prior = (tonumber(fields['prior']) or 0) + delivered
local new_id = redis.call('XADD', KEYS[1], '*', 'post_id', fields['post_id'], 'item', fields['item'],
  'prior', tostring(prior))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return {1, new_id}
"""
)

# KEYS: stream, escalated stream. ARGV: group, entry id, reviewer, decision id, note, time.
_ESCALATE = (
    _OWNER_CHECK
    + """
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local fields = {post_id = '', item = ''}
if #entries > 0 then
  local flat = entries[1][2]
  for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
end
redis.call('XADD', KEYS[2], '*', 'post_id', fields['post_id'], 'item', fields['item'], 'entry_id', ARGV[2],
  'reviewer', ARGV[3], 'decision_id', ARGV[4], 'note', ARGV[5], 'escalated_at', ARGV[6])
return {1, owner}
"""
)


# KEYS: escalated stream, decided marker, decisions zset. ARGV: escalation id, decision id,
# marker ttl, now, zset member, cutoff. An admin's final decision (already on Kafka): the
# entry leaves the escalated stream and the post is marked decided in one step, so a second
# admin settling the same entry gets 0 and changes nothing.
_SETTLE = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], 0, ARGV[6])
return 1
"""


# KEYS: stream, pair key, decisions zset. ARGV: group, entry id, reviewer, decision id, the first
# reviewer's labels (JSON), item kind, now, zset member, cutoff, pair ttl, parked consumer.
# The first of two reviews: its verdict is kept for the second, the entry is parked (pending,
# not acked, no decided marker), and the decision counts like any other. XCLAIM passes over an
# entry that is not pending (undelivered: `_accept` parks it when its first reviewer meets it).
_FIRST_BODY = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'state', 'first', 'first_reviewer', ARGV[3], 'first_decision_id', ARGV[4],
  'first_labels', ARGV[5], 'kind', ARGV[6], 'first_at', ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[10])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[11], 0, ARGV[2], 'JUSTID')
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[3], 0, ARGV[9])
return {1, owner}
"""
_FIRST_DONE = _OWNER_CHECK + _FIRST_BODY
# The same for a first review made without a claim (a Label Studio import: the caller checked
# that no console reviewer holds the entry): refused ({0, state}) when the post already has a
# double review, so it cannot overwrite someone's first review or a finished pair.
_FIRST_IMPORTED = (
    """
local owner = ''
local state = redis.call('HGET', KEYS[2], 'state')
if state then return {0, state} end
"""
    + _FIRST_BODY
)

# KEYS: stream. ARGV: group, reviewer, parked consumer, pair key prefix, scan count. The first
# parked entry whose first review is not the caller's, claimed for the caller (a delivery).
_TAKE_SECOND = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[5]), ARGV[3])
for _, row in ipairs(rows) do
  local id = row[1]
  local entries = redis.call('XRANGE', KEYS[1], id, id)
  if #entries == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local flat = entries[1][2]
    local post = ''
    for i = 1, #flat, 2 do if flat[i] == 'post_id' then post = flat[i + 1] end end
    if redis.call('HGET', ARGV[4] .. post, 'first_reviewer') ~= ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
      return id
    end
  end
end
return false
"""

# KEYS: stream, decided marker, decisions zset, pair key, pairs stream, escalated stream.
# ARGV: group, entry id, reviewer, decision id, marker ttl, now, zset member, cutoff, outcome
# (agreed | disagreed | second), second labels (JSON), pairs kept, escalation note, now in ms.
# The second review ends the item as `complete` does; the pair's outcome is recorded for the
# agreement statistics, and a disagreement is copied to the escalated stream for an admin, all
# in one step after the owner check.
_SECOND_BODY = """
local pair = redis.call('HMGET', KEYS[4], 'first_reviewer', 'first_labels', 'kind', 'first_decision_id')
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local fields = {post_id = '', item = ''}
if #entries > 0 then
  local flat = entries[1][2]
  for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
end
if ARGV[9] == 'disagreed' then
  redis.call('XADD', KEYS[6], '*', 'post_id', fields['post_id'], 'item', fields['item'], 'entry_id', ARGV[2],
    'reviewer', ARGV[3], 'decision_id', ARGV[4], 'note', ARGV[12], 'escalated_at', ARGV[13],
    'double_review', '1', 'first_reviewer', pair[1] or '', 'first_decision_id', pair[4] or '')
end
if ARGV[9] ~= 'second' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[11], '*', 'post_id', fields['post_id'], 'kind', pair[3] or '',
    'first_reviewer', pair[1] or '', 'second_reviewer', ARGV[3], 'first_labels', pair[2] or '{}',
    'second_labels', ARGV[10], 'outcome', ARGV[9], 'at', ARGV[6])
end
redis.call('HSET', KEYS[4], 'state', ARGV[9], 'second_reviewer', ARGV[3], 'second_decision_id', ARGV[4])
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], 0, ARGV[8])
return {1, owner}
"""
_SECOND_DONE = _OWNER_CHECK + _SECOND_BODY
# The same for a second review made without a claim (a Label Studio import): only while the
# pair waits for its second review and only by someone other than its first reviewer, else
# {0, state} and nothing changes. XACK is a no-op on an entry not pending (an undelivered one is
# acked by the claim that meets it: the decided marker).
_SECOND_IMPORTED = (
    """
local owner = ''
local state = redis.call('HGET', KEYS[4], 'state')
if state ~= 'first' or redis.call('HGET', KEYS[4], 'first_reviewer') == ARGV[3] then return {0, state or ''} end
"""
    + _SECOND_BODY
)

# KEYS: stream, decisions zset, gold results stream. ARGV: group, entry id, reviewer, now, zset
# member, cutoff, results kept, post id, result (JSON). An answer to a gold item: acked and
# counted, its score recorded; no decided marker (an admin may put the item in the queue again).
_GOLD_DONE = (
    _OWNER_CHECK
    + """
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'post_id', ARGV[8], 'reviewer', ARGV[3],
  'result', ARGV[9], 'at', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, ARGV[6])
return {1, owner}
"""
)


@dataclass
class Pair:
    """A post's double review as Redis holds it (`state`: first, then agreed, disagreed or
    second, then settled once an admin decides a disagreement)."""

    state: str
    first_reviewer: str
    first_decision_id: str
    first_labels: dict[str, str | None]
    kind: str = "routed"


@dataclass
class Claim:
    """One review item handed to one reviewer: `entry_id` names it in the stream."""

    entry_id: str
    item: ReviewItem
    reviewer: str
    deliveries: int
    reclaimed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id,
            "reviewer": self.reviewer,
            "deliveries": self.deliveries,
            "item": self.item.blinded(),  # an audit item without the model's output
        }


@dataclass
class QueueStats:
    depth: int  # entries not yet delivered + delivered but not acked
    undelivered: int
    pending: int
    oldest_age_s: float | None
    decisions_last_hour: int
    per_reviewer_last_hour: dict[str, int] = field(default_factory=dict)
    pending_per_reviewer: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    escalated: int = 0  # open escalations, waiting for an admin

    def to_json(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "undelivered": self.undelivered,
            "pending": self.pending,
            "oldest_age_s": self.oldest_age_s,
            "decisions_last_hour": self.decisions_last_hour,
            "per_reviewer_last_hour": self.per_reviewer_last_hour,
            "pending_per_reviewer": self.pending_per_reviewer,
            "dead_letters": self.dead_letters,
            "escalated": self.escalated,
        }


@dataclass
class QueueEvents:
    """What a claim did, for metrics: fresh claims, takeovers, dead-lettered entries."""

    claims: int = 0
    reclaims: int = 0
    dead_lettered: int = 0
    skipped_decided: int = 0


def _int(value: Any) -> int:
    """A stream field as a count (absent or unreadable: 0)."""
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    return {_str(k): _str(v) for k, v in dict(raw).items()}


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


class ReviewQueue:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        dead: str = DEAD,
        escalated: str = ESCALATED,
        prefix: str = "modstream",
        claim_timeout_s: float = 300.0,
        max_deliveries: int = 5,
        decided_ttl_s: int = 30 * 24 * 3600,
    ) -> None:
        if claim_timeout_s <= 0:
            raise ValueError("claim_timeout_s must be positive")
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.client = client
        self.stream = stream
        self.group = group
        self.dead = dead
        self.escalated_stream = escalated
        self.prefix = prefix
        self.claim_timeout_ms = int(claim_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.decided_ttl_s = decided_ttl_s
        self.decisions_key = f"{prefix}:review:decisions"
        self.pair_prefix = f"{prefix}:review:pair:"
        self.pairs_stream = f"{prefix}:review:pairs"
        self.gold_key = f"{prefix}:review:gold"
        self.gold_results = f"{prefix}:review:gold:results"
        self.events = QueueEvents()
        self._renew_script = client.register_script(_RENEW)
        self._complete_script = client.register_script(_COMPLETE)
        self._release_script = client.register_script(_RELEASE)
        self._escalate_script = client.register_script(_ESCALATE)
        self._settle_script = client.register_script(_SETTLE)
        self._first_done_script = client.register_script(_FIRST_DONE)
        self._take_second_script = client.register_script(_TAKE_SECOND)
        self._second_done_script = client.register_script(_SECOND_DONE)
        self._first_imported_script = client.register_script(_FIRST_IMPORTED)
        self._second_imported_script = client.register_script(_SECOND_IMPORTED)
        self._gold_done_script = client.register_script(_GOLD_DONE)

    # redis-py's stream replies are loosely typed (bytes or str, optional lists): normalise once.
    async def _range(self, key: str, start: str, end: str = "+", count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        rows: Any = await self.client.xrange(key, start, end, count=count)
        return [(_str(i), _fields(f)) for i, f in rows or []]

    async def _pending_rows(
        self, start: str, end: str, count: int, consumer: str | None = None
    ) -> list[dict[str, Any]]:
        rows: Any = await self.client.xpending_range(self.stream, self.group, start, end, count, consumername=consumer)
        return [
            {
                "id": _str(r["message_id"]),
                "consumer": _str(r["consumer"]),
                "deliveries": int(r["times_delivered"]),
                "idle_ms": int(r.get("time_since_delivered", 0)),
            }
            for r in rows or []
        ]

    def decided_key(self, post_id: str) -> str:
        return f"{self.prefix}:review:decided:{post_id}"

    async def ensure_group(self) -> None:
        """Create the group from the start of the stream (MKSTREAM); an existing one is kept."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- claims ---------------------------------------------------------------------------

    async def claim(self, reviewer: str) -> Claim | None:
        """The reviewer's own pending item, else an abandoned one, else a new one; None when empty."""
        own = await self.own_pending(reviewer)
        if own is not None:
            return own
        second = await self._take_second(reviewer)
        if second is not None:
            return second
        taken = await self._reclaim(reviewer)
        if taken is not None:
            return taken
        return await self._read_new(reviewer)

    async def own_pending(self, reviewer: str) -> Claim | None:
        for row in await self._pending_rows("-", "+", 10, reviewer):
            entry_id = row["id"]
            # The reviewer is back: reset the idle clock, unless another reviewer took the
            # entry over since XPENDING listed it (then it is theirs now).
            if not await self.renew(entry_id, reviewer):
                continue
            claim = await self._load(entry_id, reviewer, row["deliveries"])
            if claim is not None:
                return claim
        return None

    async def _oldest_stale(self) -> str | None:
        """The first entry idle past the claim timeout (XPENDING IDLE scans the PEL server-side,
        so a large PEL of fresh claims costs one round trip, not many XAUTOCLAIM passes)."""
        rows: Any = await self.client.xpending_range(self.stream, self.group, "-", "+", 1, idle=self.claim_timeout_ms)
        return _str(rows[0]["message_id"]) if rows else None

    async def _reclaim(self, reviewer: str) -> Claim | None:
        cursor = await self._oldest_stale()
        for _ in range(100):  # bounded: each pass either claims, dead-letters or advances
            if cursor is None:
                return None
            result: Any = await self.client.xautoclaim(
                self.stream, self.group, reviewer, self.claim_timeout_ms, start_id=cursor, count=1
            )
            cursor = _str(result[0])
            entries = result[1]
            for deleted in result[2] if len(result) > 2 else []:  # entries gone from the stream
                await self.client.xack(self.stream, self.group, _str(deleted))
            for entry_id_raw, raw_fields in entries:
                entry_id = _str(entry_id_raw)
                deliveries = await self._deliveries(entry_id)
                if deliveries > self.max_deliveries:
                    await self._dead_letter(entry_id, _fields(raw_fields), deliveries, "max_deliveries")
                    continue
                claim = await self._accept(entry_id, _fields(raw_fields), reviewer, deliveries)
                if claim is not None:
                    claim.reclaimed = True
                    self.events.reclaims += 1
                    return claim
            if cursor == "0-0":  # end of the PEL: look again (another reviewer may have won a race)
                cursor = await self._oldest_stale()
        return None

    async def _read_new(self, reviewer: str) -> Claim | None:
        for _ in range(100):
            result: Any = await self.client.xreadgroup(self.group, reviewer, {self.stream: ">"}, count=1)
            if not result:
                return None
            for _stream, entries in result:
                for entry_id_raw, raw_fields in entries:
                    claim = await self._accept(_str(entry_id_raw), _fields(raw_fields), reviewer, 1)
                    if claim is not None:
                        self.events.claims += 1
                        return claim
        return None

    async def _accept(self, entry_id: str, fields: dict[str, str], reviewer: str, deliveries: int) -> Claim | None:
        """A Claim for a delivered entry, or None after acking one that needs no review.
        `deliveries` counts this entry's; a skipped item's earlier entries add theirs (`prior`)."""
        if not fields:  # deleted from the stream while pending
            await self.client.xack(self.stream, self.group, entry_id)
            return None
        deliveries += _int(fields.get("prior"))
        if deliveries > self.max_deliveries:
            await self._dead_letter(entry_id, fields, deliveries, "max_deliveries")
            return None
        try:
            item = ReviewItem.from_json(fields.get("item", ""))
        except RecordError as exc:
            await self._dead_letter(entry_id, fields, deliveries, f"bad_item: {exc}")
            return None
        if await self.client.exists(self.decided_key(item.post_id)):
            await self.client.xack(self.stream, self.group, entry_id)
            self.events.skipped_decided += 1
            return None
        pair = await self.pair(item.post_id)
        if pair is not None and pair.state == "first" and pair.first_reviewer == reviewer:
            await self._park(entry_id)  # never one's own second reviewer: left for someone else
            return None
        return Claim(entry_id, item, reviewer, deliveries)

    async def _load(self, entry_id: str, reviewer: str, deliveries: int) -> Claim | None:
        rows = await self._range(self.stream, entry_id, entry_id, count=1)
        fields = rows[0][1] if rows else {}
        return await self._accept(entry_id, fields, reviewer, deliveries)

    async def _deliveries(self, entry_id: str) -> int:
        rows = await self._pending_rows(entry_id, entry_id, 1)
        return int(rows[0]["deliveries"]) if rows else 0

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], deliveries: int, reason: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(
            self.dead,
            {
                "post_id": fields.get("post_id", ""),
                "item": fields.get("item", ""),
                "entry_id": entry_id,
                "deliveries": str(deliveries),
                "reason": reason,
                "dead_at": str(int(time.time() * 1000)),
            },
        )
        pipe.xack(self.stream, self.group, entry_id)
        await pipe.execute()
        self.events.dead_lettered += 1

    # -- double review and gold items (review/agreement.py) -----------------------------------

    def pair_key(self, post_id: str) -> str:
        return self.pair_prefix + post_id

    async def pair(self, post_id: str) -> Pair | None:
        """The post's double review, None when it has none."""
        raw: Any = await self.client.hgetall(self.pair_key(post_id))
        fields = _fields(raw)
        if not fields.get("state"):
            return None
        try:
            labels = json.loads(fields.get("first_labels") or "{}")
        except ValueError:
            labels = {}
        return Pair(
            state=fields["state"],
            first_reviewer=fields.get("first_reviewer", ""),
            first_decision_id=fields.get("first_decision_id", ""),
            first_labels=labels if isinstance(labels, dict) else {},
            kind=fields.get("kind", "routed"),
        )

    async def _park(self, entry_id: str) -> None:
        """Hand a second-review entry back to the parked consumer, undoing the delivery the
        caller's read counted (so its first reviewer meeting it again never dead-letters it)."""
        count = max(0, await self._deliveries(entry_id) - 1)
        # redis-py's xclaim, not a raw XCLAIM: its reply parser for the raw command expects whole
        # entries and raised TypeError on JUSTID's bare ids (the claim failed with a 500).
        await self.client.xclaim(self.stream, self.group, PARKED, 0, [entry_id], retrycount=count, justid=True)

    async def _take_second(self, reviewer: str) -> Claim | None:
        """A parked entry whose first review was not `reviewer`'s, claimed for them."""
        for _ in range(10):  # an entry decided meanwhile is acked by _accept: look again
            found: Any = await self._take_second_script(
                keys=[self.stream], args=[self.group, reviewer, PARKED, self.pair_prefix, SECOND_SCAN]
            )
            if not found:
                return None
            entry_id = _str(found)
            claim = await self._load(entry_id, reviewer, await self._deliveries(entry_id))
            if claim is not None:
                self.events.claims += 1
                return claim
        return None

    async def first_review_done(
        self,
        entry_id: str,
        post_id: str,
        reviewer: str,
        decision_id: str,
        labels: dict[str, str | None],
        kind: str,
        *,
        claimed: bool = True,
    ) -> None:
        """After the first of two reviews is on Kafka: keep its verdict for the pair and park the
        entry for a different reviewer (owner-checked like `complete`: NotClaimed changes nothing).
        `claimed=False` for a decision made without a claim (Label Studio): no owner check, but
        QueueError, changing nothing, when the post has a double review already."""
        now = time.time()
        keys = [self.pair_key(post_id), self.decisions_key]
        args = [
            decision_id,
            json.dumps(labels, sort_keys=True),
            kind,
            now,
            f"{decision_id}:{reviewer}",
            now - DECISIONS_KEEP_S,
            self.decided_ttl_s,
            PARKED,
        ]
        script = self._first_done_script if claimed else self._first_imported_script
        status, owner = await self._owned(script, entry_id, reviewer, keys, args)
        if status != 1 and not claimed:
            raise QueueError(f"post {post_id} has a double review already ({owner}): nothing was recorded")
        if status != 1:
            raise NotClaimed(self._lost(entry_id, reviewer, owner) + "; nothing was recorded in the queue")

    async def second_review_done(
        self,
        entry_id: str,
        post_id: str,
        reviewer: str,
        decision_id: str,
        outcome: str,
        labels: dict[str, str | None],
        note: str,
        *,
        claimed: bool = True,
    ) -> None:
        """After the second review is on Kafka: the item ends (decided marker, XACK), the pair's
        outcome is recorded, and a disagreement goes to the escalated stream, in one step that
        first checks `reviewer` holds the entry (NotClaimed: nothing changed). `claimed=False`
        for a decision made without a claim (Label Studio): instead of the owner check, QueueError,
        changing nothing, unless the pair waits for its second review and `reviewer` is not its
        first reviewer."""
        if outcome not in ("agreed", "disagreed", "second"):
            raise ValueError(f"unknown double-review outcome {outcome!r}")
        now = time.time()
        keys = [
            self.decided_key(post_id),
            self.decisions_key,
            self.pair_key(post_id),
            self.pairs_stream,
            self.escalated_stream,
        ]
        args = [
            decision_id,
            self.decided_ttl_s,
            now,
            f"{decision_id}:{reviewer}",
            now - DECISIONS_KEEP_S,
            outcome,
            json.dumps(labels, sort_keys=True),
            PAIRS_KEEP,
            note,
            str(int(now * 1000)),
        ]
        script = self._second_done_script if claimed else self._second_imported_script
        status, owner = await self._owned(script, entry_id, reviewer, keys, args)
        if status != 1 and not claimed:
            raise QueueError(f"post {post_id} is not waiting for a second review by {reviewer} ({owner or 'no pair'})")
        if status != 1:
            raise NotClaimed(self._lost(entry_id, reviewer, owner) + "; nothing was acknowledged")

    async def pair_settled(self, post_id: str, admin: str, decision_id: str) -> None:
        """An admin decided the pair's escalation (the settlement is the decision that trains)."""
        key = self.pair_key(post_id)
        if await self.client.exists(key):
            await self.client.hset(
                key, mapping={"state": "settled", "settled_by": admin, "settled_decision_id": decision_id}
            )

    async def pairs(self, count: int = 5000) -> list[dict[str, Any]]:
        """The newest finished pairs (first and second reviewer, their labels, the outcome)."""
        rows: Any = await self.client.xrevrange(self.pairs_stream, "+", "-", count=count)
        out = []
        for entry_id, raw in rows or []:
            fields = _fields(raw)
            try:
                first, second = (
                    json.loads(fields.get("first_labels", "{}")),
                    json.loads(fields.get("second_labels", "{}")),
                )
            except ValueError:
                continue
            if isinstance(first, dict) and isinstance(second, dict):
                out.append({**fields, "id": _str(entry_id), "first_labels": first, "second_labels": second})
        return out

    async def gold(self, post_id: str) -> dict[str, Any] | None:
        """The gold item's definition ({"expected": {task: label}, "added_by", ...}), or None."""
        raw = await self.client.hget(self.gold_key, post_id)
        if raw is None:
            return None
        try:
            found = json.loads(_str(raw))
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    async def gold_items(self) -> dict[str, dict[str, Any]]:
        raw: Any = await self.client.hgetall(self.gold_key)
        out: dict[str, dict[str, Any]] = {}
        for key, value in _fields(raw).items():
            with contextlib.suppress(ValueError):
                found = json.loads(value)
                if isinstance(found, dict):
                    out[key] = found
        return out

    async def add_gold(self, item: ReviewItem, definition: dict[str, Any]) -> str:
        """Define a gold item and put it in the queue (one entry); returns the entry id."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.gold_key, item.post_id, json.dumps(definition, sort_keys=True))
        pipe.xadd(self.stream, {"post_id": item.post_id, "item": encode(item).decode()})
        _, entry_id = await pipe.execute()
        return _str(entry_id)

    async def remove_gold(self, post_id: str) -> bool:
        return bool(await self.client.hdel(self.gold_key, post_id))

    async def gold_done(
        self, entry_id: str, post_id: str, reviewer: str, decision_id: str, result: dict[str, Any]
    ) -> None:
        """After an answer to a gold item is on Kafka: record its score and ack the entry
        (owner-checked: NotClaimed changes nothing)."""
        now = time.time()
        args = [now, f"{decision_id}:{reviewer}", now - DECISIONS_KEEP_S, GOLD_RESULTS_KEEP, post_id,
                json.dumps(result, sort_keys=True)]  # fmt: skip
        status, owner = await self._owned(
            self._gold_done_script, entry_id, reviewer, [self.decisions_key, self.gold_results], args
        )
        if status != 1:
            raise NotClaimed(self._lost(entry_id, reviewer, owner) + "; nothing was acknowledged")

    async def gold_answers(self, count: int = 5000) -> list[dict[str, Any]]:
        """The newest answers to gold items: reviewer, post id, result {task: {expected, given}}."""
        rows: Any = await self.client.xrevrange(self.gold_results, "+", "-", count=count)
        out = []
        for _, raw in rows or []:
            fields = _fields(raw)
            with contextlib.suppress(ValueError):
                result = json.loads(fields.get("result", "{}"))
                if isinstance(result, dict):
                    out.append({**fields, "result": result})
        return out

    # -- ownership and acknowledgement -------------------------------------------------------

    async def holder(self, entry_id: str) -> str | None:
        """The reviewer whose claim on `entry_id` is live (pending, idle less than the claim
        timeout), or None: an abandoned claim is anyone's to take."""
        rows = await self._pending_rows(entry_id, entry_id, 1)
        if rows and rows[0]["idle_ms"] < self.claim_timeout_ms:
            return str(rows[0]["consumer"])
        return None

    async def owner(self, entry_id: str) -> str | None:
        """The consumer holding `entry_id`, or None when it is not pending."""
        rows = await self._pending_rows(entry_id, entry_id, 1)
        return str(rows[0]["consumer"]) if rows else None

    async def _owned(
        self, script: Any, entry_id: str, reviewer: str, keys: list[str], args: list[Any]
    ) -> tuple[int, str]:
        """Runs one of the owner-checked scripts: (status, owner or new id). Status 1 means the
        writes were done; 0 that `reviewer` does not hold the entry (nothing was written)."""
        if not _ENTRY_ID.match(entry_id):
            raise NotClaimed(f"{entry_id!r} is not a review item id")
        result: Any = await script(keys=[self.stream, *keys], args=[self.group, entry_id, reviewer, *args])
        return int(result[0]), _str(result[1])

    @staticmethod
    def _lost(entry_id: str, reviewer: str, owner: str) -> str:
        where = f"it was reassigned to {owner}" if owner else "it is no longer pending (decided or put back)"
        return f"item {entry_id} is no longer claimed by {reviewer}: {where}"

    async def renew(self, entry_id: str, reviewer: str) -> bool:
        """Reset the entry's idle clock if `reviewer` still holds it (the heartbeat); False,
        changing nothing, when they do not (taken over, acked, deleted, or not an id)."""
        try:
            status, _ = await self._owned(self._renew_script, entry_id, reviewer, [], [])
        except NotClaimed:
            return False
        return status == 1

    # -- one submit at a time per item -----------------------------------------------------

    SUBMIT_LOCK_MS = 120_000  # past any produce (its timeout is 30 s): a crashed submit frees it

    def _submitting_key(self, entry_id: str) -> str:
        return f"{self.prefix}:review:submitting:{entry_id}"

    async def begin_submit(self, entry_id: str, decision_id: str) -> str | None:
        """Claims the right to record a decision on `entry_id`: None when granted, else the
        decision id of the submit already under way (two simultaneous submits of one item made
        two records; now the second is told the first is being recorded)."""
        key = self._submitting_key(entry_id)
        if await self.client.set(key, decision_id, nx=True, px=self.SUBMIT_LOCK_MS):
            return None
        holder = await self.client.get(key)
        return _str(holder) if holder is not None else ""

    async def end_submit(self, entry_id: str, decision_id: str) -> None:
        """Releases `begin_submit`'s claim if it is still this decision's."""
        key = self._submitting_key(entry_id)
        holder = await self.client.get(key)
        if holder is not None and _str(holder) == decision_id:
            await self.client.delete(key)

    async def decided_decision(self, entry_id: str, reviewer: str | None = None) -> tuple[str, str] | None:
        """(post id, decision id) when the post of `entry_id` is decided already, else None: a
        submit that finds its claim gone can tell "already recorded" from "lost". A first review
        waiting for its second counts as recorded for its own reviewer only (anyone else must
        not learn its id: ids derive from the choices, so a guess could be checked against it)."""
        if not _ENTRY_ID.match(entry_id):
            return None
        rows = await self._range(self.stream, entry_id, entry_id, count=1)
        post_id = rows[0][1].get("post_id") if rows else None
        if not post_id:
            return None
        decided = await self.client.get(self.decided_key(post_id))
        if decided is not None:
            return post_id, _str(decided)
        pair = await self.pair(post_id) if reviewer is not None else None
        if pair is not None and pair.state == "first" and pair.first_reviewer == reviewer:
            return post_id, pair.first_decision_id
        return None

    async def hold(self, entry_id: str, reviewer: str) -> None:
        """`renew`, raising NotClaimed when the claim is lost: the submit path calls it right
        before producing the decision, so the claim cannot lapse during the produce."""
        if not await self.renew(entry_id, reviewer):
            owner = await self.owner(entry_id) if _ENTRY_ID.match(entry_id) else None
            raise NotClaimed(self._lost(entry_id, reviewer, owner or ""))

    async def get_claimed(self, entry_id: str, reviewer: str, *, admin: bool = False) -> Claim:
        """The claimed item, if `reviewer` holds it (an admin may look at any pending item)."""
        try:
            rows = await self._pending_rows(entry_id, entry_id, 1)
        except ResponseError as exc:  # not a stream id at all
            raise NotClaimed(f"{entry_id!r} is not a review item id") from exc
        if not rows or (rows[0]["consumer"] != reviewer and not admin):
            raise NotClaimed(f"item {entry_id} is not claimed by {reviewer}")
        entries = await self._range(self.stream, entry_id, entry_id, count=1)
        if not entries or "item" not in entries[0][1]:
            raise NotClaimed(f"item {entry_id} is no longer in the review stream")
        item = ReviewItem.from_json(entries[0][1]["item"])
        return Claim(entry_id, item, rows[0]["consumer"], rows[0]["deliveries"])

    async def complete(self, entry_id: str, post_id: str, reviewer: str, decision_id: str) -> None:
        """After the decision is on Kafka: mark the post decided, XACK, count the decision, in
        one script that first checks `reviewer` still holds the entry. NotClaimed when they do
        not: nothing is marked or acked, and the entry stays pending for its holder."""
        now = time.time()
        keys = [self.decided_key(post_id), self.decisions_key]
        args = [decision_id, self.decided_ttl_s, now, f"{decision_id}:{reviewer}", now - DECISIONS_KEEP_S]
        status, owner = await self._owned(self._complete_script, entry_id, reviewer, keys, args)
        if status != 1:
            raise NotClaimed(self._lost(entry_id, reviewer, owner) + "; nothing was acknowledged")

    async def release(self, entry_id: str, reviewer: str) -> str:
        """A skipped item goes back to the queue for another reviewer: a fresh entry at the end
        (XADD) and the old one acked, in one script, only if `reviewer` holds it (else
        NotClaimed, nothing changed); no decided marker. The new entry keeps the count of
        deliveries so far (`prior`), so skips count toward max_deliveries. Returns the new id."""
        status, value = await self._owned(self._release_script, entry_id, reviewer, [], [])
        if status == -1:
            raise QueueError(f"item {entry_id} is no longer in the review stream")
        if status != 1:
            raise NotClaimed(self._lost(entry_id, reviewer, value) + "; nothing was put back")
        return value

    async def escalate(self, entry_id: str, reviewer: str, decision_id: str, note: str | None) -> None:
        """Copies the item to the escalated stream (who, when, why) before the caller's
        `complete`, only if `reviewer` holds it (else NotClaimed, nothing copied); admins list
        it with `escalated()`. A crash between the two leaves the item pending: it comes back
        after the claim timeout, so nothing is lost (at worst it is escalated twice)."""
        args = [decision_id, note or "", str(int(time.time() * 1000))]
        status, owner = await self._owned(self._escalate_script, entry_id, reviewer, [self.escalated_stream], args)
        if status != 1:
            raise NotClaimed(self._lost(entry_id, reviewer, owner) + "; nothing was escalated")

    async def add_escalation(
        self, entry_id: str, item: ReviewItem, reviewer: str, decision_id: str, note: str | None
    ) -> str:
        """An escalation decided outside the console (Label Studio), on the escalated stream with
        the fields `escalate` writes, for admins to settle; the caller then marks the post
        decided. Returns the escalation's id."""
        fields = {
            "post_id": item.post_id,
            "item": encode(item).decode(),
            "entry_id": entry_id,
            "reviewer": reviewer,
            "decision_id": decision_id,
            "note": note or "",
            "escalated_at": str(int(time.time() * 1000)),
        }
        return _str(await self.client.xadd(self.escalated_stream, fields))  # type: ignore[arg-type]

    async def escalated(self, count: int = 100) -> list[dict[str, Any]]:
        rows: Any = await self.client.xrevrange(self.escalated_stream, "+", "-", count=count)
        return [{"id": _str(i), **_fields(f)} for i, f in rows or []]

    async def escalation(self, escalation_id: str) -> dict[str, Any]:
        """One entry of the escalated stream (as `escalated()` lists them); QueueError when the
        id is malformed or the entry is gone (settled or dismissed by another admin)."""
        if not _ENTRY_ID.match(escalation_id):
            raise QueueError(f"{escalation_id!r} is not an escalation id")
        rows = await self._range(self.escalated_stream, escalation_id, escalation_id, count=1)
        if not rows:
            raise QueueError(f"no open escalation {escalation_id} (settled or dismissed already?)")
        return {"id": rows[0][0], **rows[0][1]}

    async def settle_escalation(self, escalation_id: str, post_id: str, decision_id: str, admin: str) -> None:
        """After the admin's decision is on Kafka: drop the escalation (XDEL) and mark the post
        decided (its marker now names the admin's decision), counted like any decision. Raises
        QueueError, changing nothing, when the entry is already gone."""
        if not _ENTRY_ID.match(escalation_id):
            raise QueueError(f"{escalation_id!r} is not an escalation id")
        now = time.time()
        keys = [self.escalated_stream, self.decided_key(post_id), self.decisions_key]
        args: list[str | int | float] = [
            escalation_id,
            decision_id,
            self.decided_ttl_s,
            now,
            f"{decision_id}:{admin}",
            now - DECISIONS_KEEP_S,
        ]
        if not await self._settle_script(keys=keys, args=args):
            raise QueueError(f"no open escalation {escalation_id} (settled or dismissed already?)")

    async def dismiss_escalation(self, escalation_id: str) -> bool:
        """Drop an escalation without a label; False when it was already gone. The post keeps
        the decided marker its escalation set, so it does not come back for review."""
        if not _ENTRY_ID.match(escalation_id):
            raise QueueError(f"{escalation_id!r} is not an escalation id")
        return bool(await self.client.xdel(self.escalated_stream, escalation_id))

    async def mark_decided(
        self, post_id: str, decision_id: str, reviewer: str, *, entry_id: str | None = None
    ) -> str | None:
        """For decisions made outside the console (Label Studio): mark the post decided and ack
        its entry if it is pending; returns the entry id acked, if any. An undelivered entry is
        acked by the next claim that meets it (the marker makes `_accept` pass it over)."""
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.decided_key(post_id), decision_id, ex=self.decided_ttl_s)
        pipe.zadd(self.decisions_key, {f"{decision_id}:{reviewer}": now})
        await pipe.execute()
        if entry_id is None:
            entry_id = await self.find_entry(post_id)
        if entry_id is not None and await self.owner(entry_id) is not None:
            await self.client.xack(self.stream, self.group, entry_id)
            return entry_id
        return None

    async def find_entry(self, post_id: str, *, batch: int = 1000) -> str | None:
        """The stream entry of a post (scan; used by imports, not on the hot path)."""
        start = "-"
        while True:
            rows = await self._range(self.stream, start, "+", count=batch)
            for entry_id, fields in rows:
                if fields.get("post_id") == post_id:
                    return entry_id
            if len(rows) < batch:
                return None
            start = "(" + rows[-1][0]

    # -- open items (Label Studio export) ----------------------------------------------------

    async def open_items(self, limit: int = 10_000) -> list[tuple[str, ReviewItem]]:
        """Entries not yet acked (pending or undelivered) whose post has no decision, oldest first."""
        info = await self._group_info()
        last = _str(info.get("last-delivered-id", "0-0"))
        pending_ids: list[str] = []
        start = "-"
        while True:
            rows = await self._pending_rows(start, "+", 1000)
            pending_ids += [r["id"] for r in rows]
            if len(rows) < 1000:
                break
            start = "(" + pending_ids[-1]
        out: list[tuple[str, ReviewItem]] = []

        def add(entry_id: str, fields: dict[str, str]) -> None:
            with contextlib.suppress(RecordError):  # unreadable entries are the dead-letter path's job
                out.append((entry_id, ReviewItem.from_json(fields.get("item", ""))))

        for entry_id in pending_ids:
            for found, fields in await self._range(self.stream, entry_id, entry_id, count=1):
                add(found, fields)
        start = "(" + last
        while len(out) < limit:
            more = await self._range(self.stream, start, "+", count=1000)
            for entry_id, fields in more:
                add(entry_id, fields)
            if len(more) < 1000:
                break
            start = "(" + more[-1][0]
        decided = await self.client.mget([self.decided_key(item.post_id) for _, item in out]) if out else []
        return [pair for pair, done in zip(out, decided, strict=True) if done is None][:limit]

    # -- dead letters -----------------------------------------------------------------------

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        rows: Any = await self.client.xrevrange(self.dead, "+", "-", count=count)
        return [{"id": _str(i), **_fields(f)} for i, f in rows or []]

    async def dead_entry(self, dead_id: str) -> dict[str, Any]:
        """One entry of the dead-letter stream; QueueError when the id is malformed or it is gone."""
        if not _ENTRY_ID.match(dead_id):
            raise QueueError(f"{dead_id!r} is not a dead-letter id")
        rows = await self._range(self.dead, dead_id, dead_id, count=1)
        if not rows:
            raise QueueError(f"no dead letter {dead_id}")
        return {"id": rows[0][0], **rows[0][1]}

    async def requeue_dead(self, dead_id: str) -> str:
        """Put a dead-lettered item back on the review stream as a fresh entry."""
        try:
            rows = await self._range(self.dead, dead_id, dead_id, count=1)
        except ResponseError as exc:
            raise QueueError(f"{dead_id!r} is not a dead-letter id") from exc
        if not rows:
            raise QueueError(f"no dead letter {dead_id}")
        fields = rows[0][1]
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.stream, {"post_id": fields.get("post_id", ""), "item": fields.get("item", "")})
        pipe.xdel(self.dead, dead_id)
        new_id, _ = await pipe.execute()
        return _str(new_id)

    async def delete_dead(self, dead_id: str) -> bool:
        try:
            return bool(await self.client.xdel(self.dead, dead_id))
        except ResponseError as exc:
            raise QueueError(f"{dead_id!r} is not a dead-letter id") from exc

    # -- stats ------------------------------------------------------------------------------

    async def _group_info(self) -> dict[str, Any]:
        try:
            groups: Any = await self.client.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            return {}
        for group in groups:
            if _str(group.get("name")) == self.group:
                return {_str(k): v for k, v in group.items()}
        return {}

    async def _undelivered(self, info: dict[str, Any]) -> int:
        lag = info.get("lag")
        if lag is not None:
            return int(lag)
        # Redis cannot tell the lag after deletions in the stream: count what follows the
        # last delivered entry (bounded; only after XDEL or group resets).
        last = _str(info.get("last-delivered-id", "0-0"))
        count, start = 0, "(" + last
        while count < 1_000_000:
            rows = await self._range(self.stream, start, "+", count=10_000)
            count += len(rows)
            if len(rows) < 10_000:
                break
            start = "(" + rows[-1][0]
        return count

    async def stats(self) -> QueueStats:
        info = await self._group_info()
        undelivered = await self._undelivered(info) if info else int(await self.client.xlen(self.stream))
        summary: Any = await self.client.xpending(self.stream, self.group) if info else {"pending": 0}
        pending = int(summary.get("pending", 0))
        oldest_ms: list[int] = []
        if pending and summary.get("min"):
            oldest_ms.append(entry_ms(_str(summary["min"])))
        if undelivered:
            last = _str(info.get("last-delivered-id", "0-0")) if info else "0-0"
            nxt = await self._range(self.stream, "(" + last, "+", count=1)
            if nxt:
                oldest_ms.append(entry_ms(nxt[0][0]))
        now = time.time()
        oldest_age = round(now - min(oldest_ms) / 1000, 3) if oldest_ms else None
        members: Any = await self.client.zrangebyscore(self.decisions_key, now - DECISIONS_WINDOW_S, "+inf")
        per_reviewer: dict[str, int] = {}
        for member in members:
            reviewer = _str(member).split(":", 1)[1]
            per_reviewer[reviewer] = per_reviewer.get(reviewer, 0) + 1
        consumers = summary.get("consumers") or []
        pending_per = {_str(c["name"]): int(c["pending"]) for c in consumers}
        dead = int(await self.client.xlen(self.dead))
        escalated = int(await self.client.xlen(self.escalated_stream))
        return QueueStats(
            depth=undelivered + pending,
            undelivered=undelivered,
            pending=pending,
            oldest_age_s=oldest_age,
            decisions_last_hour=len(members),
            per_reviewer_last_hour=dict(sorted(per_reviewer.items())),
            pending_per_reviewer=dict(sorted(pending_per.items())),
            dead_letters=dead,
            escalated=escalated,
        )
