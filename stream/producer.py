"""`modstream produce`: a sample firehose of posts onto the `posts` topic.

Posts come from the synthetic generator, with image URLs pointing at a media server
(`--media-url`), or from a JSONL file of posts. `repost_rate` reuses earlier images and
texts (the dedupe path); `rate` caps posts per second (0: as fast as possible).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modstream.kafka_auth import client_options
from modstream.records import Post, encode

if TYPE_CHECKING:  # the synthetic firehose takes trainer Examples; the producer needs no training code
    from modstream.manifest import Example


def synthetic_posts(
    examples: Sequence[Example],
    media_url: str,
    n: int,
    *,
    repost_rate: float = 0.0,
    seed: int = 0,
    prefix: str = "post",
) -> Iterator[Post]:
    """`n` posts cycling over `examples`; with `repost_rate`, a share repeats an earlier
    post's text and image under a new id (what the dedupe cache catches)."""
    rng = random.Random(seed)
    seen: list[Example] = []
    for i in range(n):
        if seen and rng.random() < repost_rate:
            ex = rng.choice(seen)
        else:
            ex = examples[i % len(examples)]
            seen.append(ex)
        urls = (f"{media_url}/{ex.image.name}",) if ex.image is not None else ()
        yield Post(id=f"{prefix}-{i:07d}", text=ex.text, image_urls=urls)


def posts_from_jsonl(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield line.rstrip(b"\n")


async def produce(bootstrap: str, topic: str, values: Iterator[bytes], *, rate: float = 0.0) -> int:
    """Send every value (keyed by post id when it parses) and wait for the acks."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **client_options())
    sent = 0
    started = time.perf_counter()
    try:  # stop() also when start() fails (broker unreachable), or aiokafka warns of an unclosed producer
        await producer.start()
        futures = []
        for value in values:
            key = None
            try:
                post_id = json.loads(value).get("id")
                key = post_id.encode() if isinstance(post_id, str) else None
            except (ValueError, AttributeError):
                pass  # malformed input is produced as is: the worker dead-letters it
            futures.append(await producer.send(topic, value=value, key=key))
            sent += 1
            if rate > 0:
                ahead = sent / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def encode_posts(posts: Iterator[Post]) -> Iterator[bytes]:
    return (encode(p) for p in posts)
