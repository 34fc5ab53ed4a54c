"""The `Codec` interface: how a client's delta becomes bytes on the wire, and back.

An encoded tensor keeps its name, shape and dtype beside the codec's byte fields, so the wire
format (protobuf, never pickle) maps it field by field; `nbytes` is what it costs on the wire.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from edgefed.errors import EdgefedError
from edgefed.registry import Registry
from edgefed.types import EncodedTensor, Pieces, State

CODECS: Registry[Codec] = Registry("codec")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,  # checksums in FeDeRA's setup state (always the lossless `none` codec)
}


class Codec(ABC):
    name: ClassVar[str]
    lossless: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The `--codec` value that builds this codec."""
        return self.name

    @abstractmethod
    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor: ...

    @abstractmethod
    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """The tensor, on the CPU in its own dtype; ValueError when the fields do not fit its shape."""

    def quantized(self, encoded: EncodedTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q, scales) in `edgefed.kernels.quantize_blockwise`'s format, which `weighted_sum` dequantises
        on the fly, without decoding; None for codecs without that form. ValueError as `decode`."""
        return None


def make_codec(spec: str) -> Codec:
    """`none`, `fp16`, `int8`, `int4` or `topk:<fraction>`."""
    name, _, argument = spec.partition(":")
    codec = CODECS.create(name)
    if argument:
        configure = getattr(codec, "configure", None)
        if configure is None:
            raise EdgefedError(f"codec '{name}' takes no argument, got '{spec}'")
        configure(argument)
    elif getattr(codec, "needs_argument", False):
        raise EdgefedError(f"codec '{name}' needs an argument, e.g. {name}:0.1")
    return codec


def encode_state(codec: Codec, state: State) -> list[EncodedTensor]:
    return [codec.encode(name, tensor) for name, tensor in state.items()]


def decode_state(codec: Codec, encoded: list[EncodedTensor]) -> State:
    return {item.name: codec.decode(item) for item in encoded}


def expect_length(encoded: EncodedTensor, field: str, expected: int) -> bytes | memoryview | Pieces:
    value = getattr(encoded, field)
    if len(value) != expected:
        raise ValueError(f"tensor {encoded.name}: {field} holds {len(value)} bytes, {expected} expected")
    return value


def dtype_of(encoded: EncodedTensor) -> torch.dtype:
    if encoded.dtype not in DTYPES:
        raise ValueError(f"tensor {encoded.name}: unsupported dtype '{encoded.dtype}'")
    return DTYPES[encoded.dtype]


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes | memoryview | Pieces, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over `data`: a view of a writable buffer, else over a copy (received bytes are read-only
    views into their chunks; the copy is the one a received tensor costs, made when it is first read)."""
    if not len(data):
        return torch.empty(0, dtype=dtype)
    if isinstance(data, Pieces):
        data = data.join()
    writable = isinstance(data, memoryview) and not data.readonly
    return torch.frombuffer(data if writable else bytearray(data), dtype=dtype)
