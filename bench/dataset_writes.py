"""The reviewed dataset's writer: re-decisions per second and memory held, as the dataset grows.

The dataset sink commits each batch of decisions durably before its offsets. The writer it
had until issue 18 kept every manifest line in memory and rewrote the whole manifest whenever a
batch re-decided a post; the writer now (review/dataset.py) appends every batch, keeps a small
index, and compacts only when replaced lines outnumber current ones. Both are run in turn on
the same data: a manifest of `--posts` lines (about 1 KiB each, like real decisions), then
`--batches` batches of `--batch` decisions, half of them re-decisions of existing posts.
Memory is what the writer object holds (tracemalloc, after loading the manifest).

    .venv/bin/python bench/dataset_writes.py [--posts 20000,50000] [--batches 50] [--batch 20]
        [--out var/bench/dataset_writes.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modstream.records import ReviewDecision, TaskDecision  # noqa: E402
from review.dataset import ReviewedDataset, _dump, manifest_line, plan_batch  # noqa: E402

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _decision(post: int, n: int) -> ReviewDecision:
    return ReviewDecision(
        decision_id=f"d-{post}-{n}",
        post_id=f"post-{post}",
        reviewer="bench",
        decisions={"hate": TaskDecision("confirm", "hateful"), "sarcasm": TaskDecision("confirm", "not_sarcastic")},
        model_version="v0001",
        model_labels={"hate": {"label": "hateful", "score": 0.71, "decision": True, "threshold": 0.5}},
        text="a meme caption of about the usual length, repeated to weigh like a real post " * 8,
        image_url=f"https://media.example.invalid/{post}.jpg",
        media_hash=f"{post:064x}",
        reasons=["weak_image_text_match"],
        decided_at=(T0 + timedelta(seconds=n)).isoformat(),
    )


class RewriteWriter(ReviewedDataset):
    """The writer before: every line in memory, the whole manifest rewritten on a change."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.index = {}  # this writer planned against its lines, not an index
        self.lines = {json.loads(raw)["id"]: json.loads(raw) for raw in self.manifest.open("rb") if raw.strip()}

    def commit(self, lines: Any) -> tuple[int, int]:
        replaced = sum(1 for line in lines if line["id"] in self.lines)
        merged = dict(self.lines)
        merged.update({line["id"]: line for line in lines})
        if replaced:
            self._full_rewrite(merged.values())
        else:
            self._append([_dump(line) for line in lines])
        self.lines = merged
        return len(lines) - replaced, replaced

    def _full_rewrite(self, lines: Any) -> None:
        import os

        tmp = self.folder / ".rewrite.tmp"
        with tmp.open("wb") as fh:
            fh.write(b"".join(_dump(line) for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.manifest)


def run(kind: str, posts: int, batches: int, batch: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        folder = Path(tmp)
        with (folder / "manifest.jsonl").open("wb") as fh:
            for p in range(posts):
                fh.write(_dump(manifest_line(_decision(p, 0), f"media/{p:064x}.png", 1)))
        tracemalloc.start()
        writer: ReviewedDataset = RewriteWriter(folder) if kind == "rewrite (before)" else ReviewedDataset(folder)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        current = writer.lines if isinstance(writer, RewriteWriter) else writer.index
        started = time.perf_counter()
        n = 1
        for _ in range(batches):
            decisions = []
            for _ in range(batch):
                n += 1
                post = rng.randrange(posts) if rng.random() < 0.5 else posts + n  # half re-decisions
                decisions.append(_decision(post, n))
            plan = plan_batch(decisions, current)
            lines = [manifest_line(d, None, plan.revisions[d.post_id]) for d in plan.winners.values()]
            writer.commit(lines)
            current = writer.lines if isinstance(writer, RewriteWriter) else writer.index
        elapsed = time.perf_counter() - started
        size = (folder / "manifest.jsonl").stat().st_size
        compactions = getattr(writer, "compactions", 0)
        writer.close()
    return {
        "writer": kind,
        "posts": posts,
        "decisions_per_s": round(batches * batch / elapsed, 1),
        "batches_per_s": round(batches / elapsed, 2),
        "memory_mib": round(held / 2**20, 1),
        "manifest_mib": round(size / 2**20, 1),
        "compactions": compactions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", default="20000,50000", help="manifest sizes to start from")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--out", default="var/bench/dataset_writes.json")
    args = parser.parse_args()
    rows = []
    print(
        f"{'posts':>8} {'writer':<18} {'decisions/s':>12} {'memory MiB':>11} {'manifest MiB':>13} {'compactions':>12}"
    )
    for posts in [int(x) for x in args.posts.split(",")]:
        pair = [run(kind, posts, args.batches, args.batch, seed=posts) for kind in ("rewrite (before)", "append (now)")]
        for row in pair:
            rows.append(row)
            print(f"{row['posts']:>8} {row['writer']:<18} {row['decisions_per_s']:>12} {row['memory_mib']:>11} "
                  f"{row['manifest_mib']:>13} {row['compactions']:>12}")  # fmt: skip
        before, now = pair
        print(f"{'':>8} ratio now/before: decisions/s {now['decisions_per_s'] / before['decisions_per_s']:.1f}x, "
              f"memory {now['memory_mib'] / max(before['memory_mib'], 0.1):.2f}x")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "python": platform.python_version(), "when": datetime.now(UTC).isoformat()}
    out.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
