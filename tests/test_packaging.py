"""The installed package holds every subpackage (the editable install the tests run on would not notice)."""

from pathlib import Path

from edgefed.toml_io import parse_toml

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installation():
    pyproject = parse_toml((ROOT / "pyproject.toml").read_text(), "pyproject.toml")
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    inits = (ROOT / "edgefed").rglob("__init__.py")
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in inits}
    assert found - listed == set()
