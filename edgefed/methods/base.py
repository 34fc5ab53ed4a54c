"""The `Method` interface: what a fine-tuning method trains, communicates, and saves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.registry import Registry
from edgefed.settings import Configurable
from edgefed.types import AdapterSpec, State

if TYPE_CHECKING:
    from edgefed.config import RunConfig

METHODS: Registry[Method] = Registry("method")
SPEC_FIELDS = frozenset(field.name for field in fields(AdapterSpec))

# Tensors that a server sends once, before round 1, so that every client starts from the same point
# (FeDeRA's SVD factors and residuals). Keys are method-defined.
SetupState = State


@dataclass(frozen=True)
class LowRankPair:
    """Keys of one adapted layer's factors in the communicated state: ΔW = scale · B · A."""

    a: str  # [r, d_in]
    b: str  # [d_out, r]
    scale: float


class Method(Configurable, ABC):
    """A fine-tuning method. Its trainable parameters are exactly what clients communicate."""

    name: ClassVar[str]
    default_lr: ClassVar[float]
    # Whether added modules process every token (LoRA, adapters) or only first-token states (early
    # exits); the cost model counts their activations and FLOPs accordingly.
    adapters_see_all_tokens: ClassVar[bool] = True
    # Whether the loss's gradient flows back through the encoder's blocks (every method that changes
    # what a block computes) or stops at the added modules (early exits that only read the blocks).
    backward_through_blocks: ClassVar[bool] = True
    # Name prefix of the heads a method predicts with instead of the checkpoint's classifier (None: that one).
    own_head_prefix: ClassVar[str | None] = None
    # What the method trains for (edgefed/tasks/): fine-tuning a classifier, or masked-LM pre-training.
    task: ClassVar[str] = "classification"
    # The folder of the run directory that holds the trained result.
    result_dir: ClassVar[str] = "adapter"
    # Split learning (FedBERT): clients hold the model's ends, the server trains its body over the Split
    # stream, and the federated state is the clients' part only.
    splits_model: ClassVar[bool] = False
    # Early exits (ee-adapter): the model predicts at every layer and a plan may cut it at any depth.
    early_exits: ClassVar[bool] = False
    # Whether it can train a multi-task label-scoring model (edgefed/tasks/multitask.py): it adapts the
    # encoder and needs no head of its own.
    multitask: ClassVar[bool] = False
    # Whether it trains a decoder language model (edgefed/tasks/instruction.py).
    trains_decoders: ClassVar[bool] = False

    def check(self, config: RunConfig) -> None:
        """Refuse, in one line, a run configuration this method cannot train (its own settings check
        themselves when it is built)."""
        if config.profiles and self.task != "classification":
            raise EdgefedError(
                f"--profiles plans fine-tuning runs; {self.name} pre-trains and takes no device profiles yet"
            )
        if config.tasks and not self.multitask:
            raise EdgefedError(
                f"--tasks trains a label-scoring model through an adapter; {self.name} cannot "
                "(use lora or federa)"
            )

    @property
    def trains_in_turns(self) -> bool:
        """Whether a round's sampled clients must train one after another (one shared server part)."""
        return False

    def adapter_spec(self, head_modules: tuple[str, ...], peft_task_type: str | None) -> AdapterSpec:
        """What shapes the adapted model: this method's settings where they name a field of the spec
        (rank, alpha, target modules, freeze), the spec's defaults elsewhere; `head_modules` train as
        the model's head and peft calls the model `peft_task_type`."""
        shaping = {name: value for name, value in self.settings.values().items() if name in SPEC_FIELDS}
        return AdapterSpec(head_modules=head_modules, peft_task_type=peft_task_type, **shaping)

    def accelerate(self, model: nn.Module) -> None:
        """Route the adapted model's layers through edgefed's kernels where the method has them."""

    def prepare_global(self, model: nn.Module, spec: AdapterSpec) -> tuple[nn.Module, SetupState]:
        """Server side, once: adapt the global model and return what clients need to match it."""
        return self.adapt(model, spec, {}), {}

    @abstractmethod
    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        """Client side: adapt a freshly loaded pre-trained model, using the server's setup state."""

    def low_rank_pairs(self, model: nn.Module) -> list[LowRankPair]:
        """Factor pairs that product-space aggregators must treat together (none for most methods)."""
        return []

    @abstractmethod
    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        """Write the trained result in a format its ecosystem loads (peft adapter or full weights)."""

    @abstractmethod
    def load(self, out_dir: Path, base: nn.Module, spec: AdapterSpec) -> nn.Module:
        """Rebuild the trained model from `save`'s output and `base`, the pre-trained model it started
        from, freshly loaded with the run's task head (methods that save full weights read only `out_dir`)."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters: the tensors that cross the network."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if params.keys() != state.keys():
        unknown = sorted(state.keys() - params.keys())[:3]
        absent = sorted(params.keys() - state.keys())[:3]
        raise ValueError(
            f"state does not match the model's trainable tensors (unknown {unknown}, absent {absent})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} != model's {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def count_trainable(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def freeze_all_but(model: nn.Module, trainable) -> nn.Module:
    """Set requires_grad from a predicate over parameter names."""
    for name, param in model.named_parameters():
        param.requires_grad = bool(trainable(name))
    return model


def in_modules(name: str, modules: tuple[str, ...]) -> bool:
    return any(name.startswith(f"{module}.") or f".{module}." in name for module in modules)


class FullWeightsMethod(Method):
    """Methods that train a subset of the model's own parameters; saved as a full `save_pretrained` model."""

    @abstractmethod
    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        """Whether the parameter called `name` trains (and travels)."""

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        return freeze_all_but(model, lambda name: self.is_trainable(name, spec))

    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    def load(self, out_dir: Path, base: nn.Module, spec: AdapterSpec) -> nn.Module:
        return type(base).from_pretrained(out_dir, local_files_only=True)  # the run's model class
