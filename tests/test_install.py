"""Installing edgefed where torch is already installed (a Jetson with NVIDIA's wheel) keeps that torch.

The preinstalled torch is a wheel built here with the version NVIDIA's JetPack 6 wheels carry (a
pre-release with a local label, which a careless resolver would "upgrade" to a PyPI build): pip only
reads a distribution's metadata to decide, so what matters is the version, and a marker in the module
shows whether the files were replaced. Both ways in are checked: `pip install 'edgefed[torch]'` into
the environment that has torch, and `make install PYTHON=` pointing at it (which makes its own venv).
A device on the ort runtime installs `edgefed[ort]`: that brings no torch stack at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JETPACK_TORCH = "2.5.0a0+872d972e41.nv24.8"  # the version of NVIDIA's JetPack 6.0 torch wheel
MARKER = "preinstalled-by-the-device-image"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def torch_wheel(folder: Path) -> Path:
    """A wheel of `torch` at JETPACK_TORCH whose module says where it came from."""
    dist = f"torch-{JETPACK_TORCH}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{JETPACK_TORCH}"\nMARKER = "{MARKER}"\n',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {JETPACK_TORCH}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"torch-{JETPACK_TORCH}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def clean_environment() -> dict[str, str]:
    """This process's environment without what would point another Python at this one's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(*command: str | Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=900,
        env=env or clean_environment(),
        **kwargs,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def environment_with_torch(folder: Path) -> Path:
    """A virtual environment (of the Python running the tests) with the JetPack torch installed."""
    run(sys.executable, "-m", "venv", folder)
    python = folder / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-index", torch_wheel(folder.parent))
    return python


def torch_seen_by(python: Path) -> str:
    return run(python, "-c", "import torch; print(torch.__version__, torch.MARKER)").stdout.strip()


def test_pip_install_keeps_a_preinstalled_torch(tmp_path):
    python = environment_with_torch(tmp_path / "device")
    report = tmp_path / "report.json"
    # What the resolver would do, before it does anything: torch must not be in it.
    run(python, "-m", "pip", "install", "--dry-run", "-q", "--report", report, f"{ROOT}[torch]")
    assert '"name": "torch"' not in report.read_text(), "pip would replace the preinstalled torch"
    run(python, "-m", "pip", "install", "-q", f"{ROOT}[torch]")
    assert torch_seen_by(python) == f"{JETPACK_TORCH} {MARKER}"
    assert "edgefed 0.1.0" in run(python, "-m", "edgefed", "--version").stdout


def test_make_install_reuses_the_torch_of_the_python_it_is_given(tmp_path):
    python = environment_with_torch(tmp_path / "device")
    venv = tmp_path / "edgefed-venv"
    env = {**clean_environment(), "MAKEFLAGS": ""}
    result = run("make", "-C", ROOT, "install", f"PYTHON={python}", f"VENV={venv}", "EXTRAS=torch", env=env)
    assert "reusing the torch already installed" in result.stdout
    assert (venv / "torch-constraint.txt").read_text().strip() == f"torch=={JETPACK_TORCH}"
    assert torch_seen_by(venv / "bin" / "python") == f"{JETPACK_TORCH} {MARKER}"
    assert not list(venv.glob("lib/python*/site-packages/torch")), "make installed a torch of its own"
    assert "edgefed 0.1.0" in run(venv / "bin" / "edgefed", "--version").stdout


def requested(report: Path) -> set[str]:
    """The distributions a `pip install --dry-run --report` would install."""
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


def test_an_ort_device_installs_no_torch_stack(tmp_path):
    """`pip install 'edgefed[ort]'` into a bare environment: ONNX Runtime training and tokenizers, and
    none of torch, transformers, peft, accelerate or safetensors; where onnxruntime-training has no wheel
    (aarch64, Python 3.13+), the extra installs without it and the client says why in one line."""
    run(sys.executable, "-m", "venv", tmp_path / "device")
    python = tmp_path / "device" / "bin" / "python"
    report = tmp_path / "report.json"
    run(python, "-m", "pip", "install", "--dry-run", "-q", "--report", report, f"{ROOT}[ort]")
    names = requested(report)
    assert not names & {"torch", "transformers", "peft", "accelerate", "safetensors"}, sorted(names)
    assert {"edgefed", "tokenizers", "grpcio", "numpy"} <= names
    has_wheel = platform.machine() == "x86_64" and sys.version_info < (3, 13)
    assert ("onnxruntime-training-cpu" in names) == has_wheel, sorted(names)
