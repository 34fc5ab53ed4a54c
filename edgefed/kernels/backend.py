"""Which implementation runs: Triton on CUDA (or under TRITON_INTERPRET=1 when asked), torch otherwise."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Triton's CPU interpreter: correctness only, and its bf16/fp16 `tl.dot` must see float32."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(tensor.is_cuda for tensor in tensors)
    if backend == "triton":
        if not (on_cuda or interpreting()):
            raise RuntimeError("the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
        return True
    return on_cuda
