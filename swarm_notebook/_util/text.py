"""Clipping long text (tracebacks, reprs, outputs) for results and logs."""

from __future__ import annotations


def clip_text(text: str, limit: int) -> str:
    """Keep the head and tail of ``text`` within ``limit`` characters, saying what was cut.

    Both ends are kept because a traceback's cause is at its end and its context at its start.
    """
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 40, 0)
    cut = len(text) - 2 * keep
    return f"{text[:keep]}\n... [{cut} characters cut] ...\n{text[len(text) - keep :]}"
