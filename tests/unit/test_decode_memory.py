"""Decoded media stays bounded: huge flat PNGs (tiny on the wire) must not pile up in memory.

A child process fetches N flat 6000x6000 PNGs through the worker's MediaFetcher (loopback
media server, decode pool) and keeps every result, as a micro-batch does until it is
classified; the growth of its peak RSS over the fetch is what is measured. At full size each
result would hold 108 MB of RGB (16 of them: ~1.7 GiB); bounded, only the decode threads'
transient full-size buffers remain.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3

CHILD = r"""
import asyncio, json, resource, sys
from pathlib import Path
from PIL import Image
from stream.media import FetchConfig, MediaFetcher
from stream.media_server import MediaServer

folder, n, side = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    Image.new("RGB", (side, side), (i, 90, 200)).save(folder / f"flat{i}.png")

async def main():
    server = MediaServer(folder)
    await server.start()
    try:
        async with MediaFetcher(FetchConfig(allow_loopback=True, decode_workers=2)) as fetcher:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            results = await fetcher.fetch_many([f"{server.url}/flat{i}.png" for i in range(n)])
    finally:
        await server.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"status": [r.status for r in results], "sizes": [r.image.size for r in results if r.image],
                      "growth": (peak - start) * 1024}))

asyncio.run(main())
"""


def _run(tmp: Path, n: int, side: int) -> dict:
    tmp.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp), str(n), str(side)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sixteen_huge_flat_pngs_cost_transient_memory_only(tmp_path: Path) -> None:
    huge = _run(tmp_path / "huge", 16, 6000)
    assert huge["status"] == ["ok"] * 16
    assert all(max(size) <= 448 for size in huge["sizes"])
    # Two decode threads hold at most two full-size images (~0.15 GB each with Pillow's
    # 4-byte pixels) at a time; keeping all 16 at full size would grow RSS by > 1.7 GiB.
    assert huge["growth"] < 0.75 * GIB, f"RSS grew by {huge['growth'] / GIB:.2f} GiB"
