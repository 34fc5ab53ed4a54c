"""Local training and evaluation: the inner loop a client runs each round, and the server's evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from edgefed.aggregators.base import ClientUpdate, State
from edgefed.data import EncodedExamples, ordered_batches, shuffled_batches
from edgefed.errors import EdgefedError
from edgefed.methods.base import load_trainable_state

MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 64


class LocalTrainer:
    """Trains a model's trainable tensors from a given global state (fresh AdamW each round)."""

    def __init__(self, model: nn.Module, lr: float, batch_size: int, device: torch.device) -> None:
        self.model = model.to(device)
        self.lr = lr
        self.batch_size = batch_size
        self.device = device

    def fit(
        self,
        client_id: int,
        global_state: State,
        examples: EncodedExamples,
        steps: int,
        seed: int,
        on_step: Callable[[float], None] = lambda loss: None,
    ) -> ClientUpdate:
        model = self.model
        load_trainable_state(model, global_state)
        trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        params = [param for _, param in trainable]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout masks
        model.train()
        losses = []
        start = time.perf_counter()
        for indices in shuffled_batches(len(examples), self.batch_size, steps, generator):
            batch = {key: value.to(self.device) for key, value in examples.batch(indices).items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise EdgefedError(
                    f"client {client_id}: training diverged (loss {loss.item()}) at local step "
                    f"{len(losses) + 1}; lower --lr"
                )
            loss.backward()
            nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            on_step(losses[-1])
        train_s = time.perf_counter() - start
        delta = {name: param.detach() - global_state[name] for name, param in trainable}
        return ClientUpdate(client_id, delta, len(examples), sum(losses) / len(losses), len(losses), train_s)


def local_steps(num_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """A round's local steps: fixed, or enough batches for `epochs` passes over the client's data."""
    if steps is not None:
        return steps
    assert epochs is not None
    return max(1, math.ceil(epochs * num_examples / batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, examples: EncodedExamples, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over all examples."""
    model.eval()
    correct, loss_sum = 0, 0.0
    # Length-sorted batches pad less; the order does not change the metrics.
    by_length = sorted(range(len(examples)), key=lambda i: len(examples.input_ids[i]))
    for positions in ordered_batches(len(examples), EVAL_BATCH_SIZE):
        indices = [by_length[position] for position in positions]
        batch = {key: value.to(device) for key, value in examples.batch(indices).items()}
        output = model(**batch)
        loss_sum += output.loss.item() * len(indices)
        correct += (output.logits.argmax(dim=-1) == batch["labels"]).sum().item()
    return correct / len(examples), loss_sum / len(examples)
