"""The `Aggregator` interface: combine client deltas into the next global state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from edgefed.errors import EdgefedError
from edgefed.kernels import weighted_sum
from edgefed.methods.base import LowRankPair
from edgefed.registry import Registry

AGGREGATORS: Registry[Aggregator] = Registry("aggregator")
State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: int
    delta: State  # local − global, one entry per communicated tensor
    num_examples: int  # n_k: the client's training examples; FedAvg weight p_k = n_k / Σ n_j
    train_loss: float  # mean loss over the client's local steps
    steps: int
    train_s: float  # wall-clock seconds of local training on this machine


class Aggregator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], pairs: Sequence[LowRankPair]
    ) -> State:
        """The next global state. `pairs` name the low-rank factors that belong together."""

    def state_dict(self) -> State:
        """What the aggregator carries between rounds (a server optimiser's moments); checkpointed."""
        return {}

    def load_state_dict(self, state: State) -> None:
        if state:
            raise ValueError(f"aggregator '{self.name}' keeps no state, got {sorted(state)[:3]}")


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    if not updates:
        raise ValueError("cannot aggregate zero client updates")
    total = sum(update.num_examples for update in updates)
    if total <= 0:
        raise ValueError("client updates carry no training examples")
    return [update.num_examples / total for update in updates]


def weighted_mean_step(global_state: State, updates: Sequence[ClientUpdate], keys: Iterable[str]) -> State:
    """global + Σ_k p_k·δ_k for each key, the sum fused and accumulated in float32 (`weighted_sum`)."""
    weights = client_weights(updates)
    result = {}
    for key in keys:
        base = global_state[key]
        for update in updates:
            if key not in update.delta or update.delta[key].shape != base.shape:
                raise EdgefedError(
                    f"client {update.client_id} sent {'no' if key not in update.delta else 'a partial'} "
                    f"{key}: clients with different plans need --aggregator hetero"
                )
        step = weighted_sum([update.delta[key] for update in updates], weights).view(base.shape)
        result[key] = (base.to(torch.float32) + step).to(base.dtype)
    return result
