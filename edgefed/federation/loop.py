"""The server's round loop: sample, send, fit, receive, aggregate, evaluate, keep (checkpoint and
metrics together), stop.

`FederatedServer.run` is the whole of a round, top to bottom. What happens around it (where the
metrics go, when a checkpoint is written, when the run is done) is the `RoundPolicy` it is given;
how the global state reaches the clients and their updates come back is the `Transport`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import nn

from edgefed.aggregators.base import Aggregator, bounded_shares
from edgefed.devices.clock import SimulatedClock, SimulatedRound
from edgefed.devices.planner import plan_record
from edgefed.methods.base import LowRankPair, load_trainable_state, trainable_state
from edgefed.transport.base import Transport
from edgefed.types import ClientUpdate, Evaluation, RoundMetrics, RoundResult, State

# The global model on the evaluation set: accuracy, loss (and per-exit accuracy for early-exit models).
Evaluator = Callable[[nn.Module], Evaluation]


class RoundPolicy(Protocol):
    """What a run does with each completed round."""

    def keep(self, metrics: RoundMetrics, global_state: State) -> None:
        """Keep a completed round: what a resumed run needs after it (its checkpoint) and its metrics
        (metrics.jsonl, the console table), on disk together, so neither runs ahead of the other."""

    def should_stop(self, metrics: RoundMetrics) -> bool:
        """Whether the run is done after this round (e.g. its target reached)."""


@dataclass(frozen=True)
class StartingPoint:
    """Where the loop starts: round 0 (the starting model, evaluated) of a fresh run, or the round
    after a checkpoint."""

    first_round: int = 0
    wall_s: float = 0.0  # training wall clock before this process
    sim_s: float = 0.0  # the simulated device clock before this process


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
        max_share: float = 1.0,
    ) -> None:
        """`clock`: the simulated device clock of a fleet with device profiles (None: no sim_s).
        `max_share`: the largest share of a round's aggregation weight one client may hold."""
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
        self.max_share = max_share
        self._recorded_plans: set[int] = set()

    def sample(self, round_number: int, available: list[int]) -> list[int]:
        """A reproducible sample of the connected clients (of all of them, when all are connected)."""
        rng = np.random.default_rng([self.seed, round_number])
        size = min(self.clients_per_round, len(available))
        return sorted(int(client) for client in rng.choice(np.array(available), size=size, replace=False))

    def run(self, rounds: int, policy: RoundPolicy, start: StartingPoint = StartingPoint()) -> State:
        """Run rounds `start.first_round`..`rounds` (round 0 evaluates the starting model), or fewer: the
        run ends after the first round the policy says should stop it.

        A round that gets fewer than min(min-clients, sampled) updates by its deadline is discarded
        and run again: the global state only ever moves by a round with enough clients in it.
        """
        started = time.perf_counter() - start.wall_s
        sim_s = start.sim_s if self.clock else None
        global_state = trainable_state(self.model)
        round_number = start.first_round
        discarded = RoundResult([])  # the traffic of attempts at this round that were run again
        if round_number == 0:
            metrics = self._metrics(0, self.evaluator(self.model), RoundResult([]), started, started, sim_s)
            metrics.plans = self._joined()
            policy.keep(metrics, global_state)
            # The starting model may already be good enough.
            round_number = rounds + 1 if policy.should_stop(metrics) else 1
        while round_number <= rounds:
            clients = self.sample(round_number, self.transport.wait_for_clients())
            # A `deadline` fleet's server gives up on the clients whose device cannot finish in time.
            late = self.clock.late(clients) if self.clock else []
            on_time = [client for client in clients if client not in late]
            round_start = time.perf_counter()
            result = carry_traffic(discarded, self.transport.fit_round(round_number, on_time, global_state))
            result.dropped = sorted(result.dropped + late)
            needed = min(self.min_clients, len(on_time))
            if len(result.updates) < needed:
                self.echo(
                    f"edgefed: round {round_number}: {len(result.updates)} of the {needed} updates it needs "
                    f"arrived (dropped clients {result.dropped}); running the round again"
                )
                discarded = RoundResult([], [], result.bytes_up, result.bytes_down, result.client_bytes)
                continue
            discarded = RoundResult([])
            aggregate_start = time.perf_counter()
            if result.updates:  # else every sampled client missed the deadline: the model stays
                updates = bounded_shares(result.updates, self.max_share)
                global_state = self.aggregator.aggregate(global_state, updates, self.pairs)
            aggregate_s = time.perf_counter() - aggregate_start
            simulated = self.clock.round(result) if self.clock else None
            if simulated is not None:
                sim_s += simulated.seconds
            load_trainable_state(self.model, global_state)
            evaluation = self.evaluator(self.model)
            metrics = self._metrics(
                round_number, evaluation, result, round_start, started, sim_s, simulated, aggregate_s
            )
            metrics.plans = self._joined()
            policy.keep(metrics, global_state)
            if policy.should_stop(metrics):
                break
            round_number += 1
        self.transport.finish()
        return global_state

    def _joined(self) -> dict[str, dict] | None:
        """The plans of the clients that joined since the last record (None: no new ones)."""
        joined = {
            str(slot): plan_record(plan)
            for slot, plan in sorted(self.transport.plans().items())
            if slot not in self._recorded_plans
        }
        self._recorded_plans.update(int(slot) for slot in joined)
        return joined or None

    @staticmethod
    def _metrics(
        round_number: int,
        evaluation: Evaluation,
        result: RoundResult,
        round_start: float,
        started: float,
        sim_s: float | None,
        simulated: SimulatedRound | None = None,
        aggregate_s: float = 0.0,
    ) -> RoundMetrics:
        now = time.perf_counter()
        updates = result.updates
        examples = sum(update.num_examples for update in updates)
        split_up, split_down = result.split_bytes or (None, None)
        energy = [client_energy(update, simulated) for update in updates]
        known = any(source is not None for _, source in energy)
        return RoundMetrics(
            round=round_number,
            accuracy=evaluation.accuracy,
            loss=evaluation.loss,
            train_loss=sum(u.train_loss * u.num_examples for u in updates) / examples if updates else None,
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
            clients=[update.client_id for update in updates],
            dropped=result.dropped,
            slowest_client_s=max((update.train_s for update in updates), default=0.0),
            client_train_s=[update.train_s for update in updates],
            client_steps=[update.steps for update in updates],
            client_bytes=[list(result.client_bytes.get(update.client_id, (0, 0))) for update in updates],
            aggregate_s=aggregate_s,
            round_s=now - round_start,
            wall_s=now - started,
            sim_s=sim_s,
            sim_round_s=simulated.seconds if simulated else None,
            sim_slowest_client=simulated.slowest if simulated else None,
            exit_accuracy=evaluation.exit_accuracy,
            mlm_loss=evaluation.mlm_loss,
            generated_accuracy=evaluation.generated_accuracy,
            perplexity=evaluation.perplexity,
            split_bytes_up=split_up,
            split_bytes_down=split_down,
            task_accuracy=evaluation.task_accuracy,
            client_scores=scores if updates and None not in (scores := [u.score for u in updates]) else None,
            client_energy_j=[joules for joules, _ in energy] if known else None,
            client_energy_source=[source for _, source in energy] if known else None,
        )


def client_energy(update: ClientUpdate, simulated: SimulatedRound | None) -> tuple[float | None, str | None]:
    """A client's energy over the round: measured on its device, else simulated from its profile."""
    if update.energy_j is not None:
        return update.energy_j, "measured"
    if simulated is not None and update.client_id in simulated.client_j:
        return simulated.client_j[update.client_id], "simulated"
    return None, None


def carry_traffic(earlier: RoundResult, result: RoundResult) -> RoundResult:
    """`result` with the bytes of earlier, discarded attempts at its round added: they crossed the wire."""
    result.bytes_up += earlier.bytes_up
    result.bytes_down += earlier.bytes_down
    for slot, (down, up) in earlier.client_bytes.items():
        now_down, now_up = result.client_bytes.get(slot, (0, 0))
        result.client_bytes[slot] = (now_down + down, now_up + up)
    return result
