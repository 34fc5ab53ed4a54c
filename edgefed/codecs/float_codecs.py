"""Lossless `none` (each tensor's own dtype), and the 2-byte floats `fp16` and `bf16`."""

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


@CODECS.register("none")
class RawCodec(Codec):
    name = "none"
    lossless = True

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        return EncodedTensor(name, tuple(tensor.shape), dtype_name(tensor), self.name, to_bytes(tensor))

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        dtype = dtype_of(encoded)
        data = expect_length(encoded, "data", encoded.numel * dtype.itemsize)
        return from_bytes(data, dtype).reshape(encoded.shape)


class HalfWidthCodec(Codec):
    """Values cast to a 2-byte float on the wire, restored to the tensor's own dtype."""

    wire_dtype: ClassVar[torch.dtype]

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        data = to_bytes(tensor.to(self.wire_dtype))
        return EncodedTensor(name, tuple(tensor.shape), dtype_name(tensor), self.name, data)

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        data = expect_length(encoded, "data", encoded.numel * 2)
        return from_bytes(data, self.wire_dtype).to(dtype_of(encoded)).reshape(encoded.shape)


@CODECS.register("fp16")
class Float16Codec(HalfWidthCodec):
    """11 bits of precision; values beyond ±65504 overflow and tiny ones flush to zero."""

    name = "fp16"
    wire_dtype = torch.float16


@CODECS.register("bf16")
class Bfloat16Codec(HalfWidthCodec):
    """float32's exponent range (nothing overflows or flushes) with 8 bits of precision."""

    name = "bf16"
    wire_dtype = torch.bfloat16
