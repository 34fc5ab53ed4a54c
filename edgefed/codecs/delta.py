"""A client's delta as the server received it: kept encoded, decoded per tensor only where needed.

The aggregators' weighted means read quantised tensors (int8, int4) straight into `weighted_sum`,
which dequantises and sums them in one pass; everything else (product-space refactoring, the hetero
aggregator's partial blocks, a float codec) reads decoded tensors, each decoded once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from edgefed.codecs.base import Codec
from edgefed.types import EncodedTensor


class EncodedDelta(Mapping[str, torch.Tensor]):
    def __init__(
        self,
        encoded: Sequence[EncodedTensor],
        codec: Codec,
        device: torch.device,
        decoded: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """`decoded`: tensors already decoded on arrival (the checks decode what has no quantised form)."""
        self.encoded = {item.name: item for item in encoded}
        self.codec = codec
        self.device = device
        self._decoded = {name: tensor.to(device) for name, tensor in (decoded or {}).items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._decoded:
            self._decoded[name] = self.codec.decode(self.encoded[name]).to(self.device)
        return self._decoded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.encoded[name].shape

    def quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q, scales) of a quantised tensor on the server's device, or None."""
        form = self.codec.quantized(self.encoded[name])
        return None if form is None else (form[0].to(self.device), form[1].to(self.device))


def delta_shape(delta: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A delta tensor's shape, without decoding it."""
    return delta.shape(name) if isinstance(delta, EncodedDelta) else tuple(delta[name].shape)


def quantized_stack(
    deltas: Sequence[Mapping[str, torch.Tensor]], name: str
) -> tuple[torch.Tensor, ...] | None:
    """(q [K, M], scales [K, n_blocks]) of one tensor over K encoded deltas, when every one is quantised
    alike (the fused dequantise-and-sum input); None otherwise."""
    if not all(isinstance(delta, EncodedDelta) for delta in deltas):
        return None
    forms = [delta.quantized(name) for delta in deltas]
    if any(form is None for form in forms) or len({(q.dtype, q.numel()) for q, _ in forms}) != 1:
        return None
    return torch.stack([q for q, _ in forms]), torch.stack([scales for _, scales in forms])
