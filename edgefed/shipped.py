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
    resource = resources.files(package) / f"{name_or_path}.toml"
    try:
        if path.suffix == ".toml" or path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
        if resource.is_file():
            return resource.read_text(encoding="utf-8"), f"{folder}/{name_or_path}.toml"
    except OSError as error:  # also from is_file: a name too long for a path
        raise EdgefedError(f"{name_or_path}: {error.strerror}") from None
    except ValueError:  # not UTF-8 text, or a NUL in the path
        raise EdgefedError(f"{name_or_path}: cannot read it as UTF-8 text") from None
    raise EdgefedError(
        f"unknown {kind} '{name_or_path}'; choose one of: {', '.join(shipped_names(package))}{hint}"
    )
