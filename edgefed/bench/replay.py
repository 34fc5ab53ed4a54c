"""A recorded run on each device profile's clocks: its critical path summed over rounds to the target.

critical path = max over the round's clients of (local training + transfer over the link)
                + the server's aggregation
wall      the training measured on this machine, transfers over the profile's link
simulated the training scaled to the device profile (SIMULATED, never measured on a device)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgefed.bench.grid import Cell, Grid, cell_config
from edgefed.devices.clock import SimulatedClock
from edgefed.devices.profiles import DeviceProfile
from edgefed.errors import EdgefedError
from edgefed.federation.setup import prepare
from edgefed.types import RoundMetrics

MB = 1e6


@dataclass
class CellResult:
    """One cell on one profile's clocks: what the CSV holds per row."""

    method: str
    partition: str
    seed: int
    profile: str
    reached: bool
    rounds_to_target: int | None
    wall_s: float | None  # critical path, this machine's training (see the module docstring)
    sequential_s: float | None  # this machine's own wall clock: clients in turn, evaluation included
    simulated_s: float | None  # critical path, SIMULATED on the profile
    bytes_to_target: int | None
    final_accuracy: float
    best_accuracy: float
    rounds_run: int


def cell_results(
    cell: Cell, rounds: list[RoundMetrics], target: float, clocks: dict[str, SimulatedClock]
) -> list[CellResult]:
    """`clocks`: profile name -> SimulatedClock of the cell's method on that profile."""
    results = []
    for name, clock in clocks.items():
        wall = simulated = 0.0
        traffic = 0
        reached = None
        for metrics in rounds:
            if metrics.round > 0:
                wall_s, simulated_s = round_seconds(metrics, clock)
                wall += wall_s
                simulated += simulated_s
                traffic += metrics.bytes_up + metrics.bytes_down
            if metrics.accuracy >= target:
                reached = (metrics.round, wall, metrics.wall_s, simulated, traffic)
                break
        results.append(
            CellResult(
                cell.method,
                cell.partition,
                cell.seed,
                name,
                reached is not None,
                *(reached if reached else (None,) * 5),
                final_accuracy=rounds[-1].accuracy,
                best_accuracy=max(metrics.accuracy for metrics in rounds),
                rounds_run=rounds[-1].round,
            )
        )
    return results


def round_seconds(metrics: RoundMetrics, clock: SimulatedClock) -> tuple[float, float]:
    """A recorded round's critical path: (on this machine's training, SIMULATED on the clock's profile),
    both with transfers over that profile's link."""
    return critical_path_s(metrics, clock.fleet.profile_for(0).transfer_s), clock.replay(metrics).seconds


def critical_path_s(metrics: RoundMetrics, transfer_s: Callable[[int, int], float]) -> float:
    """A recorded round's critical path on this machine's training times: its slowest client's
    measured training plus that client's transfers, plus the server's aggregation."""
    slowest = max(
        (
            train_s + transfer_s(down, up)
            for train_s, (down, up) in zip(metrics.client_train_s, metrics.client_bytes, strict=True)
        ),
        default=0.0,
    )
    return slowest + metrics.aggregate_s


def method_clocks(grid: Grid, method: str, host: DeviceProfile) -> dict[str, SimulatedClock]:
    """The simulated clock of `method` on each of the grid's profiles, after checking that each
    profile's plan is what the run trains (else the recorded times would not be that device's work)."""

    side = prepare(cell_config(grid, Cell(method, grid.partitions[0], grid.seeds[0]), 0.5))
    clocks = {}
    for name in grid.profiles:
        fleet = side.fleet.on_profile(name)
        plan = fleet.plan(0)
        asked = fleet.request
        if (plan.frozen_layers, plan.exit_layer, plan.batch_size, plan.seq_len, plan.local_steps) != (
            0,
            side.fleet.shape.layers,
            asked.batch_size,
            asked.seq_len,
            asked.local_steps,
        ) or (plan.rank != asked.rank):
            raise EdgefedError(
                f"{name}: its plan for {method} departs from the run's settings (frozen "
                f"{plan.frozen_layers}, exit {plan.exit_layer}, rank {plan.rank}, batch {plan.batch_size}, "
                f"length {plan.seq_len}); "
                "the bench replays clocks only for profiles that train what the run trains"
            )
        clocks[name] = SimulatedClock(fleet, host, fleet.shape)
    return clocks
