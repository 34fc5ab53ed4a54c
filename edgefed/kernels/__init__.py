"""Fused kernels for edgefed, importable as `edgefed.kernels`.

- `lora_linear`: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ bias) with W and bias frozen, forward and backward fused
  in Triton on CUDA, plain torch elsewhere (same semantics).
- `weighted_sum`: Σ_k w_k·dequant(delta_k) in one pass with float32 accumulation, over float deltas
  or the blockwise int8 / int4 format of `quantize_blockwise`.

Triton is imported only when a kernel runs on the Triton path; CPU users never need it.
"""

from edgefed.kernels.lora import lora_linear
from edgefed.kernels.quant import dequantize_blockwise, quantize_blockwise
from edgefed.kernels.reduce import weighted_sum

__all__ = ["dequantize_blockwise", "lora_linear", "quantize_blockwise", "weighted_sum"]
