"""In-process clients that train through an ExecuTorch training program (`--client-runtime executorch`).

`EtLocalTrainer` has LocalTrainer's `fit`: the same batches from the same seed, padded to the
program's fixed shape (padding tokens are masked, padding rows carry the IGNORED label, so the loss
and gradients are those of the unpadded batch), then the program's forward-and-backward and torch's
own update (clipping, then AdamW) on the program's parameters, in place. A torch client and an
ExecuTorch client given the same state and data take the same steps, to float error. As the ort
runtime does, it trains the run's whole adapters: no device plans, early exits or pseudo labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from edgefed.data import EncodedExamples, shuffled_batches
from edgefed.errors import EdgefedError
from edgefed.et import require_executorch
from edgefed.et.program import IGNORED
from edgefed.types import ClientUpdate, State

# The program's parameters are named as the wrapper module sees them (edgefed/et/program.py).
PARAMETER_PREFIX = "model."


class EtLocalTrainer:
    def __init__(
        self,
        program: bytes,
        trainable: list[str],
        lr: float,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        max_grad_norm: float | None,
    ) -> None:
        """`program`: training_program(...) for `trainable`, `batch_size` rows of `seq_len` tokens."""
        require_executorch()
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer

        self.program = program  # the module reads the buffer in place: it must outlive the module
        self.module = _load_for_executorch_for_training_from_buffer(program)
        self.lr, self.batch_size, self.seq_len, self.pad_id = lr, batch_size, seq_len, pad_id
        self.max_grad_norm = max_grad_norm or None
        # ExecuTorch names its parameters only after a first forward-and-backward (1.5.1): one on a
        # padding batch, then the parameters stay where they are, and a round writes the state into them.
        self.module.forward_backward(
            "forward", self._padded({"input_ids": torch.zeros(0, 1, dtype=torch.long)})
        )
        named = self.module.named_parameters()
        missing = sorted(set(trainable) - {name.removeprefix(PARAMETER_PREFIX) for name in named})
        if missing:
            raise ValueError(f"the program does not train {missing[:3]}")
        self.parameters = {name: nn.Parameter(named[PARAMETER_PREFIX + name]) for name in trainable}

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
        slice) must all be None, and `batch_size` the program's."""
        narrowed = any(value is not None for value in narrowing.values())
        if narrowed or batch_size not in (None, self.batch_size):
            raise EdgefedError(
                "the executorch runtime trains whole adapters: no plans, exits or pseudo labels"
            )
        if set(global_state) != set(self.parameters):
            raise ValueError("the state does not hold exactly the adapter tensors the program trains")
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(global_state[name])
        params = list(self.parameters.values())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        start = time.perf_counter()
        for indices in shuffled_batches(len(examples), self.batch_size, steps, generator):
            inputs = self._padded(examples.batch(indices, generator))
            loss = self.module.forward_backward("forward", inputs)[0]
            if not torch.isfinite(loss):
                raise EdgefedError(
                    f"client {client_id}: training diverged (loss {loss.item()}) at local step "
                    f"{len(losses) + 1}; lower --lr"
                )
            gradients = self.module.named_gradients()
            for name, parameter in self.parameters.items():
                parameter.grad = gradients[PARAMETER_PREFIX + name]
            if self.max_grad_norm:
                nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            on_step(losses[-1])
        train_s = time.perf_counter() - start
        delta = {name: parameter.detach() - global_state[name] for name, parameter in self.parameters.items()}
        return ClientUpdate(client_id, delta, len(examples), sum(losses) / len(losses), len(losses), train_s)

    def _padded(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The program's inputs: `batch` padded to batch_size × seq_len (segment ids zero where absent)."""
        rows, width = batch["input_ids"].shape
        if rows > self.batch_size or width > self.seq_len:
            raise ValueError(f"a {rows}×{width} batch exceeds the program's {self.batch_size}×{self.seq_len}")
        shape = (self.batch_size, self.seq_len)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        segments = torch.zeros(shape, dtype=torch.long)
        labels = torch.full((self.batch_size,), IGNORED, dtype=torch.long)
        ids[:rows, :width] = batch["input_ids"]
        if rows:
            mask[:rows, :width] = batch["attention_mask"]
            labels[:rows] = batch["labels"]
            if "token_type_ids" in batch:
                segments[:rows, :width] = batch["token_type_ids"]
        return ids, mask, segments, labels
