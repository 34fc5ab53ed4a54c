"""`int8` and `int4`: blockwise absmax quantisation (blocks of 64 values, one float32 scale each).

The format is `edgefed.kernels.quantize_blockwise`'s, which `weighted_sum` dequantises on the fly:
≈ 1.06 bytes a value for int8 (1 + 4/64), ≈ 0.56 for int4 (0.5 + 4/64). Use int4 with error feedback.
"""

from typing import ClassVar

import torch

from edgefed.codecs.base import (
    CODECS,
    Codec,
    EncodedTensor,
    dtype_name,
    dtype_of,
    expect_length,
    from_bytes,
    to_bytes,
)
from edgefed.kernels import dequantize_blockwise, quantize_blockwise

BLOCK = 64


class BlockwiseCodec(Codec):
    bits: ClassVar[int]

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        q, scales = quantize_blockwise(tensor, bits=self.bits, block=BLOCK)
        return EncodedTensor(
            name, tuple(tensor.shape), dtype_name(tensor), self.name, to_bytes(q), to_bytes(scales)
        )

    def quantized(self, encoded: EncodedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = max(1, -(-encoded.numel // BLOCK))
        data = expect_length(encoded, "data", blocks * BLOCK * self.bits // 8)
        scales = from_bytes(expect_length(encoded, "scales", blocks * 4), torch.float32)
        return from_bytes(data, torch.int8 if self.bits == 8 else torch.uint8), scales

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        q, scales = self.quantized(encoded)
        values = dequantize_blockwise(q, scales, numel=encoded.numel)
        return values.to(dtype_of(encoded)).reshape(encoded.shape)


@CODECS.register("int8")
class Int8BlockCodec(BlockwiseCodec):
    name = "int8"
    bits = 8


@CODECS.register("int4")
class Int4BlockCodec(BlockwiseCodec):
    name = "int4"
    bits = 4
