"""Robust aggregation for fleets whose clients may lie: each update is clipped to the round's median
update norm, then combined coordinate by coordinate with a statistic that a minority of clients
cannot drag far, the median or the trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018).

Clipping to the median norm bounds what any client adds to the step (an update scaled up a
thousandfold counts as much as a typical one), with no bound to tune; the coordinate-wise statistic
then resists updates that point the wrong way. Both ignore the example counts clients report, so a
client lying about its data size gains nothing. The price is statistical efficiency on honest,
non-IID fleets: benchmarks/results/robust.md measures it on the demo. Like FedAvg they average LoRA's
A and B apart (edgefed/aggregators/fedavg.py says why that is inexact), and every client must send the
whole state (clients with different plans need `hetero`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch

from edgefed.aggregators.base import AGGREGATORS, Aggregator
from edgefed.aggregators.settings import TrimSettings
from edgefed.errors import EdgefedError
from edgefed.methods.base import LowRankPair
from edgefed.types import ClientUpdate, State


def clipped_deltas(global_state: State, updates: Sequence[ClientUpdate]) -> list[dict[str, torch.Tensor]]:
    """Each client's delta in float32, scaled down to at most the median of the round's update norms."""
    if not updates:
        raise ValueError("cannot aggregate zero client updates")
    deltas = []
    for update in updates:
        missing = [key for key in global_state if key not in update.delta]
        if missing or any(update.delta[k].shape != global_state[k].shape for k in global_state):
            raise EdgefedError(
                f"client {update.client_id} sent a partial update: clients with different plans need "
                "--aggregator hetero"
            )
        # Copies: clipping scales them in place, and an update's decoded tensors are cached.
        deltas.append({key: update.delta[key].to(torch.float32, copy=True) for key in global_state})
    norms = [math.sqrt(sum(float(t.square().sum()) for t in delta.values())) for delta in deltas]
    bound = sorted(norms)[(len(norms) - 1) // 2]
    for delta, norm in zip(deltas, norms, strict=True):
        if norm > bound > 0:
            for tensor in delta.values():
                tensor.mul_(bound / norm)
    return deltas


class CoordinateWise(Aggregator):
    """global + statistic_k(clipped δ_k), coordinate by coordinate."""

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], pairs: Sequence[LowRankPair]
    ) -> State:
        deltas = clipped_deltas(global_state, updates)
        result = {}
        for key, base in global_state.items():
            ordered = torch.stack([delta[key] for delta in deltas]).sort(dim=0).values
            step = self.statistic(ordered)
            result[key] = (base.to(torch.float32) + step).to(base.dtype)
        return result

    @abstractmethod
    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        """The step from the clients' values of each coordinate, sorted along dimension 0."""


@AGGREGATORS.register("median")
class MedianAggregator(CoordinateWise):
    name = "median"

    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        count = ordered.shape[0]
        return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


@AGGREGATORS.register("trimmed-mean")
class TrimmedMeanAggregator(CoordinateWise):
    name = "trimmed-mean"
    settings_type = TrimSettings

    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        count = ordered.shape[0]
        trim = min(math.ceil(self.settings.trim_fraction * count), (count - 1) // 2)
        return ordered[trim : count - trim].mean(dim=0)
