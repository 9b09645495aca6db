"""What one worker process already decoded, by the bytes' content hash: a repost skips the work.

Decoding, the bounding resize, reading the text inside and the PDQ hash are a pure function of
the media bytes (and of the fetcher's fixed settings), and they are most of the host CPU a post
costs around the model (bench/feed_throughput.py). A repost of the same file - a raid, a viral
meme - therefore needs none of it again: the memo keeps the last results by sha256, bounded by
the bytes their pixels hold, least recently used out first. It serves every repost of the bytes,
whatever its text (the Redis dedupe cache, keyed by text plus bytes, saves only the model, and
only when the text is the same too).

Failures are kept as well: a corrupt or cloaked file posted a thousand times is decoded (and
refused) once. Posts of the same bytes that arrive while the first is still being decoded wait
for that one decode instead of starting their own.

Used only from the event loop's thread (lookups before a decode is sent to the pool, stores
after it returns), so it needs no lock.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# A kept failure's nominal size: its message is short, and counting it keeps a flood of distinct
# failures from growing the memo past its budget.
_FAILURE_BYTES = 1024
_RETRY = object()  # an in-flight decode's answer to its waiters: decode it yourselves


class DecodeMemo(Generic[T]):
    """Results of `decode` by content hash, at most `max_bytes` of them by `size_of`.

    `get_or_decode(key, decode)` returns the kept result (or re-raises the kept error) and says
    whether it came from the memo; errors of the types in `keep_errors` are kept, any other
    error (a bug, a cancelled decode) is passed on and forgotten.
    """

    def __init__(
        self,
        max_bytes: int,
        size_of: Callable[[T], int],
        keep_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._keep_errors = keep_errors
        self._entries: OrderedDict[str, tuple[T | BaseException, int]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.bytes = 0
        self._generation = 0  # bumped by clear(): a decode begun before it is not kept

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every result (the decode's settings changed: its results no longer hold).
        Posts already waiting on a decode begun before still get its result; it is not kept."""
        self._inflight.clear()
        self._entries.clear()
        self.bytes = 0
        self._generation += 1

    async def get_or_decode(self, key: str, decode: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """(result, True) when an earlier decode of `key` answers, else (decode's result, False)."""
        if self.max_bytes == 0:  # off: every post decodes its own bytes
            return await decode(), False
        while True:
            kept = self._entries.get(key)
            if kept is not None:
                self._entries.move_to_end(key)
                value = kept[0]
                if isinstance(value, BaseException):
                    # a fresh traceback each time: re-raising one object would grow its traceback
                    raise value.with_traceback(None)
                return value, True
            pending = self._inflight.get(key)
            if pending is None:
                break
            # shield: one waiter cancelled (its post timed out) must not cancel the shared decode
            outcome = await asyncio.shield(pending)
            if outcome is _RETRY:
                continue  # that decode failed for a reason not about the bytes: try again
            if isinstance(outcome, BaseException):
                raise outcome.with_traceback(None)
            return outcome, True
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        generation = self._generation
        try:
            result = await decode()
        except BaseException as exc:
            if isinstance(exc, self._keep_errors):
                self._keep(key, exc, _FAILURE_BYTES, generation)
                future.set_result(exc)
            else:  # a bug or a cancelled decode says nothing about the bytes: waiters decode again
                future.set_result(_RETRY)
            raise
        else:
            self._keep(key, result, self._size_of(result), generation)
            future.set_result(result)
            return result, False
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _keep(self, key: str, value: T | BaseException, size: int, generation: int) -> None:
        if size > self.max_bytes or generation != self._generation:
            return  # larger than the whole budget, or decoded under settings clear() retired
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
