"""The task set shared by importers, the classifier heads and the stream's label output.

Each task maps to its labels, negative first, so index 1 is the positive class of a
binary head.
"""

from __future__ import annotations

DEFAULT_TASKS: dict[str, tuple[str, ...]] = {
    "hate": ("not_hateful", "hateful"),
    "sarcasm": ("not_sarcastic", "sarcastic"),
}
