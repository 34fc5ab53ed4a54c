"""Lossless `none` (each tensor's own dtype) and `fp16` (half precision, 2 bytes a value)."""

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


@CODECS.register("fp16")
class Float16Codec(Codec):
    name = "fp16"

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        data = to_bytes(tensor.to(torch.float16))
        return EncodedTensor(name, tuple(tensor.shape), dtype_name(tensor), self.name, data)

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        data = expect_length(encoded, "data", encoded.numel * 2)
        return from_bytes(data, torch.float16).to(dtype_of(encoded)).reshape(encoded.shape)
