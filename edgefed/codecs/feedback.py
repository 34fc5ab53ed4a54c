"""Error feedback (EF-SGD): a client adds what its codec dropped last round to this round's delta."""

from __future__ import annotations

import torch

from edgefed.codecs.base import Codec, encode_state
from edgefed.types import EncodedTensor, State


class ErrorFeedback:
    """Per-client residuals of a lossy codec; lossless codecs keep none.

    A round can be run twice (the server discarded it, or restarted from its checkpoint); the residual
    from before a round's first attempt is kept so the second attempt encodes exactly what the first did.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: State = {}
        self._round: int | None = None
        self._before: State = {}

    def compress(self, delta: State, round_number: int) -> list[EncodedTensor]:
        if self.codec.lossless:
            return encode_state(self.codec, delta)
        if round_number == self._round:
            self.residual = dict(self._before)
        self._round, self._before = round_number, dict(self.residual)
        compensated = {name: tensor + self.residual.get(name, 0.0) for name, tensor in delta.items()}
        encoded = encode_state(self.codec, compensated)
        for item in encoded:
            sent = self.codec.decode(item).to(compensated[item.name].device)
            self.residual[item.name] = (compensated[item.name] - sent).detach()
        return encoded

    def state(self) -> tuple[int | None, State, State]:
        """(the last round encoded, the residual, the residual before that round): what a client keeps
        between rounds, for runtimes that keep it outside the client object (a Flower node's state)."""
        return self._round, self.residual, self._before

    def restore(self, round_number: int | None, residual: State, before: State) -> None:
        self._round, self.residual, self._before = round_number, dict(residual), dict(before)

    def residual_norm(self) -> float:
        return (
            float(torch.sqrt(sum((r.double() ** 2).sum() for r in self.residual.values())))
            if self.residual
            else 0.0
        )
