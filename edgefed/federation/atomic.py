"""Files a killed run must never leave half-written (metrics.jsonl, summary.json, the trained result,
the checkpoint): each is written beside its place, flushed to disk, then renamed over it, and a
rename within a folder is atomic. A reader sees the old version or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    try:
        with staging.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def staging_dir(final: Path) -> Path:
    """An empty folder beside `final` to write its next version into (then `replace_dir`)."""
    staging = final.with_name(f"{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def replace_dir(staging: Path, final: Path) -> None:
    """Swap the written `staging` folder in for `final`. Killed between the two renames, the previous
    version survives as `final.old` (edgefed.federation.checkpoint reads it back)."""
    for path in staging.rglob("*"):  # on disk before the swap, not just in the page cache
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    old = final.with_name(f"{final.name}.old")
    if final.exists():
        # A `final.old` beside a whole `final` is what a kill after the swap left: superseded.
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
