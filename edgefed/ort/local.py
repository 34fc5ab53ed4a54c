"""In-process clients that train through ONNX Runtime (`--client-runtime ort`).

`OrtLocalTrainer` has LocalTrainer's `fit`: it draws the same batches from the same seed (so a torch
client and an ORT client given the same state and data take the same steps), hands them to the
torch-free OrtTrainer as numpy arrays, and returns its delta as a ClientUpdate. It trains what the
run trains: a device plan that narrows the trained tensors, early exits and few-shot pseudo labels
stay with the torch runtime (the configuration refuses them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgefed.data import EncodedExamples, shuffled_batches
from edgefed.errors import EdgefedError
from edgefed.ort.trainer import OrtTrainer, UpdateRule
from edgefed.types import ClientUpdate, State


class OrtLocalTrainer:
    def __init__(
        self, folder: Path, trainable: list[str], lr: float, batch_size: int, max_grad_norm: float | None
    ) -> None:
        self.trainer = OrtTrainer(folder, trainable, UpdateRule(lr, "adamw", max_grad_norm or None))
        self.batch_size = batch_size

    def fit(
        self,
        client_id: int,
        global_state: State,
        examples: EncodedExamples,
        steps: int,
        seed: int,
        on_step: Callable[[float], None] = lambda loss: None,
        batch_size: int | None = None,
        **narrowing,
    ) -> ClientUpdate:
        """LocalTrainer.fit's round; `narrowing` (a plan's scope, an exit, pseudo labels, a held-out
        slice) must all be None: the ORT runtime trains the run's whole adapters."""
        if any(value is not None for value in narrowing.values()):
            raise EdgefedError("the ort runtime trains whole adapters: no plans, exits or pseudo labels")
        generator = torch.Generator().manual_seed(seed)
        batches = (
            graph_inputs(examples.batch(indices, generator))
            for indices in shuffled_batches(len(examples), batch_size or self.batch_size, steps, generator)
        )
        state = {name: tensor.detach().cpu().float().numpy() for name, tensor in global_state.items()}
        try:
            trained = self.trainer.fit(state, batches, on_step)
        except FloatingPointError as error:
            raise EdgefedError(f"client {client_id}: {error}") from None
        delta = {name: torch.from_numpy(value) for name, value in trained.delta.items()}
        mean_loss = sum(trained.losses) / len(trained.losses)
        return ClientUpdate(client_id, delta, len(examples), mean_loss, len(trained.losses), trained.seconds)


def graph_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """A batch as the exported graph takes it: segment ids are zeros where the batch has none."""
    arrays = {name: tensor.numpy() for name, tensor in batch.items()}
    arrays.setdefault("token_type_ids", arrays["input_ids"] * 0)
    return arrays
