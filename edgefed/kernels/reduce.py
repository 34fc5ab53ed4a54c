"""Weighted sum of client deltas, dequantising on the fly: Σ_k w_k·dequant(delta_k), float32 accumulation.

The Triton kernel tiles the N parameters and loops over the K clients inside each tile, keeping the
float32 accumulator in registers: every input byte is read once and the output written once — the
bandwidth floor of a reduction (K·N values read, N written). (No pointer tables: the interpreter
cannot load pointers.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgefed.kernels.backend import interpreting, use_triton

BLOCK_N = 1024
INTERPRETER_BLOCK_N = 16384  # fewer, larger programs: the interpreter pays per program


def weighted_sum(
    deltas: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    scales: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Σ_k w_k·dequant(deltas[k]) as a float32 vector.

    `deltas`: K float (fp32/fp16/bf16) tensors of equal size (a list, or stacked [K, N]); or, with
    `scales` [K, n_blocks], a [K, M] int8 (M = n_blocks·block) or uint8 packed-int4
    (M = n_blocks·block/2) tensor in the format of `quantize_blockwise`, giving n_blocks·block
    values (slice off the padding).
    """
    stacked = deltas if isinstance(deltas, torch.Tensor) else None
    first = stacked if stacked is not None else deltas[0]
    weights = torch.as_tensor(weights, dtype=torch.float32, device=first.device).reshape(-1)
    count = stacked.shape[0] if stacked is not None else len(deltas)
    if count == 0 or weights.numel() != count:
        raise ValueError(
            f"need one weight per delta and at least one delta, got {weights.numel()} and {count}"
        )
    quantised = scales is not None
    if quantised and (
        stacked is None or stacked.dtype not in (torch.int8, torch.uint8) or scales.shape[0] != count
    ):
        raise ValueError("quantised deltas are a stacked int8/uint8 [K, M] tensor with scales [K, n_blocks]")
    if not use_triton(backend, first):
        return _torch_weighted_sum(deltas, weights, scales)
    if stacked is None:
        stacked = torch.stack([delta.reshape(-1) for delta in deltas])
    return _triton_weighted_sum(stacked.reshape(count, -1).contiguous(), weights.contiguous(), scales)


def _torch_weighted_sum(deltas, weights: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    from edgefed.kernels.quant import dequantize_blockwise

    total = None
    for k in range(weights.numel()):
        if scales is None:
            values = deltas[k].reshape(-1).to(torch.float32)
        else:
            values = dequantize_blockwise(deltas[k], scales[k])
        total = values * weights[k] if total is None else total.add_(values, alpha=float(weights[k]))
    return total


def _triton_weighted_sum(
    q: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    import triton

    from edgefed.kernels import triton_reduce

    count, width = q.shape
    if scales is None:
        mode, block, numel = 0, 1, width
        scales = weights  # unused by the kernel in this mode
    else:
        mode = 1 if q.dtype == torch.int8 else 2
        numel = width * (1 if mode == 1 else 2)
        block = numel // scales.shape[1]
        scales = scales.to(torch.float32).contiguous()
    out = torch.empty(numel, dtype=torch.float32, device=q.device) if out is None else out
    block_n = INTERPRETER_BLOCK_N if interpreting() else BLOCK_N
    grid = (triton.cdiv(numel, block_n),)
    triton_reduce.weighted_sum_kernel[grid](
        q,
        scales,
        weights,
        out,
        count,
        numel,
        q.stride(0),
        scales.stride(0) if mode else 0,
        MODE=mode,
        QBLOCK=block,
        BLOCK_N=block_n,
    )
    return out
