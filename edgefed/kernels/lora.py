"""`lora_linear`: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ bias), W and bias frozen; gradients for x, A and B."""

from __future__ import annotations

import torch
from torch.nn import functional

from edgefed.kernels.backend import interpreting, use_triton


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """x [..., d_in], weight [d_out, d_in], lora_A [r, d_in], lora_B [d_out, r] -> [..., d_out].

    `backend="auto"` runs the fused Triton kernels on CUDA when x and weight share a dtype (A and B
    may be float32 adapters on a half-precision layer), torch elsewhere; "triton" forces the kernels
    (CUDA, or the CPU under TRITON_INTERPRET=1), "torch" the reference path.
    """
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != d_in or lora_A.shape != (rank, d_in) or lora_B.shape != (d_out, rank):
        raise ValueError(
            f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if x.dtype != weight.dtype and backend == "triton":
        raise ValueError(
            f"the fused kernel needs x and weight in one dtype, got {x.dtype} and {weight.dtype}"
        )
    if x.dtype != weight.dtype or not use_triton(backend, x, weight, lora_A, lora_B):
        return functional.linear(x, weight, bias) + scale * (
            (x @ lora_A.to(x.dtype).T) @ lora_B.to(x.dtype).T
        )
    return FusedLoRALinear.apply(x, weight, lora_A, lora_B, float(scale), bias)


class FusedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scale, bias):
        rows = x.reshape(-1, x.shape[-1])
        y, s = launch_forward(rows, weight, lora_A, lora_B, scale, bias)
        ctx.save_for_backward(rows, weight, lora_A, lora_B, s)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, lora_A, lora_B, s = ctx.saved_tensors
        dy = grad_y.reshape(-1, weight.shape[0])
        ds, db = launch_backward_ds_db(dy, lora_B, s, ctx.scale)
        dx = (
            launch_backward_dx(dy, weight, ds, lora_A).reshape(ctx.x_shape)
            if ctx.needs_input_grad[0]
            else None
        )
        da = (ds.T @ rows.to(torch.float32)).to(lora_A.dtype) if ctx.needs_input_grad[2] else None
        return dx, None, da, db.to(lora_B.dtype), None, None


def _blocks(tokens: int) -> dict:
    if interpreting():  # few, large programs: the interpreter pays per program instance
        return {"BLOCK_T": max(16, min(128, _pow2(tokens))), "BLOCK_O": 64, "BLOCK_K": 64}
    return {"BLOCK_T": 64, "BLOCK_O": 64, "BLOCK_K": 32}


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _flags(x: torch.Tensor) -> dict:
    return {"UPCAST": interpreting(), "IEEE": x.dtype == torch.float32}


def launch_forward(x, weight, lora_A, lora_B, scale, bias, y=None, s=None):
    """y [T, d_out] in x's dtype and S = x·Aᵀ [T, r] in float32; `y`/`s` may be given (tests poison them)."""
    import triton

    from edgefed.kernels import triton_lora

    tokens, d_in = x.shape
    d_out, rank = weight.shape[0], lora_A.shape[0]
    y = torch.empty(tokens, d_out, dtype=x.dtype, device=x.device) if y is None else y
    s = torch.empty(tokens, rank, dtype=torch.float32, device=x.device) if s is None else s
    blocks = _blocks(tokens)
    grid = (triton.cdiv(tokens, blocks["BLOCK_T"]), triton.cdiv(d_out, blocks["BLOCK_O"]))
    triton_lora.lora_forward_kernel[grid](
        x,
        weight,
        lora_A,
        lora_B,
        bias if bias is not None else x,
        y,
        s,
        tokens,
        d_in,
        d_out,
        rank,
        scale,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        y.stride(0),
        y.stride(1),
        s.stride(0),
        s.stride(1),
        HAS_BIAS=bias is not None,
        R_BLOCK=max(16, _pow2(rank)),
        **_flags(x),
        **blocks,
    )
    return y, s


def launch_backward_ds_db(dy, lora_B, s, scale, ds=None):
    """dS = s·dY·B [T, r] and dB = s·dYᵀ·S [d_out, r], both float32."""
    import triton

    from edgefed.kernels import triton_lora

    tokens, d_out = dy.shape
    rank = lora_B.shape[1]
    ds = torch.empty(tokens, rank, dtype=torch.float32, device=dy.device) if ds is None else ds
    db = torch.zeros(d_out, rank, dtype=torch.float32, device=dy.device)  # atomically accumulated
    blocks = _blocks(tokens)
    triton_lora.lora_backward_ds_db_kernel[(triton.cdiv(tokens, blocks["BLOCK_T"]),)](
        dy,
        lora_B,
        s,
        ds,
        db,
        tokens,
        d_out,
        rank,
        scale,
        dy.stride(0),
        dy.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        s.stride(0),
        s.stride(1),
        ds.stride(0),
        ds.stride(1),
        db.stride(0),
        db.stride(1),
        BLOCK_T=blocks["BLOCK_T"],
        BLOCK_O=blocks["BLOCK_O"],
        R_BLOCK=max(16, _pow2(rank)),
        **_flags(dy),
    )
    return ds, db


def launch_backward_dx(dy, weight, ds, lora_A, dx=None):
    """dx = dY·W + dS·A [T, d_in] in dY's dtype."""
    import triton

    from edgefed.kernels import triton_lora

    tokens, d_out = dy.shape
    d_in, rank = weight.shape[1], lora_A.shape[0]
    dx = torch.empty(tokens, d_in, dtype=dy.dtype, device=dy.device) if dx is None else dx
    blocks = _blocks(tokens)
    grid = (triton.cdiv(tokens, blocks["BLOCK_T"]), triton.cdiv(d_in, blocks["BLOCK_K"]))
    triton_lora.lora_backward_dx_kernel[grid](
        dy,
        weight,
        ds,
        lora_A,
        dx,
        tokens,
        d_in,
        d_out,
        rank,
        dy.stride(0),
        dy.stride(1),
        weight.stride(0),
        weight.stride(1),
        ds.stride(0),
        ds.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        dx.stride(0),
        dx.stride(1),
        R_BLOCK=max(16, _pow2(rank)),
        **_flags(dy),
        **blocks,
    )
    return dx
