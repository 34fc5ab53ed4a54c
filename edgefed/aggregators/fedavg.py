"""FedAvg (McMahan et al., 2017): the weighted mean of every tensor, LoRA's A and B each on their own.

For LoRA factors this is what Flower, NVFlare, FedML and FeDeRA's paper do, and it is inexact:
(Σ p_k B_k)(Σ p_k A_k) ≠ Σ p_k B_k A_k (the cross terms B_j·A_k, j ≠ k, do not cancel). The
`product` aggregator is the exact one.
"""

from collections.abc import Sequence

from edgefed.aggregators.base import AGGREGATORS, Aggregator, weighted_mean_step
from edgefed.methods.base import LowRankPair
from edgefed.types import ClientUpdate, State


@AGGREGATORS.register("fedavg")
class FedAvgAggregator(Aggregator):
    name = "fedavg"

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], pairs: Sequence[LowRankPair]
    ) -> State:
        return weighted_mean_step(global_state, updates, global_state.keys())
