"""stream.decode_memo: a repost's decode answered by the first one, within a byte budget."""

from __future__ import annotations

import asyncio
import traceback

import pytest

from stream.decode_memo import DecodeMemo


class Bad(ValueError):
    """Stands for models.images.ImageError: a failure that is about the bytes."""


class Decoder:
    """Counts calls; returns `size` bytes' worth of result, or raises `error`."""

    def __init__(self, size: int = 10, error: BaseException | None = None, gate: asyncio.Event | None = None) -> None:
        self.calls = 0
        self.size = size
        self.error = error
        self.gate = gate

    async def __call__(self) -> bytes:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return b"x" * self.size


async def started(m: DecodeMemo[bytes], decode: Decoder) -> asyncio.Task[tuple[bytes, bool]]:
    """m.get_or_decode("h", decode) running in a task, up to its first wait."""
    task = asyncio.create_task(m.get_or_decode("h", decode))
    await asyncio.sleep(0.01)
    return task


def memo(max_bytes: int = 100) -> DecodeMemo[bytes]:
    return DecodeMemo(max_bytes, len, keep_errors=(Bad,))


@pytest.mark.asyncio
async def test_a_second_post_of_the_same_bytes_is_not_decoded_again() -> None:
    m, decode = memo(), Decoder()
    first = await m.get_or_decode("h1", decode)
    second = await m.get_or_decode("h1", decode)
    other = await m.get_or_decode("h2", decode)
    assert first == (b"x" * 10, False) and second == (b"x" * 10, True) and other[1] is False
    assert decode.calls == 2 and len(m) == 2 and m.bytes == 20


@pytest.mark.asyncio
async def test_a_flood_of_distinct_images_stays_within_the_budget_least_recent_out_first() -> None:
    m, decode = memo(max_bytes=35), Decoder(size=10)
    for key in ("a", "b", "c"):
        await m.get_or_decode(key, decode)
    await m.get_or_decode("a", decode)  # a is now the most recent
    for i in range(1000):
        await m.get_or_decode(f"flood{i}", decode)
        assert m.bytes <= 35
    await m.get_or_decode("flood999", decode)
    assert decode.calls == 1003  # the newest survived
    _, again = await m.get_or_decode("a", decode)
    assert not again  # pushed out by the flood


@pytest.mark.asyncio
async def test_lru_keeps_what_was_used_recently() -> None:
    m, decode = memo(max_bytes=30), Decoder(size=10)
    for key in ("a", "b", "c"):
        await m.get_or_decode(key, decode)
    await m.get_or_decode("a", decode)
    await m.get_or_decode("d", decode)  # evicts b, the least recently used
    assert (await m.get_or_decode("a", decode))[1] and (await m.get_or_decode("c", decode))[1]
    assert not (await m.get_or_decode("b", decode))[1]


@pytest.mark.asyncio
async def test_larger_than_the_budget_or_a_budget_of_zero_keeps_nothing() -> None:
    big, off = memo(max_bytes=5), memo(max_bytes=0)
    for m in (big, off):
        decode = Decoder(size=10)
        await m.get_or_decode("a", decode)
        assert not (await m.get_or_decode("a", decode))[1]
        assert decode.calls == 2 and len(m) == 0 and m.bytes == 0
    gate = asyncio.Event()
    shared = Decoder(gate=gate)
    tasks = [asyncio.create_task(off.get_or_decode("b", shared)) for _ in range(2)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*tasks)
    assert shared.calls == 2  # off means off: not even posts in flight together share
    with pytest.raises(ValueError):
        DecodeMemo(-1, len)


@pytest.mark.asyncio
async def test_a_refused_file_posted_again_is_refused_without_decoding_and_without_growing_tracebacks() -> None:
    m, decode = memo(max_bytes=10_000), Decoder(error=Bad("corrupt"))  # a kept failure counts 1 KiB
    depths = []
    for _ in range(50):
        with pytest.raises(Bad, match="corrupt") as info:
            await m.get_or_decode("h", decode)
        depths.append(len(traceback.extract_tb(info.value.__traceback__)))
    assert decode.calls == 1
    assert max(depths[1:]) == min(depths[1:])  # re-raised fresh each time, not stacked


@pytest.mark.asyncio
async def test_errors_that_are_not_about_the_bytes_are_not_kept() -> None:
    m = memo()
    with pytest.raises(RuntimeError):
        await m.get_or_decode("h", Decoder(error=RuntimeError("bug")))
    decode = Decoder()
    assert await m.get_or_decode("h", decode) == (b"x" * 10, False)
    assert decode.calls == 1


@pytest.mark.asyncio
async def test_posts_of_the_same_bytes_in_flight_together_share_one_decode() -> None:
    m, gate = memo(), asyncio.Event()
    decode = Decoder(gate=gate)
    tasks = [asyncio.create_task(m.get_or_decode("h", decode)) for _ in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert decode.calls == 1
    assert [hit for _, hit in results].count(False) == 1 and all(r == b"x" * 10 for r, _ in results)


@pytest.mark.asyncio
async def test_waiters_get_the_shared_refusal() -> None:
    m, gate = memo(), asyncio.Event()
    decode = Decoder(error=Bad("bomb"), gate=gate)
    tasks = [asyncio.create_task(m.get_or_decode("h", decode)) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert decode.calls == 1 and all(isinstance(r, Bad) for r in results)


@pytest.mark.asyncio
async def test_a_cancelled_first_decode_leaves_its_waiters_to_decode_themselves() -> None:
    m, gate = memo(), asyncio.Event()
    blocked = Decoder(gate=gate)
    owner = await started(m, blocked)
    fresh = Decoder()
    waiter = await started(m, fresh)
    owner.cancel()
    assert await waiter == (b"x" * 10, False)  # not cancelled with the owner: decoded on its own
    assert fresh.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await owner


@pytest.mark.asyncio
async def test_a_cancelled_waiter_does_not_cancel_the_shared_decode() -> None:
    m, gate = memo(), asyncio.Event()
    decode = Decoder(gate=gate)
    owner = await started(m, decode)
    waiter = await started(m, decode)
    waiter.cancel()
    gate.set()
    assert await owner == (b"x" * 10, False)
    assert (await m.get_or_decode("h", decode))[1] and decode.calls == 1


@pytest.mark.asyncio
async def test_clear_forgets_everything() -> None:
    m, decode = memo(), Decoder()
    await m.get_or_decode("h", decode)
    m.clear()
    assert len(m) == 0 and m.bytes == 0
    assert not (await m.get_or_decode("h", decode))[1]


@pytest.mark.asyncio
async def test_a_decode_begun_before_clear_is_not_kept_nor_shared_with_posts_after_it() -> None:
    """A model swap that needs OCR clears the memo mid-decode: that decode lacks the image text."""
    m, gate = memo(), asyncio.Event()
    old = Decoder(gate=gate)
    before = await started(m, old)
    m.clear()
    fresh = Decoder(size=20)
    after = await m.get_or_decode("h", fresh)  # does not wait on the decode of the old settings
    gate.set()
    assert await before == (b"x" * 10, False) and after == (b"x" * 20, False)
    assert await m.get_or_decode("h", Decoder()) == (b"x" * 20, True)  # the new settings' result stays
    assert m.bytes == 20 and len(m) == 1
