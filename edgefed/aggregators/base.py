"""The `Aggregator` interface: combine client deltas into the next global state."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from edgefed.codecs.delta import delta_shape, quantized_stack
from edgefed.errors import EdgefedError
from edgefed.kernels import weighted_sum
from edgefed.methods.base import LowRankPair
from edgefed.registry import Registry
from edgefed.settings import Configurable
from edgefed.types import ClientUpdate, State

if TYPE_CHECKING:
    from edgefed.config import RunConfig

AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


class Aggregator(Configurable, ABC):
    name: ClassVar[str]

    def check(self, config: RunConfig) -> None:
        """Refuse, in one line, a run configuration whose updates this aggregator cannot combine."""

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


def bounded_shares(updates: Sequence[ClientUpdate], max_share: float) -> list[ClientUpdate]:
    """The updates with their example counts lowered so that no client holds more than `max_share` of
    the round's total: the largest counts drop to a common cap c = max_share·Σ_k min(n_k, c), the others
    are kept (water-filling); with max_share·K ≤ 1 every client counts the same. A client that
    declares 10¹⁵ examples then weighs what `max_share` allows, and no more."""
    counts = [float(update.num_examples) for update in updates]
    if max_share >= 1 or not counts or max(counts) <= max_share * sum(counts):
        return list(updates)
    if max_share * len(counts) <= 1:
        capped = [1.0] * len(counts)
    else:
        order = sorted(counts, reverse=True)
        rest = sum(order)
        for top in range(1, len(order)):  # cap the `top` largest counts
            rest -= order[top - 1]
            cap = max_share * rest / (1 - max_share * top)
            if order[top] <= cap <= order[top - 1]:
                break
        capped = [min(count, cap) for count in counts]
    return [
        dataclasses.replace(update, num_examples=count) for update, count in zip(updates, capped, strict=True)
    ]


def weighted_mean_step(
    global_state: State,
    updates: Sequence[ClientUpdate],
    keys: Iterable[str],
    weights: Sequence[float] | None = None,
) -> State:
    """global + Σ_k p_k·δ_k for each key, the sum fused and accumulated in float32 (`weighted_sum`);
    quantised deltas (int8, int4) are dequantised inside that one pass, never decoded apart.
    `weights`: the p_k (default: by example counts, `client_weights`)."""
    weights = client_weights(updates) if weights is None else list(weights)
    deltas = [update.delta for update in updates]
    result = {}
    for key in keys:
        base = global_state[key]
        for update in updates:
            if key not in update.delta or delta_shape(update.delta, key) != tuple(base.shape):
                raise EdgefedError(
                    f"client {update.client_id} sent {'no' if key not in update.delta else 'a partial'} "
                    f"{key}: clients with different plans need --aggregator hetero"
                )
        quantized = quantized_stack(deltas, key)
        if quantized is not None:
            step = weighted_sum(quantized[0], weights, quantized[1])[: base.numel()]
        else:
            step = weighted_sum([delta[key] for delta in deltas], weights)
        result[key] = (base.to(torch.float32) + step.view(base.shape)).to(base.dtype)
    return result
