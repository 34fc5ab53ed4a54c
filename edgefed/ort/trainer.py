"""A local round through ONNX Runtime training artifacts, with numpy and onnxruntime alone (no torch).

ONNX Runtime's training model computes the loss and the gradients of the adapter tensors; the update
is written here, in numpy, as torch computes it: the gradients' global L2 norm clipped to
`max_grad_norm` (torch.nn.utils.clip_grad_norm_), then torch.optim.AdamW (bias-corrected moments,
decoupled weight decay) or plain SGD. ORT's own optimizer graphs implement a different AdamW (the
transformers-style one, which adds epsilon before the bias correction), so an ORT client and a torch
client would not take the same steps with them; with the update here they do, to float error.
A fresh optimizer every round, as edgefed's LocalTrainer has.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.ort import training_api

# The exported graph names each parameter as the wrapper module sees it: PARAMETER_PREFIX + its name.
PARAMETER_PREFIX = "model."
TRAINING_MODEL, EVAL_MODEL, CHECKPOINT = "training_model.onnx", "eval_model.onnx", "checkpoint"
ARTIFACT_FILES = (TRAINING_MODEL, EVAL_MODEL, CHECKPOINT)
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class UpdateRule:
    lr: float
    optimizer: str = "adamw"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class LocalRound:
    delta: dict[str, np.ndarray]  # trained − global, per adapter tensor
    losses: list[float]
    seconds: float


class OrtTrainer:
    """Trains the adapter tensors named in `trainable` from the artifacts in `folder`."""

    def __init__(
        self, folder: Path, trainable: list[str], rule: UpdateRule, threads: int | None = None
    ) -> None:
        """`threads`: ONNX Runtime's intra-op threads (None: its default, one per core)."""
        api = training_api()
        if rule.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {rule.optimizer!r}")
        self.rule = rule
        self.trainable = list(trainable)
        self.state = api.CheckpointState.load_checkpoint(str(folder / CHECKPOINT))
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.module = api.Module(
            str(folder / TRAINING_MODEL), self.state, str(folder / EVAL_MODEL), "cpu", options
        )
        self.inputs = list(self.module.input_names())
        self.parameters = {name: self.state.parameters[PARAMETER_PREFIX + name] for name in self.trainable}

    def fit(
        self,
        global_state: dict[str, np.ndarray],
        batches: Iterable[dict[str, np.ndarray]],
        on_step: Callable[[float], None] = lambda loss: None,
    ) -> LocalRound:
        """Train from `global_state` on `batches` (input_ids, attention_mask, token_type_ids, labels)."""
        if set(global_state) != set(self.trainable):
            raise ValueError("the state does not hold exactly the adapter tensors the artifacts train")
        weights = {name: np.array(global_state[name], dtype=np.float32) for name in self.trainable}
        moments = {name: (np.zeros_like(w), np.zeros_like(w)) for name, w in weights.items()}
        losses: list[float] = []
        start = time.perf_counter()
        self.module.train()
        for step, batch in enumerate(batches, start=1):
            for name, weight in weights.items():
                self.parameters[name].data = weight
            loss = float(self.module(*(batch[name] for name in self.inputs)))
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged (loss {loss}) at local step {step}; lower --lr")
            grads = {name: self.parameters[name].grad for name in self.trainable}
            self.module.lazy_reset_grad()
            self._update(weights, grads, moments, step)
            losses.append(loss)
            on_step(loss)
        seconds = time.perf_counter() - start
        delta = {name: weights[name] - global_state[name] for name in self.trainable}
        return LocalRound(delta, losses, seconds)

    def _update(self, weights: dict, grads: dict, moments: dict, step: int) -> None:
        rule = self.rule
        if rule.max_grad_norm:
            norm = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))
            scale = min(1.0, rule.max_grad_norm / (norm + 1e-6))
            grads = {name: g * np.float32(scale) for name, g in grads.items()}
        for name, grad in grads.items():
            weight = weights[name]
            if rule.optimizer == "sgd":
                weight -= np.float32(rule.lr) * grad
                continue
            first, second = moments[name]
            beta1, beta2 = rule.betas
            weight *= np.float32(1 - rule.lr * rule.weight_decay)
            first += np.float32(1 - beta1) * (grad - first)  # torch's lerp form of β1·m + (1 − β1)·g
            second *= np.float32(beta2)
            second += np.float32(1 - beta2) * grad * grad
            step_size = rule.lr / (1 - beta1**step)
            denominator = np.sqrt(second) / np.float32(math.sqrt(1 - beta2**step)) + np.float32(rule.eps)
            weight -= np.float32(step_size) * first / denominator
