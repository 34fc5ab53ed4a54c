"""The Triton kernel behind `weighted_sum` (imported only on the Triton path)."""

import triton
import triton.language as tl


@triton.jit
def weighted_sum_kernel(
    q_ptr,
    scales_ptr,
    weights_ptr,
    out_ptr,
    K,
    N,
    stride_qk,
    stride_sk,
    MODE: tl.constexpr,  # 0: float deltas; 1: int8 blockwise; 2: packed int4 blockwise
    QBLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offsets < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(K):
        weight = tl.load(weights_ptr + k)
        if MODE == 0:
            values = tl.load(q_ptr + k * stride_qk + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            scale = tl.load(scales_ptr + k * stride_sk + offsets // QBLOCK, mask=mask, other=0.0)
            if MODE == 1:
                values = tl.load(q_ptr + k * stride_qk + offsets, mask=mask, other=0).to(tl.float32) * scale
            else:
                packed = tl.load(q_ptr + k * stride_qk + offsets // 2, mask=mask, other=0).to(tl.int32)
                nibble = (packed >> ((offsets % 2) * 4)) & 0xF
                values = (nibble - 8).to(tl.float32) * scale
        acc += weight * values
    tl.store(out_ptr + offsets, acc, mask=mask)
