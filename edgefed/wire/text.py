"""Text that came over the wire (client ids, profiles, run ids, tensor names), made safe to log."""

from __future__ import annotations

LOGGED_CHARS = 64


def printable(text: str, limit: int = LOGGED_CHARS) -> str:
    """`text` with control characters escaped (a newline cannot forge a log line) and cut to `limit`
    characters, saying how long it was."""
    escaped = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text[:limit]
    )
    return escaped if len(text) <= limit else f"{escaped}… ({len(text):,} characters)"
