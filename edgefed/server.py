"""The federated server's round loop: sample, broadcast, collect, aggregate, evaluate, record, checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from edgefed.aggregators.base import Aggregator, State
from edgefed.clock import SimulatedClock
from edgefed.methods.base import LowRankPair, load_trainable_state, trainable_state
from edgefed.training import Evaluation
from edgefed.transport.base import RoundResult, Transport

# The global model on the evaluation set: accuracy, loss (and per-exit accuracy for early-exit models).
Evaluator = Callable[[nn.Module], Evaluation]
# Called after each completed round with (round, global state, wall seconds so far).
RoundHook = Callable[[int, State, float], None]
# Asked after each completed round, with its metrics: whether the run is done (e.g. a target reached).
StopRule = Callable[[dict], bool]


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
        min_clients: int | None = None,
        echo: Callable[[str], None] = print,
        clock: SimulatedClock | None = None,
    ) -> None:
        """`clock`: the simulated device clock of a fleet with device profiles (None: no sim_s)."""
        self.model = model
        self.aggregator = aggregator
        self.pairs = pairs
        self.transport = transport
        self.evaluator = evaluator
        self.clients_per_round = max(1, round(sample_fraction * num_clients))
        self.min_clients = num_clients if min_clients is None else min_clients
        self.seed = seed
        self.echo = echo
        self.clock = clock

    def sample(self, round_number: int, available: list[int]) -> list[int]:
        """A reproducible sample of the connected clients (of all of them, when all are connected)."""
        rng = np.random.default_rng([self.seed, round_number])
        size = min(self.clients_per_round, len(available))
        return sorted(int(client) for client in rng.choice(np.array(available), size=size, replace=False))

    def run(
        self,
        rounds: int,
        record: Callable[[dict], None],
        after_round: RoundHook = lambda round_number, state, wall_s: None,
        first_round: int = 1,
        wall_offset: float = 0.0,
        sim_offset: float = 0.0,
        stop: StopRule = lambda metrics: False,
    ) -> State:
        """Run rounds `first_round`..`rounds` (round 0, the starting model, is evaluated on a fresh run),
        or fewer: the run ends after the first round whose metrics `stop` accepts.

        A round that gets fewer than min(min-clients, sampled) updates by its deadline is discarded
        and run again: the global state only ever moves by a round with enough clients in it.
        """
        start = time.perf_counter() - wall_offset
        sim_s = sim_offset if self.clock else None
        global_state = trainable_state(self.model)
        round_number = first_round
        if first_round == 1:
            evaluation = self.evaluator(self.model)
            now = time.perf_counter()
            metrics = self._metrics(0, evaluation, RoundResult([]), now, start, sim_s, None, 0.0)
            record(metrics)
            if stop(metrics):  # the starting model is already good enough
                round_number = rounds + 1
        while round_number <= rounds:
            clients = self.sample(round_number, self.transport.wait_for_clients())
            round_start = time.perf_counter()
            result = self.transport.fit_round(round_number, clients, global_state)
            needed = min(self.min_clients, len(clients))
            if len(result.updates) < needed:
                self.echo(
                    f"edgefed: round {round_number}: {len(result.updates)} of the {needed} updates it needs "
                    f"arrived (dropped clients {result.dropped}); running the round again"
                )
                continue
            aggregate_start = time.perf_counter()
            global_state = self.aggregator.aggregate(global_state, result.updates, self.pairs)
            aggregate_s = time.perf_counter() - aggregate_start
            simulated = None
            if self.clock is not None:
                simulated = self.clock.round(result, aggregate_s)
                sim_s += simulated.seconds
            load_trainable_state(self.model, global_state)
            evaluation = self.evaluator(self.model)
            metrics = self._metrics(
                round_number, evaluation, result, round_start, start, sim_s, simulated, aggregate_s
            )
            record(metrics)
            after_round(round_number, global_state, metrics["wall_s"])
            if stop(metrics):
                break
            round_number += 1
        self.transport.finish()
        return global_state

    @staticmethod
    def _metrics(
        round_number, evaluation: Evaluation, result: RoundResult, round_start, start, sim_s, simulated,
        aggregate_s: float,
    ) -> dict:  # fmt: skip
        now = time.perf_counter()
        updates = result.updates
        examples = sum(update.num_examples for update in updates)
        metrics = {
            "round": round_number,
            "accuracy": evaluation.accuracy,
            "loss": evaluation.loss,
            "train_loss": sum(u.train_loss * u.num_examples for u in updates) / examples if updates else None,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "clients": [update.client_id for update in updates],
            "dropped": result.dropped,
            "slowest_client_s": max((update.train_s for update in updates), default=0.0),
            # Each client's measured training and bytes (down, up), in `clients` order, and the server's
            # aggregation: what a critical-path clock needs (edgefed/bench.py replays them per profile).
            "client_train_s": [update.train_s for update in updates],
            "client_bytes": [list(result.client_bytes.get(update.client_id, (0, 0))) for update in updates],
            "aggregate_s": aggregate_s,
            "round_s": now - round_start if round_number else now - start,
            "wall_s": now - start,
            # The simulated device clock (edgefed/clock.py): never measured on a device.
            "sim_s": sim_s,
            "sim_round_s": simulated.seconds if simulated else None,
            "sim_slowest_client": simulated.slowest if simulated else None,
        }
        if evaluation.exit_accuracy is not None:
            metrics["exit_accuracy"] = evaluation.exit_accuracy
        if evaluation.mlm_loss is not None:
            metrics["mlm_loss"] = evaluation.mlm_loss
        if result.split_bytes is not None:
            metrics["split_bytes_up"], metrics["split_bytes_down"] = result.split_bytes
        return metrics
