"""A recorded run on simulated clocks: its critical path summed over rounds to the target.

critical path = max over the round's clients of (local training + transfer over the link)
wall      the training measured on this machine, transfers over the device profile's link, plus the
          server's aggregation (measured: it varies with this machine's load)
simulated the cost model's time for each client's steps on its device (edgefed/devices/clock.py;
          SIMULATED, never measured on a device, and equal for equal work)

A profile grid's run is replayed on each of the grid's profiles; a fleet grid's run on its own fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgefed.bench.grid import Cell, Grid, cell_config
from edgefed.devices.clock import SimulatedClock
from edgefed.devices.planner import plan_from_record
from edgefed.errors import EdgefedError
from edgefed.setup import plan_request, prepare
from edgefed.types import RoundMetrics

MB = 1e6


@dataclass
class CellResult:
    """One cell on one clock: what the CSV holds per row."""

    method: str
    partition: str
    seed: int
    fleet: str  # "" in a profile grid
    strategy: str  # "" in a profile grid
    profile: str  # the clock: a device profile, or the fleet's name
    reached: bool
    rounds_to_target: int | None
    wall_s: float | None  # critical path, this machine's training (see the module docstring)
    sequential_s: float | None  # this machine's own wall clock: clients in turn, evaluation included
    simulated_s: float | None  # critical path, SIMULATED on the clock's devices
    bytes_to_target: int | None
    # SIMULATED joules over the clients' rounds to the target (each device's power budget × its simulated
    # busy time); None when a device's profile has no power figure.
    energy_to_target_j: float | None
    final_accuracy: float
    best_accuracy: float
    rounds_run: int
    final_exit_accuracy: list[float] | None  # early-exit methods: each exit's, shallowest first
    dropped: int  # clients a deadline dropped (in any round)
    slowed: int  # clients whose round exceeds the budget, so that every round waits for them
    reduced: int  # clients whose plan trains less than the run's settings


def cell_results(
    cell: Cell,
    rounds: list[RoundMetrics],
    target: float,
    clocks: dict[str, SimulatedClock],
    default_steps: int,
) -> list[CellResult]:
    """`clocks`: name -> SimulatedClock of the cell's setting; `default_steps`: the local steps of
    rounds recorded before metrics carried each client's steps."""
    plans = recorded_plans(rounds)
    dropped = {client for metrics in rounds for client in metrics.dropped}
    results = []
    for name, clock in clocks.items():
        budget = clock.fleet.request.budget_s
        wall = simulated = 0.0
        energy: float | None = 0.0
        traffic = 0
        reached = None
        for metrics in rounds:
            if metrics.round > 0:
                wall += critical_path_s(metrics, clock.transfer_s)
                replayed = clock.replay(metrics, default_steps)
                simulated += replayed.seconds
                known = energy is not None and len(replayed.client_j) == len(replayed.client_s)
                energy = energy + sum(replayed.client_j.values()) if known else None
                traffic += metrics.bytes_up + metrics.bytes_down
            if metrics.accuracy >= target:
                reached = (metrics.round, wall, metrics.wall_s, simulated, traffic, energy)
                break
        results.append(
            CellResult(
                cell.method,
                cell.partition,
                cell.seed,
                cell.fleet,
                cell.strategy,
                name,
                reached is not None,
                *(reached if reached else (None,) * 6),
                final_accuracy=rounds[-1].accuracy,
                best_accuracy=max(metrics.accuracy for metrics in rounds),
                rounds_run=rounds[-1].round,
                final_exit_accuracy=rounds[-1].exit_accuracy,
                dropped=len(dropped),
                slowed=sum(
                    1
                    for client, plan in plans.items()
                    if budget is not None and plan["round_s"] > budget and client not in dropped
                ),
                reduced=sum(1 for plan in plans.values() if clock.fleet.reduced(plan_from_record(plan))),
            )
        )
    return results


def recorded_plans(rounds: list[RoundMetrics]) -> dict[int, dict]:
    """Each client's plan, as the run recorded it when the client joined."""
    return {int(slot): plan for metrics in rounds for slot, plan in (metrics.plans or {}).items()}


def critical_path_s(metrics: RoundMetrics, transfer_s: Callable[[int, int, int], float]) -> float:
    """A recorded round's critical path on this machine's training times: its slowest client's
    measured training plus that client's transfers (`transfer_s(client, down, up)`), plus the
    server's aggregation."""
    slowest = max(
        (
            train_s + transfer_s(client, down, up)
            for client, train_s, (down, up) in zip(
                metrics.clients, metrics.client_train_s, metrics.client_bytes, strict=True
            )
        ),
        default=0.0,
    )
    return slowest + metrics.aggregate_s


def grid_clocks(grid: Grid) -> dict[tuple[str, str, str], dict[str, SimulatedClock]]:
    """Each cell setting's clocks (Cell.setting -> clock name -> clock): a fleet cell's own fleet, or a
    profile grid's method on each profile (after checking that each profile's plan is what the run
    trains, else the recorded steps would not be that device's work). Plans every client first, so a
    fleet that cannot run fails before anything is written."""
    clocks = {}
    fleets = {}  # method -> its fleet plans: one model loaded per method, replanned per setting
    for cell in grid.cells():
        if cell.setting in clocks:
            continue
        config = cell_config(grid, cell, 0.5)
        if cell.method not in fleets:
            setup = prepare(config)
            fleets[cell.method] = (setup.fleet, setup.spec)
        if cell.fleet:
            planned, spec = fleets[cell.method]
            fleet = planned.replanned(plan_request(config, spec), config.profiles, config.fleet_strategy)
            fleet.check(config.clients, combines_plans=config.aggregator == "hetero")
            clocks[cell.setting] = {cell.fleet: SimulatedClock(fleet)}
            continue
        clocks[cell.setting] = {}
        for name in grid.profiles:
            fleet = fleets[cell.method][0].on_profile(name)
            plan = fleet.plan(0)
            if fleet.reduced(plan):
                raise EdgefedError(
                    f"{name}: its plan for {cell.method} departs from the run's settings (frozen "
                    f"{plan.frozen_layers}, exit {plan.exit_layer}, rank {plan.rank}, batch "
                    f"{plan.batch_size}, length {plan.seq_len}); the bench replays clocks only for "
                    "profiles that train what the run trains (name a fleet to plan it)"
                )
            clocks[cell.setting][name] = SimulatedClock(fleet)
    return clocks
