"""ExecuTorch as a client's training runtime (`--client-runtime executorch`): the maintained successor
of on-device training in the PyTorch ecosystem, whose programs (.pte) run in a small C++ runtime on
phones and microcontrollers as well as Linux on ARM.

The server exports the model with its adapters once into a training program (`program.py`:
torch.export, then ExecuTorch's experimental forward-and-backward export, which computes the loss
and the adapters' gradients); a client runs that program (`local.py`) and applies torch's update rule
(clipping, AdamW) to the gradients it returns. ExecuTorch's training API is experimental and its own
optimizer is SGD only; its Python runtime hands tensors over as torch tensors, so an ExecuTorch client
in Python still imports torch (not transformers): what it proves is the program a device's C++
runtime would train.
"""

from __future__ import annotations

from edgefed.errors import EdgefedError

INSTALL_HINT = (
    "pip install 'edgefed[executorch]' (executorch 1.5.1, with wheels for CPython 3.10 to 3.14 on x86-64 "
    "and ARM Linux and on macOS)"
)


def require_executorch() -> None:
    """One clear error when ExecuTorch's training extension cannot be loaded here."""
    try:
        import executorch.extension.training  # noqa: F401
    except ImportError as error:
        raise EdgefedError(f"the executorch runtime needs executorch ({error}): {INSTALL_HINT}") from None
