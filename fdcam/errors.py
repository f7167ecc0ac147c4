"""Errors for people: one line of an exception's message."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(error: BaseException, limit: int | None = 300) -> str:
    """The first line of the error's message (at most `limit` characters), or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
