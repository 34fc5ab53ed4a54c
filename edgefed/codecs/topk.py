"""`topk:<fraction>`: only the largest-magnitude share of each tensor travels (fp16 values, int32 positions).

Biased on its own; the client's error feedback (`ErrorFeedback`) sends what it dropped later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from edgefed.errors import EdgefedError
from edgefed.settings import Settings, option


@dataclass(frozen=True)
class TopKSettings(Settings):
    """The share of each tensor's values that travels: `--codec topk:<fraction>`."""

    fraction: float = option(0.1, "share of each tensor's values sent")

    @classmethod
    def parse(cls, argument: str) -> TopKSettings:
        try:
            settings = cls(float(argument))
        except ValueError:
            settings = cls(float("nan"))
        if not 0 < settings.fraction <= 1:
            raise EdgefedError(f"codec topk:{argument}: the fraction must be in (0, 1], e.g. topk:0.1")
        return settings

    def check(self) -> None:
        if not 0 < self.fraction <= 1:
            raise EdgefedError(f"codec topk:{self.fraction:g}: the fraction must be in (0, 1], e.g. topk:0.1")


@CODECS.register("topk")
class TopKCodec(Codec):
    name = "topk"
    settings_type = TopKSettings

    @property
    def fraction(self) -> float:
        return self.settings.fraction

    @property
    def spec(self) -> str:
        return f"topk:{self.fraction:g}"

    def kept(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel))) if numel else 0

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        flat = tensor.detach().reshape(-1)
        positions = flat.abs().topk(self.kept(flat.numel()), sorted=False).indices.sort().values
        return EncodedTensor(
            name,
            tuple(tensor.shape),
            dtype_name(tensor),
            self.spec,
            data=to_bytes(flat[positions].to(torch.float16)),
            indices=to_bytes(positions.to(torch.int32)),
        )

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        kept = self.kept(encoded.numel)
        values = from_bytes(expect_length(encoded, "data", kept * 2), torch.float16)
        positions = from_bytes(expect_length(encoded, "indices", kept * 4), torch.int32).to(torch.int64)
        if kept and (positions.min() < 0 or positions.max() >= encoded.numel):
            raise ValueError(f"tensor {encoded.name}: top-k position outside its {encoded.numel} values")
        flat = torch.zeros(encoded.numel, dtype=dtype_of(encoded))
        flat[positions] = values.to(flat.dtype)
        return flat.reshape(encoded.shape)
