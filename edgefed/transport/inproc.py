"""In-process transport: clients live in this process and take turns on one worker model.

Each client's frozen parameters are identical (they came from the same pre-trained files and the
server's setup state), and each round starts by loading the global trainable state, so one worker
model serves every client without any client seeing another's weights. Each client encodes its
delta with the run's codec, keeping its own error-feedback residual, and the server decodes what
arrives: bytes up are the encoded sizes. The global state goes down uncompressed.
"""

from __future__ import annotations

from collections.abc import Callable

from edgefed.aggregators.base import State
from edgefed.codecs import Codec, ErrorFeedback, decode_state
from edgefed.data import EncodedExamples
from edgefed.methods.base import SetupState
from edgefed.training import LocalTrainer
from edgefed.transport.base import FitResult, Transport, payload_bytes


class InProcessTransport(Transport):
    def __init__(
        self,
        trainer: LocalTrainer,
        client_examples: list[EncodedExamples],
        steps_for: Callable[[int], int],
        seed: int,
        setup: SetupState,
        codec: Codec,
        on_step: Callable[[int, int, float], None] = lambda round_number, client_id, loss: None,
    ) -> None:
        self.trainer = trainer
        self.client_examples = client_examples
        self.steps_for = steps_for
        self.seed = seed
        self.setup_bytes = payload_bytes(setup)
        self.on_step = on_step
        self.codec = codec
        self.feedback = {client: ErrorFeedback(codec) for client in range(len(client_examples))}
        self._set_up: set[int] = set()

    def fit(self, client_id: int, round_number: int, global_state: State) -> FitResult:
        bytes_down = payload_bytes(global_state)
        if client_id not in self._set_up:  # the one-off setup state, at a client's first round
            bytes_down += self.setup_bytes
            self._set_up.add(client_id)
        update = self.trainer.fit(
            client_id,
            global_state,
            self.client_examples[client_id],
            self.steps_for(client_id),
            seed=client_round_seed(self.seed, round_number, client_id),
            on_step=lambda loss: self.on_step(round_number, client_id, loss),
        )
        encoded = self.feedback[client_id].compress(update.delta)
        device = next(iter(update.delta.values())).device
        update.delta = {name: tensor.to(device) for name, tensor in decode_state(self.codec, encoded).items()}
        return FitResult(update, bytes_down, sum(item.nbytes for item in encoded))


def client_round_seed(seed: int, round_number: int, client_id: int) -> int:
    """Distinct, reproducible randomness (batch order, dropout) per run, round and client."""
    return (seed * 1_000_003 + round_number * 10_007 + client_id) % (2**63)
