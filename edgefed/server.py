"""The federated server's round loop: sample, broadcast, collect, aggregate, evaluate, record."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from edgefed.aggregators.base import Aggregator, State
from edgefed.methods.base import LowRankPair, load_trainable_state, trainable_state
from edgefed.transport.base import Transport

# (accuracy, loss) of the global model on the evaluation set.
Evaluator = Callable[[nn.Module], tuple[float, float]]


class FederatedServer:
    def __init__(
        self,
        model: nn.Module,
        aggregator: Aggregator,
        pairs: Sequence[LowRankPair],
        transport: Transport,
        evaluator: Evaluator,
        num_clients: int,
        sample_fraction: float,
        seed: int,
    ) -> None:
        self.model = model
        self.aggregator = aggregator
        self.pairs = pairs
        self.transport = transport
        self.evaluator = evaluator
        self.num_clients = num_clients
        self.clients_per_round = max(1, round(sample_fraction * num_clients))
        self.seed = seed

    def sample(self, round_number: int) -> list[int]:
        rng = np.random.default_rng([self.seed, round_number])
        chosen = rng.choice(self.num_clients, size=self.clients_per_round, replace=False)
        return sorted(int(client) for client in chosen)

    def run(self, rounds: int, record: Callable[[dict], None]) -> State:
        """Run the rounds; `record` receives each round's metrics (round 0: the starting model)."""
        start = time.perf_counter()
        global_state = trainable_state(self.model)
        accuracy, loss = self.evaluator(self.model)
        record(self._metrics(0, accuracy, loss, [], 0.0, start))
        for round_number in range(1, rounds + 1):
            round_start = time.perf_counter()
            results = [
                self.transport.fit(client, round_number, global_state) for client in self.sample(round_number)
            ]
            updates = [result.update for result in results]
            global_state = self.aggregator.aggregate(global_state, updates, self.pairs)
            load_trainable_state(self.model, global_state)
            accuracy, loss = self.evaluator(self.model)
            metrics = self._metrics(round_number, accuracy, loss, results, round_start, start)
            record(metrics)
        return global_state

    @staticmethod
    def _metrics(round_number, accuracy, loss, results, round_start, start) -> dict:
        now = time.perf_counter()
        updates = [result.update for result in results]
        examples = sum(update.num_examples for update in updates)
        return {
            "round": round_number,
            "accuracy": accuracy,
            "loss": loss,
            "train_loss": sum(u.train_loss * u.num_examples for u in updates) / examples if updates else None,
            "bytes_up": sum(result.bytes_up for result in results),
            "bytes_down": sum(result.bytes_down for result in results),
            "clients": [update.client_id for update in updates],
            "dropped": [],
            "slowest_client_s": max((update.train_s for update in updates), default=0.0),
            "round_s": now - round_start if results else now - start,
            "wall_s": now - start,
        }
