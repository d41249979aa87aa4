"""Quantities as people read them, for pages and for sentences the worker writes."""

from __future__ import annotations


def filesize(size: float) -> str:
    """Bytes in decimal units: '512 B', '3.4 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"
