"""The CM-Off-Meme sample the studies read at run time (never copied into the project)."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.importers import CM_OFF_MEME_ENV, cm_off_meme_root


def require_sample() -> Path:
    """The sample's folder, or a clear skip (exit 2) when it is absent."""
    root = cm_off_meme_root()
    if not (root / "sample_data.csv").is_file():
        print(
            f"skipped: the CM-Off-Meme sample is not at {root} (set {CM_OFF_MEME_ENV} to its folder)", file=sys.stderr
        )
        raise SystemExit(2)
    return root
