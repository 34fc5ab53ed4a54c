"""The `Codec` interface: how a client's delta becomes bytes on the wire, and back.

An encoded tensor keeps its name, shape and dtype beside the codec's byte fields, so the wire
format (protobuf, never pickle) maps it field by field; `nbytes` is what it costs on the wire.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from edgefed.errors import EdgefedError
from edgefed.kernels import dequantize_blockwise
from edgefed.registry import Registry
from edgefed.settings import Configurable
from edgefed.types import EncodedTensor, Pieces, State
from edgefed.values import NUMPY_FLOATS, square_sum, whole_values

CODECS: Registry[Codec] = Registry("codec")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,  # checksums in FeDeRA's setup state (always the lossless `none` codec)
}


class Codec(Configurable, ABC):
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

    def square_sum(self, encoded: EncodedTensor) -> tuple[float, torch.Tensor | None]:
        """Σ x² over a tensor's values (NaN or Inf when a value is not finite), and the decoded tensor
        when decoding was needed for it. A quantised tensor's sum comes from its q and scales,
        Σ_b scale_b²·Σ q², in float64 and without decoding: its q are finite by construction, so its
        values are when its scales are. A lossless tensor's values are its bytes, read in place (decoded
        when first used). ValueError when the fields do not fit the shape."""
        quantized = self.quantized(encoded)
        if quantized is not None:
            q, scales = quantized
            per_block = dequantize_blockwise(q, torch.ones_like(scales)).double().view(scales.numel(), -1)
            return float((per_block.square().sum(dim=1) * scales.double().square()).sum()), None
        if self.lossless:
            dtype = dtype_of(encoded)
            data = expect_length(encoded, "data", encoded.numel * dtype.itemsize)
            if encoded.dtype in NUMPY_FLOATS:  # read in place, as the bytes arrived
                return sum(
                    square_sum(part, encoded.dtype) for part in whole_values(data, dtype.itemsize)
                ), None
            return sum(_squares(_read_only(part, dtype)) for part in whole_values(data, dtype.itemsize)), None
        value = self.decode(encoded)
        return _squares(value.reshape(-1)), value


def make_codec(spec: str) -> Codec:
    """`none`, `fp16`, `int8`, `int4` or `topk:<fraction>`: a codec's settings are its argument."""
    name, _, argument = spec.partition(":")
    settings_type = CODECS.settings_type(name)
    if not argument:
        if settings_type.fields():
            raise EdgefedError(f"codec '{name}' needs an argument, e.g. {name}:0.1")
        return CODECS.create(name)
    parse = getattr(settings_type, "parse", None)
    if parse is None:
        raise EdgefedError(f"codec '{name}' takes no argument, got '{spec}'")
    return CODECS.create(name, parse(argument))


def bytes_per_value(spec: str) -> float:
    """What the codec `spec` spends per element of a delta (measured on a probe tensor, framing
    excluded): what the planner charges a device's link for each value it sends."""
    probe = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    encoded = encode_state(make_codec(spec), {"probe": probe})[0]
    return encoded.nbytes / probe.numel()


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


def _squares(values: torch.Tensor) -> float:
    flat = values.float()
    square_sum = float(torch.dot(flat, flat))  # one BLAS pass; NaN and Inf propagate into it
    if math.isinf(square_sum) and bool(torch.isfinite(flat).all()):
        square_sum = float(flat.double().square().sum())  # finite, but squares beyond float32
    return square_sum


def _read_only(part: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # scoped to the call: the filters are the process's, not a thread's
        warnings.simplefilter("ignore")  # torch warns that the received bytes are not writable
        return torch.frombuffer(part, dtype=dtype)
