"""Short text for durations, values and parameter lists, shared by the live view and status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ELLIPSIS = "…"


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a table cell."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def number(value: Any) -> str:
    """Compact numbers (4 significant digits); anything else as ``str``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def values(values: list[float] | None) -> str:
    if values is None:
        return "-"
    return ", ".join(number(v) for v in values)


def params(params: Mapping[str, Any], max_chars: int) -> str:
    """``lr=0.001 layers=3 …`` cut to ``max_chars``, whole pairs first, so a long parameter
    list ends in an ellipsis instead of wrapping over several lines."""
    text = ""
    for name, value in params.items():
        pair = f"{name}={number(value)}"
        candidate = f"{text} {pair}" if text else pair
        if len(candidate) > max_chars:
            return shorten(candidate, max_chars)
        text = candidate
    return text


def shorten(text: str, max_chars: int) -> str:
    text = " ".join(text.split())  # newlines in reasons would break table rows
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 1)].rstrip() + ELLIPSIS
