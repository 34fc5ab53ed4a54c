"""Blockwise absmax quantisation of a flat tensor: the int8 and int4 formats `weighted_sum` reads.

Layout (one client's delta of n values, padded to a whole number of blocks):
- int8: `q` int8 [n_blocks·block], value = q·scale[block], q ∈ [−127, 127], scale = absmax / 127;
- int4: `q` uint8 [n_blocks·block / 2], two values per byte, element 2i in the low nibble and 2i+1
  in the high one, each stored as q + 8 with q ∈ [−7, 7], scale = absmax / 7.
`scales` is float32 [n_blocks]. A block of zeros gets scale 0 and decodes to zeros.
"""

from __future__ import annotations

import torch

QMAX = {8: 127, 4: 7}


def quantize_blockwise(
    values: torch.Tensor, bits: int = 8, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a tensor flattened; `block` must be even for int4."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if block <= 0 or (bits == 4 and block % 2):
        raise ValueError(f"block must be a positive (and for int4 even) size, got {block}")
    flat = values.detach().reshape(-1).to(torch.float32)
    n_blocks = max(1, -(-flat.numel() // block))
    padded = torch.zeros(n_blocks * block, dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(n_blocks, block)
    scales = blocks.abs().amax(dim=1) / QMAX[bits]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-QMAX[bits], QMAX[bits]).to(torch.int32).view(-1)
    if bits == 8:
        return q.to(torch.int8), scales
    nibbles = (q + 8).to(torch.uint8).view(-1, 2)
    return nibbles[:, 0] | (nibbles[:, 1] << 4), scales


def dequantize_blockwise(q: torch.Tensor, scales: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """Float32 values of one quantised tensor (int8 if `q` is int8, packed int4 if uint8)."""
    if q.dtype == torch.int8:
        values = q.to(torch.float32)
    elif q.dtype == torch.uint8:
        values = torch.stack([(q & 0xF).to(torch.int32) - 8, (q >> 4).to(torch.int32) - 8], dim=1)
        values = values.reshape(-1).to(torch.float32)
    else:
        raise TypeError(f"quantised values must be int8 or uint8 (packed int4), got {q.dtype}")
    block = values.numel() // scales.numel()
    values = (values.view(-1, block) * scales.to(torch.float32)[:, None]).view(-1)
    return values if numel is None else values[:numel]
