"""Heterogeneous FedAvg: every element averaged over the clients that hold it, weighted by data size.

Clients with different plans (edgefed/devices/planner.py) send different parts of the global state: a
client with frozen layers sends nothing for them, a client with an early exit nothing beyond it, a
client with a lower rank the leading components of each LoRA factor pair (A[:r_k], B[:, :r_k]).
Every client tensor is the leading block of the global one (edgefed/scope.py), so

    θ ← θ + Σ_k n_k·m_k⊙δ_k / Σ_k n_k·m_k        element-wise, where Σ_k n_k·m_k > 0

with m_k the indicator of client k's block; an element nobody trained keeps its value. For LoRA
factors this is rank-aware: rank component j of a layer is the n_k-weighted mean over the clients
whose rank exceeds j, never diluted by the zeros of clients that did not train it (HetLoRA's
zero-padding is). All clients of a run compute with the run's scale α/r, so their components are
commensurable. A and B are still averaged apart, as FedAvg does
(edgefed/aggregators/fedavg.py says why that is inexact). With every client
holding everything this is FedAvg.
"""

from collections.abc import Sequence

import torch

from edgefed.aggregators.base import AGGREGATORS, Aggregator
from edgefed.methods.base import LowRankPair
from edgefed.scope import leading_block
from edgefed.types import ClientUpdate, State


@AGGREGATORS.register("hetero")
class HeteroAggregator(Aggregator):
    name = "hetero"

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], pairs: Sequence[LowRankPair]
    ) -> State:
        if not updates:
            raise ValueError("cannot aggregate zero client updates")
        result = {}
        for key, base in global_state.items():
            total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
            weight = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
            for update in updates:
                delta = update.delta.get(key)
                if delta is None:
                    continue
                if delta.dim() != base.dim() or any(
                    d > b for d, b in zip(delta.shape, base.shape, strict=True)
                ):
                    raise ValueError(
                        f"client {update.client_id}: {key} has shape {tuple(delta.shape)}, not a leading "
                        f"block of {tuple(base.shape)}"
                    )
                leading_block(total, tuple(delta.shape)).add_(
                    delta.to(torch.float32), alpha=update.num_examples
                )
                leading_block(weight, tuple(delta.shape)).add_(update.num_examples)
            step = torch.where(weight > 0, total / weight.clamp_min(1e-30), torch.zeros_like(total))
            result[key] = (base.to(torch.float32) + step).to(base.dtype)
        return result
