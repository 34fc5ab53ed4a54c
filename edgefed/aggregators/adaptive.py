"""Performance-adaptive aggregation, FewFedWeight's (Dong et al., arXiv 2212.08354): each client counts
by how well its trained model does on a held-out slice of its own labelled data, not by how many
examples it holds.

The paper leaves the weighting open; the choice made here:

    β_k = softmax_k(s_k / γ),   global ← global + Σ_k β_k·δ_k

with s_k the client's held-out accuracy (ClientUpdate.score, in [0, 1]) and γ = 0.25, so a client
scoring 0.25 higher counts e ≈ 2.7 times more. Softmax keeps every client in (β_k > 0) where a
ratio s_k / Σ s_j would let a client scoring 0 vanish and one lucky held-out slice dominate less
gently. A client reports its own score: the server checks it is an accuracy, and cannot check more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgefed.aggregators.base import AGGREGATORS, Aggregator, weighted_mean_step
from edgefed.errors import EdgefedError
from edgefed.methods.base import LowRankPair
from edgefed.types import ClientUpdate, State

if TYPE_CHECKING:
    from edgefed.config import RunConfig

TEMPERATURE = 0.25


def score_weights(updates: Sequence[ClientUpdate], temperature: float = TEMPERATURE) -> list[float]:
    """β_k = softmax_k(s_k / γ)."""
    if not updates:
        raise ValueError("cannot aggregate zero client updates")
    missing = [update.client_id for update in updates if update.score is None]
    if missing:
        raise EdgefedError(
            f"aggregator adaptive weighs clients by their held-out score; clients {missing} reported "
            "none (only few-shot multi-task runs, --tasks, measure one)"
        )
    top = max(update.score for update in updates)
    exps = [math.exp((update.score - top) / temperature) for update in updates]
    return [value / sum(exps) for value in exps]


@AGGREGATORS.register("adaptive")
class AdaptiveAggregator(Aggregator):
    name = "adaptive"

    def check(self, config: RunConfig) -> None:
        if not config.tasks:
            raise EdgefedError(f"aggregator {self.name} needs a few-shot multi-task run: set --tasks")
        if config.holdout_shots == 0:
            raise EdgefedError(
                f"aggregator {self.name} weighs clients by their held-out score: set holdout-shots > 0"
            )

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], pairs: Sequence[LowRankPair]
    ) -> State:
        return weighted_mean_step(global_state, updates, global_state.keys(), score_weights(updates))
