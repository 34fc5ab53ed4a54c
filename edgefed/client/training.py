"""Local training: the inner loop a client runs each round."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from edgefed.data import EncodedExamples, shuffled_batches
from edgefed.errors import EdgefedError
from edgefed.families import evaluate_classifier
from edgefed.methods.base import load_trainable_state
from edgefed.methods.ee_adapter import EarlyExitModel
from edgefed.scope import Scope, block_mask, leading_block
from edgefed.tasks.pseudo import PseudoLabels
from edgefed.types import ClientUpdate, State


class LocalTrainer:
    """Trains a model's trainable tensors from a given global state (fresh AdamW each round).

    A client's scope (edgefed/scope.py) may narrow what it trains: tensors outside it are frozen for
    the round (backward stops below the lowest trained layer), leading blocks get masked gradients,
    and early-exit models run only up to the plan's exit.

    FewFedWeight (edgefed/tasks/pseudo.py): with `pseudo`, the model as received labels the client's
    unlabelled pool first, and each step adds λ times the weighted loss of a batch of pseudo labels;
    with `holdout`, the trained model's accuracy on it is the update's `score`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        batch_size: int,
        device: torch.device,
        max_grad_norm: float | None,
    ) -> None:
        """`max_grad_norm`: clip the local gradient's L2 norm to it (None or 0: no clipping)."""
        self.model = model.to(device)
        self.lr = lr
        self.max_grad_norm = max_grad_norm or None
        self.batch_size = batch_size
        self.device = device
        self.trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}

    def fit(
        self,
        client_id: int,
        global_state: State,
        examples: EncodedExamples,
        steps: int,
        seed: int,
        on_step: Callable[[float], None] = lambda loss: None,
        scope: Scope | None = None,
        exit_layer: int | None = None,
        batch_size: int | None = None,
        pseudo: PseudoLabels | None = None,
        holdout: EncodedExamples | None = None,
    ) -> ClientUpdate:
        model = self.model
        if scope is None:
            load_trainable_state(model, global_state)
            scope = Scope.everything({name: tuple(p.shape) for name, p in self.trainable.items()})
        else:
            self._load_received(global_state, scope)
        trainable = [(name, self.trainable[name]) for name in scope.sent]
        masks = {
            name: mask
            for name, param in trainable
            if (mask := block_mask(tuple(param.shape), scope.sent[name], param.device)) is not None
        }
        for name, param in self.trainable.items():
            param.requires_grad_(name in scope.sent)
        early_exit = isinstance(model, EarlyExitModel)
        if early_exit:  # early-exit models run only up to the plan's exit
            model.exit_layer = exit_layer or model.num_layers
        params = [param for _, param in trainable]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout masks
        batch_size = batch_size or self.batch_size
        start = time.perf_counter()
        pseudo_batches = None
        if pseudo is not None:
            labeled_pool = pseudo.label(model, self.device)
            pseudo_batches = (
                labeled_pool.batch(indices)
                for indices in shuffled_batches(len(labeled_pool), batch_size, steps, generator)
            )
        model.train()
        losses = []
        try:
            for indices in shuffled_batches(len(examples), batch_size, steps, generator):
                batch = examples.batch(indices, generator)  # the generator also draws MLM masks
                loss = model(**self._on_device(batch)).loss
                if pseudo_batches is not None:
                    loss = loss + pseudo.weight * model(**self._on_device(next(pseudo_batches))).loss
                if not torch.isfinite(loss):
                    raise EdgefedError(
                        f"client {client_id}: training diverged (loss {loss.item()}) at local step "
                        f"{len(losses) + 1}; lower --lr"
                    )
                loss.backward()
                for name, mask in masks.items():  # components beyond the plan's rank stay put
                    self.trainable[name].grad.mul_(mask)
                if self.max_grad_norm:
                    nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                on_step(losses[-1])
        finally:
            for param in self.trainable.values():
                param.requires_grad_(True)
            if early_exit:
                model.exit_layer = model.num_layers
        score = evaluate_classifier(model, holdout, self.device).accuracy if holdout is not None else None
        train_s = time.perf_counter() - start
        delta = {
            name: leading_block(param.detach() - global_state[name], scope.sent[name])
            for name, param in trainable
        }
        return ClientUpdate(
            client_id, delta, len(examples), sum(losses) / len(losses), len(losses), train_s, score
        )

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def _load_received(self, global_state: State, scope: Scope) -> None:
        if set(global_state) != set(scope.received):
            unknown = sorted(set(global_state) - set(scope.received))[:3]
            absent = sorted(set(scope.received) - set(global_state))[:3]
            raise ValueError(f"state does not match the client's scope (unknown {unknown}, absent {absent})")
        for name, tensor in global_state.items():
            param = self.trainable.get(name)
            if param is None or param.shape != tensor.shape:
                raise ValueError(f"{name}: not a trainable tensor of this shape in the client's model")
            param.copy_(tensor)
