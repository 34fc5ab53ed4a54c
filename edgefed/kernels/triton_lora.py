"""Triton kernels behind `lora_linear` (imported only on the Triton path). Shapes and names:

    x [T, d_in]   W [d_out, d_in]   A [r, d_in]   B [d_out, r]   S = x·Aᵀ [T, r] (float32)
    forward:        y = x·Wᵀ + s·S·Bᵀ + bias      one pass over x computes both x·Wᵀ and S
    backward (1):   dS = s·dY·B,  dB += s·dYᵀ·S   one pass over dY; dB reduced across T tiles by atomics
    backward (2):   dx = dY·W + dS·A              the LoRA term joins the K loop's accumulator
    (dA = dSᵀ·x is a plain GEMM in the wrapper.)

The rank is padded to R_BLOCK ≥ 16 so every `tl.dot` dimension is at least 16 on a GPU. UPCAST
(set under TRITON_INTERPRET=1) feeds `tl.dot` float32: the interpreter's bf16 dot is wrong.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:  # float32 inputs: full precision, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def lora_forward_kernel(
    x_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    s_ptr,
    T,
    D_IN,
    D_OUT,
    R,
    scale,
    stride_xt,
    stride_xk,
    stride_wo,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bo,
    stride_br,
    stride_yt,
    stride_yo,
    stride_st,
    stride_sr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_BLOCK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ranks = tl.arange(0, R_BLOCK)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
            mask=(rows[:, None] < T) & (ks[None, :] < D_IN),
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wo,
            mask=(ks[:, None] < D_IN) & (cols[None, :] < D_OUT),
            other=0.0,
        )
        a_t = tl.load(
            a_ptr + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
            mask=(ks[:, None] < D_IN) & (ranks[None, :] < R),
            other=0.0,
        ).to(x.dtype)
        acc += _dot(x, w_t, UPCAST, IEEE)
        acc_s += _dot(x, a_t, UPCAST, IEEE)
    b_t = tl.load(
        b_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bo,
        mask=(ranks[:, None] < R) & (cols[None, :] < D_OUT),
        other=0.0,
    )
    low = y_ptr.dtype.element_ty
    acc += scale * _dot(acc_s.to(low), b_t.to(low), UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < D_OUT, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yo,
        acc.to(low),
        mask=(rows[:, None] < T) & (cols[None, :] < D_OUT),
    )
    if pid_o == 0:  # one column of programs writes S for the backward pass
        tl.store(
            s_ptr + rows[:, None] * stride_st + ranks[None, :] * stride_sr,
            acc_s,
            mask=(rows[:, None] < T) & (ranks[None, :] < R),
        )


@triton.jit
def lora_backward_ds_db_kernel(
    dy_ptr,
    b_ptr,
    s_ptr,
    ds_ptr,
    db_ptr,
    T,
    D_OUT,
    R,
    scale,
    stride_dyt,
    stride_dyo,
    stride_bo,
    stride_br,
    stride_st,
    stride_sr,
    stride_dst,
    stride_dsr,
    stride_dbo,
    stride_dbr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    R_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.arange(0, R_BLOCK)
    row_mask = rows < T
    s_tile = tl.load(
        s_ptr + rows[:, None] * stride_st + ranks[None, :] * stride_sr,
        mask=row_mask[:, None] & (ranks[None, :] < R),
        other=0.0,
    )
    acc_ds = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_O):
        cols = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dyt + cols[None, :] * stride_dyo,
            mask=row_mask[:, None] & (cols[None, :] < D_OUT),
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_bo + ranks[None, :] * stride_br,
            mask=(cols[:, None] < D_OUT) & (ranks[None, :] < R),
            other=0.0,
        ).to(dy.dtype)
        acc_ds += _dot(dy, b, UPCAST, IEEE)
        partial_db = _dot(tl.trans(dy).to(tl.float32), s_tile, UPCAST, True)
        tl.atomic_add(
            db_ptr + cols[:, None] * stride_dbo + ranks[None, :] * stride_dbr,
            scale * partial_db,
            mask=(cols[:, None] < D_OUT) & (ranks[None, :] < R),
        )
    tl.store(
        ds_ptr + rows[:, None] * stride_dst + ranks[None, :] * stride_dsr,
        scale * acc_ds,
        mask=row_mask[:, None] & (ranks[None, :] < R),
    )


@triton.jit
def lora_backward_dx_kernel(
    dy_ptr,
    w_ptr,
    ds_ptr,
    a_ptr,
    dx_ptr,
    T,
    D_IN,
    D_OUT,
    R,
    stride_dyt,
    stride_dyo,
    stride_wo,
    stride_wk,
    stride_dst,
    stride_dsr,
    stride_ar,
    stride_ak,
    stride_dxt,
    stride_dxk,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    R_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R_BLOCK)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_O):
        cols = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dyt + cols[None, :] * stride_dyo,
            mask=(rows[:, None] < T) & (cols[None, :] < D_OUT),
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wo + ks[None, :] * stride_wk,
            mask=(cols[:, None] < D_OUT) & (ks[None, :] < D_IN),
            other=0.0,
        )
        acc += _dot(dy, w, UPCAST, IEEE)
    low = dx_ptr.dtype.element_ty
    ds = tl.load(
        ds_ptr + rows[:, None] * stride_dst + ranks[None, :] * stride_dsr,
        mask=(rows[:, None] < T) & (ranks[None, :] < R),
        other=0.0,
    )
    a = tl.load(
        a_ptr + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
        mask=(ranks[:, None] < R) & (ks[None, :] < D_IN),
        other=0.0,
    )
    acc += _dot(ds.to(low), a.to(low), UPCAST, IEEE)
    tl.store(
        dx_ptr + rows[:, None] * stride_dxt + ks[None, :] * stride_dxk,
        acc.to(low),
        mask=(rows[:, None] < T) & (ks[None, :] < D_IN),
    )
