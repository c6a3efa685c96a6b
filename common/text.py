"""User-facing text shared by every entry point: the disclaimer and safe echoing of input."""

from __future__ import annotations

from typing import Any

#: The one disclaimer shown by the app, the CLIs and the model card.
DISCLAIMER = "Research and education only — not a diagnosis."

#: Longest part of a user's value that an error message repeats back.
ECHO_LIMIT = 80


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, with "…" marking a cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, capped so a 2 MB field is not sent back whole."""
    return clip(repr(value), limit)
