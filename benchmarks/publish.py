"""What every benchmark script ends with: its Markdown report printed, and written where --out says."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path | None) -> None:
    report = "\n".join(lines)
    print(report)
    if out:
        out.write_text(report + "\n", encoding="utf-8")
