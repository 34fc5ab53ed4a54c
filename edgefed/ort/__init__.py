"""ONNX Runtime as a client's training runtime: a device trains without torch.

The server, which has torch, exports the model with its adapters once per run and generates ONNX
Runtime training artifacts from it (`artifacts.py`); a client trains the adapter tensors through
them (`trainer.py`, which imports numpy and onnxruntime only). `device.py` is `edgefed client
--runtime ort`, a device without torch or transformers that fetches the artifacts over gRPC;
`local.py` puts the trainer behind edgefed's `LocalTrainer` interface for in-process clients
(`--client-runtime ort`).

onnxruntime-training 1.19.2 is the last release with training (upstream removed it afterwards). edgefed
takes its CPU build, onnxruntime-training-cpu (9 MB against the CUDA build's 300 MB), whose wheels
are for CPython 3.10 to 3.12 on x86-64 Linux, Windows and macOS: there is none for Linux on ARM.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from edgefed.errors import EdgefedError

INSTALL_HINT = (
    "pip install 'edgefed[ort]' (onnxruntime-training-cpu 1.19.2, the last release with training: wheels "
    "for CPython 3.10 to 3.12 on x86-64 Linux, Windows and macOS, none for Linux on ARM such as a Jetson "
    "or a Raspberry Pi; there, use the torch runtime)"
)


QUIET = 3  # ONNX Runtime logs errors only: its info and warning lines are about graph rewrites


def training_api() -> types.ModuleType:
    """`onnxruntime.training.api`, the on-device training API, which needs numpy alone. Where torch is
    not installed it is loaded without running `onnxruntime.training`'s package __init__, which in
    1.19.2 imports torch for its ORTModule optimisers, and so fails on the very devices the on-device
    API is for."""
    if "onnxruntime.training" not in sys.modules and importlib.util.find_spec("torch") is None:
        import onnxruntime

        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = package
    import onnxruntime
    from onnxruntime.training import api

    onnxruntime.set_default_logger_severity(QUIET)
    return api


def require_onnxruntime_training() -> None:
    """One clear error when this platform cannot train through ONNX Runtime."""
    try:
        training_api()
    except ImportError as error:
        raise EdgefedError(f"the ort runtime needs onnxruntime-training ({error}): {INSTALL_HINT}") from None
