"""Which torch devices to run on; shared by the trainer and the stream workers."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first GPU when one is visible, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def visible_devices(spec: str = "auto") -> list[torch.device]:
    """`auto`: every visible GPU, else the CPU. Or a comma list such as `cuda:0,cuda:1`."""
    if spec != "auto":
        return [torch.device(d.strip()) for d in spec.split(",") if d.strip()]
    if torch.cuda.is_available():
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]
