"""A worker image carries no training code: the serving modules never import `trainer`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `modstream demo` and `run` wire training and serving together on purpose (they train a
# default model); everything else, the command modules and the producer included, must not.
NOT_RUNTIME = {"demo.py", "local_run.py", "__init__.py"}


def _runtime_modules() -> list[str]:
    return sorted(f"stream.{p.stem}" for p in (ROOT / "stream").glob("*.py") if p.name not in NOT_RUNTIME)


def test_runtime_module_list_covers_the_worker():
    modules = _runtime_modules()
    for expected in ("stream.worker", "stream.media", "stream.classify", "stream.device_pool", "stream.pipeline"):
        assert expected in modules


def test_worker_runtime_modules_import_no_trainer_module():
    modules = _runtime_modules()
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'trainer' or m.startswith('trainer.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == [], f"serving modules pulled in training code: {imported}"
