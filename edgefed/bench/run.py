"""`edgefed bench`: time to a target accuracy over a grid of federated runs (benchmarks/time_to_accuracy.py).

A grid (edgefed/bench/grid.py) is methods × partitions × (device profiles, or fleets × strategies) ×
seeds. Each cell is one federated run (`edgefed run`) that stops at the target accuracy or at the round
cap. A profile grid's device profiles do not change what a client trains (the bench checks that their
plans are the run's own), so each profile's clock replays the same run; a fleet grid's cell is timed
on its own fleet. Time to target is the round's critical path, as a deployed fleet would see it,
summed over rounds (edgefed/bench/replay.py): *simulated* from the cost model's step time for each
client's plan and steps on its device plus its link (SIMULATED, never measured on a device, equal for
equal work), *wall* from the training measured on this machine.

`sequential` is the other figure: this machine's own wall clock, clients trained one after another
and the server's evaluation included. The grid is resumable: a finished cell's metrics are kept in
the results folder; a killed cell resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from edgefed.bench.grid import REFERENCE, Grid, cell_config, reference_config
from edgefed.bench.replay import MB, CellResult, cell_results, grid_clocks
from edgefed.bench.report import write_reports
from edgefed.config import RunConfig
from edgefed.errors import EdgefedError
from edgefed.federation.recorder import read_metrics
from edgefed.federation.runner import run
from edgefed.setup import SUMMARY
from edgefed.types import RoundMetrics


class Bench:
    """One grid's results folder: what has run, what is left, and the reports."""

    def __init__(self, grid: Grid, out: Path, work: Path, echo: Callable[[str], None] = print) -> None:
        self.grid, self.out, self.work, self.echo = grid, out, work, echo
        self.cells_dir = out / "cells"

    def check_folder(self) -> None:
        recorded = self.out / "grid.toml"
        if recorded.is_file():
            if recorded.read_text(encoding="utf-8") != self.grid.to_toml():
                raise EdgefedError(
                    f"{self.out}: holds the results of a different grid (see its grid.toml); "
                    "choose another --out or delete it"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            recorded.write_text(self.grid.to_toml(), encoding="utf-8")

    def indented(self, text: str) -> None:
        """A run's own lines, under the bench's."""
        for line in text.splitlines():
            self.echo(f"    {line}")

    def done(self, cell_id: str) -> bool:
        return (self.cells_dir / cell_id / SUMMARY).is_file()

    def run_cell(self, cell_id: str, config: RunConfig) -> list[RoundMetrics]:
        """Run (or resume) one cell's federation; its metrics and summary are kept in the results."""
        run_dir = self.work / cell_id
        resume = (run_dir / "checkpoint").is_dir()
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to keep
        run(
            dataclasses.replace(config, out=str(run_dir)),
            echo=lambda line: self.echo(f"    {line}"),
            resume=resume,
        )
        kept = self.cells_dir / cell_id
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "metrics.jsonl", kept / "metrics.jsonl")
        shutil.copy(run_dir / SUMMARY, kept / SUMMARY)  # last: it marks the cell done
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # full fine-tuning's is the whole model
        return self.rounds(cell_id)

    def rounds(self, cell_id: str) -> list[RoundMetrics]:
        return read_metrics(self.cells_dir / cell_id / "metrics.jsonl")

    def resolve_target(self) -> Grid:
        """The grid with its target: a target-margin grid first runs its centralised reference."""
        grid = self.grid
        if grid.target_margin is None:
            return grid
        if not self.done(REFERENCE):
            self.echo("edgefed bench: the reference run, centralised full fine-tuning, sets the target")
            self.run_cell(REFERENCE, reference_config(grid))
        reference = self.rounds(REFERENCE)
        best = max(reference, key=lambda metrics: metrics.accuracy)
        config = reference_config(grid)
        target = math.floor((best.accuracy - grid.target_margin) * 1000) / 1000
        note = (
            f"Set {100 * grid.target_margin:.1f} points under the best evaluation accuracy of centralised "
            f"full fine-tuning, {100 * best.accuracy:.1f} % (round {best.round} of {config.rounds}: "
            f"one client holding all the training data, {config.local_steps} steps of batch "
            f"{config.batch_size} a round, the cap of every run below; cells/{REFERENCE}). "
        )
        return dataclasses.replace(grid, target_accuracy=target, target_note=note + grid.target_note)


def run_grid(grid: Grid, out: Path, work: Path, echo: Callable[[str], None] = print) -> list[CellResult]:
    """Run the grid's unfinished cells in order, then write results.csv, table.md and the plots."""
    bench = Bench(grid, out, work, echo)
    clocks = grid_clocks(grid)  # first: a fleet that cannot run leaves no results folder behind
    bench.check_folder()
    steps = grid.run.get("local_steps") or 1
    grid = bench.resolve_target()
    target = grid.target_accuracy
    cells = grid.cells()
    todo = [cell for cell in cells if not bench.done(cell.id)]
    shape = (
        f"{len(grid.fleets)} fleets × {len(grid.strategies)} strategies"
        if grid.fleets
        else f"{len(grid.profiles)} device profiles replayed from each"
    )
    echo(
        f"edgefed bench: grid {grid.name}: {len(cells)} runs ({len(grid.methods)} methods × "
        f"{len(grid.partitions)} partitions × {len(grid.seeds)} seeds; {shape}), {len(cells) - len(todo)} "
        f"done, {len(todo)} to run; target accuracy {target:.3f}; results in {out}"
    )
    started = time.perf_counter()
    for index, cell in enumerate(todo):
        position = f"[{cells.index(cell) + 1}/{len(cells)}]"
        elapsed = time.perf_counter() - started
        eta = f", about {format_duration(elapsed / index * (len(todo) - index))} left" if index else ""
        setting = f" {cell.fleet} {cell.strategy}" if cell.fleet else ""
        echo(f"edgefed bench: {position} {cell.method} {cell.partition}{setting} seed {cell.seed}{eta}")
        rounds = bench.run_cell(cell.id, cell_config(grid, cell, target))
        result = cell_results(cell, rounds, target, clocks[cell.setting], steps)[0]
        echo(f"edgefed bench: {position} {describe(result)}")
    rounds = {cell: bench.rounds(cell.id) for cell in cells}
    results = [
        result
        for cell in cells
        for result in cell_results(cell, rounds[cell], target, clocks[cell.setting], steps)
    ]
    write_reports(grid, out, results, rounds, clocks, steps)
    echo(f"edgefed bench: wrote {out / 'results.csv'}, {out / 'table.md'} and the plots")
    return results


def describe(result: CellResult) -> str:
    if not result.reached:
        return f"target not reached in {result.rounds_run} rounds (final {result.final_accuracy:.4f})"
    return (
        f"target reached at round {result.rounds_to_target}: {result.wall_s:.1f} s critical path on this "
        f"machine, {result.simulated_s:.1f} s SIMULATED on {result.profile}, "
        f"{result.bytes_to_target / MB:.1f} MB"
        + (
            ""
            if result.energy_to_target_j is None
            else f", {result.energy_to_target_j / 1e3:.3f} kJ SIMULATED"
        )
    )


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
