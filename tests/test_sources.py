"""The package's own words about itself: every file path a docstring or a comment cites exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A source or document path: `edgefed/ort/device.py`, `wire/framing.py`, `docs/architecture.md`.
PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md|proto))(?![\w/])")
# Paths cited relative to the package, to the repository, or to the citing file's folder.
BASES = (ROOT, ROOT / "edgefed")
GENERATED = ROOT / "edgefed" / "wire" / "v1"


def cited_texts(path: Path):
    source = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                yield docstring
    for line in source.splitlines():
        if "#" in line:
            yield line.split("#", 1)[1]


def exists(cited: str, citing: Path, names: set[str]) -> bool:
    if "/" not in cited:  # a bare file name: some file of the repository has it
        return cited in names
    return any((base / cited).exists() for base in (*BASES, citing.parent))


def test_no_docstring_or_comment_cites_a_path_the_repository_lacks():
    sources = [
        path
        for folder in ("edgefed", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if GENERATED not in path.parents
    ]
    names = {
        path.name
        for folder in ("edgefed", "benchmarks", "tests", "docs", "proto")
        for path in (ROOT / folder).rglob("*")
    }
    names |= {path.name for path in ROOT.iterdir()}
    missing = sorted(
        f"{path.relative_to(ROOT)}: {cited}"
        for path in sources
        for text in cited_texts(path)
        for cited in PATH.findall(text)
        if not exists(cited, path, names)
    )
    assert not missing, missing


MAX_MODULE_LINES = 450  # a module past this does more than one thing (docs/architecture.md)


def test_every_module_of_the_package_stays_short():
    long = {
        str(path.relative_to(ROOT)): count
        for path in sorted((ROOT / "edgefed").rglob("*.py"))
        if GENERATED not in path.parents
        and (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long
