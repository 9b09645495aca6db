"""Per-loss training curves as JSON and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def write_curves(history: Sequence[dict[str, float]], out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers or CI
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "curves.json", out_dir / "curves.png"
    json_path.write_text(json.dumps(list(history), indent=1))
    steps = list(range(1, len(history) + 1))
    losses = sorted({k for row in history for k in row if k.endswith("_loss")})
    scores = sorted({k for row in history for k in row if k.startswith("val_")})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in losses:
        left.plot(steps, [row.get(name, float("nan")) for row in history], label=name)
    left.set(title="training losses", xlabel="epoch")
    for name in scores:
        right.plot(steps, [row.get(name, float("nan")) for row in history], label=name)
    right.set(title="validation", xlabel="epoch", ylim=(0, 1))
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return json_path, png_path
