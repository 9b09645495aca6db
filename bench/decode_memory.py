"""Peak memory of `modstream classify` fed huge flat images from a loopback media server.

A flat 6000x6000 PNG is ~116 KiB on the wire but 108 MB of RGB once decoded. The posts go
through the real CLI in a child process (SSRF-guarded fetcher, decode pool, device pool,
routing); the child's peak RSS comes from `os.wait4`, so nothing else in this process
counts. Before decoded images were bounded, 64 such posts drove the process to 5.75 GiB.

    .venv/bin/python bench/decode_memory.py [--images 64] [--side 6000] [--registry var/registry]
    .venv/bin/python bench/decode_memory.py --tiny   # a tiny random model, no backbones needed

Prints a table and writes JSON to var/bench/decode_memory.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stream.media_server import BackgroundMediaServer  # noqa: E402

GIB = 1024**3


def tiny_registry(root: Path) -> Path:
    """A registry holding the unit tests' tiny random model (32 px images)."""
    from models.card import ModelCard
    from models.registry import ModelRegistry
    from tests.tiny import tiny_model

    model, tokenizer = tiny_model()
    ModelRegistry(root).save(model, tokenizer, ModelCard(config=model.config))
    return root


def write_posts(folder: Path, url: str, n: int, side: int) -> Path:
    """`n` posts, each with its own flat `side`x`side` PNG (distinct bytes: no dedupe)."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    posts = folder / "posts.jsonl"
    with posts.open("w", encoding="utf-8") as fh:
        for i in range(n):
            Image.new("RGB", (side, side), (i % 256, 90, 200)).save(media / f"flat{i}.png", optimize=False)
            fh.write(json.dumps({"id": f"huge-{i}", "text": f"post {i}", "image_urls": [f"{url}/flat{i}.png"]}) + "\n")
    return posts


def run_classify(posts: Path, registry: Path, out: Path, device: str = "cpu") -> dict[str, float | int]:
    """Runs `modstream classify` in a child process; returns its peak RSS and wall time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "modstream.cli", "classify", str(posts),
        "--registry", str(registry), "--device", device, "--allow-loopback-media", "--output", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.returncode != 0:
        raise RuntimeError(f"modstream classify failed ({child.returncode}): {stderr[-2000:]}")
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    labelled = sum(1 for rec in lines if "labels" in rec and "stage" not in rec)
    media_ok = sum(1 for rec in lines if (rec.get("media") or {}).get("status") == "ok")
    return {
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "wall_s": round(wall, 2),
        "outputs": len(lines),
        "labelled": labelled,
        "media_ok": media_ok,
    }


def measure(n: int, side: int, registry: Path | None, workdir: Path) -> dict[str, object]:
    reg = registry if registry is not None else tiny_registry(workdir / "registry")
    media = workdir / "media"
    media.mkdir(parents=True, exist_ok=True)
    server = BackgroundMediaServer(media)
    try:
        posts = write_posts(workdir, server.url, n, side)
        wire = sum(p.stat().st_size for p in media.glob("*.png"))
        result = run_classify(posts, reg, workdir / "labels.jsonl")
    finally:
        server.stop()
    return {"images": n, "side": side, "wire_bytes": wire, "model": "tiny" if registry is None else str(reg), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--registry", default="var/registry", help="registry with the model to serve")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model instead")
    parser.add_argument("--goal-gib", type=float, default=2.5)
    parser.add_argument("--out", default="var/bench/decode_memory.json")
    args = parser.parse_args()

    registry = None if args.tiny else (ROOT / args.registry).resolve()
    if registry is not None and not (registry / "CURRENT").exists():
        parser.error(f"{registry} holds no model; train one (`modstream demo`) or pass --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.images, args.side, registry, Path(tmp))
    peak = int(row["peak_rss_bytes"])  # type: ignore[call-overload]
    row.update(
        goal_gib=args.goal_gib,
        within_goal=peak < args.goal_gib * GIB,
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
    )
    header = "| images | side | on the wire | model | labelled | media ok | wall s | peak RSS |"
    print(f"{header} goal < {args.goal_gib} GiB |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---|")
    print(
        f"| {row['images']} | {row['side']} | {int(row['wire_bytes']) / 2**20:.1f} MiB | {row['model']} | "  # type: ignore[call-overload]
        f"{row['labelled']}/{row['outputs']} | {row['media_ok']} | {row['wall_s']} | {peak / GIB:.2f} GiB | "
        f"{'met' if row['within_goal'] else 'MISSED'} |"
    )
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
