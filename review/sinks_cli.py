"""Subcommands of `modstream` for this role (argparse only here; heavy imports inside handlers)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any, add_common: Any) -> None:
    """Register this role's subcommands on the `modstream` parser."""
    del sub, add_common


_ = argparse
