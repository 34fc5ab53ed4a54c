"""TOML files that ship inside the package (device profiles, bench grids): read by name or by path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edgefed.errors import EdgefedError


def shipped_names(package: str) -> list[str]:
    """The stems of the TOML files in `package`."""
    folder = resources.files(package)
    return sorted(item.name.removesuffix(".toml") for item in folder.iterdir() if item.name.endswith(".toml"))


def read_shipped(name_or_path: str, package: str, kind: str, folder: str, hint: str = "") -> tuple[str, str]:
    """(text, origin) of a file path, or else of `package`'s `<name>.toml` (origin `folder/<name>.toml`);
    an EdgefedError listing the shipped names for anything else."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as error:
            raise EdgefedError(f"{name_or_path}: {error.strerror}") from None
    resource = resources.files(package) / f"{name_or_path}.toml"
    if not resource.is_file():
        raise EdgefedError(
            f"unknown {kind} '{name_or_path}'; choose one of: {', '.join(shipped_names(package))}{hint}"
        )
    return resource.read_text(encoding="utf-8"), f"{folder}/{name_or_path}.toml"
