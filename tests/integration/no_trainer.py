"""Runs a modstream command in a process where `trainer` cannot be imported, as in a worker
image built without trainer/: `python tests/integration/no_trainer.py worker ...`. The
integration suite starts every worker this way, so each of its tests also checks that the
worker (fetch, classify, route, swap models, survive outages) needs no training code."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType


class NoTrainer(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "trainer" or fullname.startswith("trainer."):
            raise ImportError(f"{fullname}: not in the worker image")
        return None


def install() -> None:
    sys.meta_path.insert(0, NoTrainer())


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository, not this script's folder
    install()
    from modstream.cli import main

    raise SystemExit(main(sys.argv[1:]))
