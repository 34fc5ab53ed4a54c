"""`edgefed bench`: time to a target accuracy over a grid of federated runs (benchmarks/time_to_accuracy.py).

A grid is methods × partitions × device profiles × seeds. Each (method, partition, seed) cell is one
federated run (`edgefed run`) that stops at the target accuracy or at the round cap. The device
profiles do not change what a client trains when their plans are the run's own (the bench checks
this), so each profile's clock is computed from the same run: its recorded per-client training times
and bytes, replayed through the simulated clock (edgefed/clock.py). Time to target is the round's
critical path, as a deployed fleet would see it, summed over rounds:

    critical path = max over the round's clients of (local training + transfer over the link)
                    + the server's aggregation
    wall      the training measured on this machine, transfers over the profile's link
    simulated the training scaled to the device profile (SIMULATED, never measured on a device)

`sequential` is the other figure: this machine's own wall clock, clients trained one after another
and the server's evaluation included. The grid is resumable: a finished cell's metrics are kept in
the results folder; a killed cell resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefed.errors import EdgefedError
from edgefed.shipped import read_shipped, shipped_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

GRIDS = "edgefed.bench_grids"
TARGET_KEYS = ("target_accuracy", "target_margin")
REFERENCE = "reference-fft-centralised"  # the cell that sets a target-margin grid's target
PEFT_BASELINES = ("lora", "adapter", "bitfit")  # "the fastest other PEFT method" is one of these
# The FeDeRA paper's reported cuts in time to target on a Jetson AGX Orin (PAPERS.md).
PAPER_CUT_VS_FFT = "95.9–97.9 %"
PAPER_CUT_VS_PEFT = "up to 74.6 %"
MB = 1e6


@dataclass(frozen=True)
class Grid:
    name: str
    methods: tuple[str, ...]
    partitions: tuple[str, ...]
    profiles: tuple[str, ...]
    seeds: tuple[int, ...]
    run: dict[str, Any]  # `edgefed run` keys every cell shares
    target_accuracy: float | None = None  # a fixed target, or:
    target_margin: float | None = None  # this far under what centralised full fine-tuning reaches
    target_note: str = ""  # how the target was chosen, for the table

    def cells(self) -> list[Cell]:
        return [
            Cell(method, partition, seed)
            for partition in self.partitions
            for method in self.methods
            for seed in self.seeds
        ]

    def to_toml(self) -> str:
        from edgefed.config import key_of
        from edgefed.profiles import toml_scalar

        lines = ["# The grid these results come from (edgefed bench --grid grid.toml reruns it)", ""]
        for key in ("name", "methods", "partitions", "profiles", "seeds", *TARGET_KEYS, "target_note"):
            if getattr(self, key) is not None:
                lines.append(f"{key_of(key)} = {toml_scalar(getattr(self, key))}")
        lines += ["", "[run]"] + [f"{key_of(key)} = {toml_scalar(value)}" for key, value in self.run.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Cell:
    method: str
    partition: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.method}-{self.partition.replace(':', '')}-s{self.seed}"


def grid_names() -> list[str]:
    return shipped_names(GRIDS)


def load_grid(name_or_path: str, overrides: dict[str, Any] | None = None) -> Grid:
    """A shipped grid by name (`edgefed bench --list`) or a TOML file; `overrides` replace its keys."""
    text, _ = read_shipped(name_or_path, GRIDS, "grid", "edgefed/bench_grids")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise EdgefedError(f"{name_or_path}: invalid TOML ({error})") from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    fields = {field.name for field in dataclasses.fields(Grid)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise EdgefedError(f"{name_or_path}: unknown grid keys {unknown}; valid: {sorted(fields)}")
    missing = sorted(field for field in fields - {"target_note", *TARGET_KEYS} if not values.get(field))
    if missing:
        raise EdgefedError(f"{name_or_path}: the grid needs {missing}")
    if (values.get("target_accuracy") is None) == (values.get("target_margin") is None):
        raise EdgefedError(f"{name_or_path}: set one of target-accuracy and target-margin")
    run = {key.replace("-", "_"): value for key, value in values.pop("run").items()}
    for key in ("method", "partition", "seed", "target_accuracy", "stop_at_target", "out", "profiles"):
        if key in run:
            raise EdgefedError(f"{name_or_path}: [run] must not set {key}: the grid sets it per cell")
    grid = Grid(
        name=str(values["name"]),
        methods=tuple(values["methods"]),
        partitions=tuple(values["partitions"]),
        profiles=tuple(values["profiles"]),
        seeds=tuple(int(seed) for seed in values["seeds"]),
        run=run,
        target_accuracy=optional_float(values.get("target_accuracy")),
        target_margin=optional_float(values.get("target_margin")),
        target_note=str(values.get("target_note", "")),
    )
    if grid.target_margin is not None and not 0 <= grid.target_margin < 1:
        raise EdgefedError(
            f"target-margin is a fraction of accuracy (0.03: 3 points), got {grid.target_margin}"
        )
    for cell in grid.cells():
        cell_config(grid, cell, grid.target_accuracy or 0.5)  # every cell is valid before the first runs
    return grid


def optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def cell_config(grid: Grid, cell: Cell, target: float):
    """The run of one cell: the grid's shared keys, the cell's own, to `target` or the round cap."""
    from edgefed.config import resolve_config

    flags = dict(grid.run)
    flags.update(
        method=cell.method,
        partition=cell.partition,
        seed=cell.seed,
        target_accuracy=target,
        stop_at_target=True,
    )
    return resolve_config(None, flags)


def reference_config(grid: Grid):
    """Centralised full fine-tuning: one client holding all the training data, as many rounds and local
    steps as a cell's cap, every round run (the target is set under its best evaluation accuracy)."""
    from edgefed.config import resolve_config

    flags = dict(grid.run, method="fft", partition="iid", seed=grid.seeds[0], clients=1, min_clients=None)
    return resolve_config(None, flags)


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


def cell_results(cell: Cell, rounds: list[dict], target: float, clocks: dict) -> list[CellResult]:
    """`clocks`: profile name -> SimulatedClock of the cell's method on that profile."""
    results = []
    for name, clock in clocks.items():
        wall = simulated = 0.0
        traffic = 0
        reached = None
        for metrics in rounds:
            if metrics["round"] > 0:
                wall_s, simulated_s = round_seconds(metrics, clock)
                wall += wall_s
                simulated += simulated_s
                traffic += metrics["bytes_up"] + metrics["bytes_down"]
            if metrics["accuracy"] >= target:
                reached = (metrics["round"], wall, metrics["wall_s"], simulated, traffic)
                break
        results.append(
            CellResult(
                cell.method,
                cell.partition,
                cell.seed,
                name,
                reached is not None,
                *(reached if reached else (None,) * 5),
                final_accuracy=rounds[-1]["accuracy"],
                best_accuracy=max(metrics["accuracy"] for metrics in rounds),
                rounds_run=rounds[-1]["round"],
            )
        )
    return results


def round_seconds(metrics: dict, clock) -> tuple[float, float]:
    """A recorded round's critical path: (on this machine's training, SIMULATED on the clock's profile),
    both with transfers over that profile's link."""
    return critical_path_s(metrics, clock.fleet.profile_for(0).transfer_s), clock.replay(metrics).seconds


def critical_path_s(metrics: dict, transfer_s: Callable[[int, int], float]) -> float:
    """A recorded round's critical path on this machine's training times: its slowest client's
    measured training plus that client's transfers, plus the server's aggregation."""
    slowest = max(
        (
            train_s + transfer_s(down, up)
            for train_s, (down, up) in zip(metrics["client_train_s"], metrics["client_bytes"], strict=True)
        ),
        default=0.0,
    )
    return slowest + metrics["aggregate_s"]


def method_clocks(grid: Grid, method: str, host) -> dict:
    """The simulated clock of `method` on each of the grid's profiles, after checking that each
    profile's plan is what the run trains (else the recorded times would not be that device's work)."""
    from edgefed.clock import SimulatedClock
    from edgefed.recipe import prepare

    side = prepare(cell_config(grid, Cell(method, grid.partitions[0], grid.seeds[0]), 0.5))
    clocks = {}
    for name in grid.profiles:
        fleet = dataclasses.replace(side.fleet, profiles=(name,), _plans={}, _profiles={})
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

    def host_profile(self, given: str | None):
        """This machine's profile, measured once per grid (kept in the results folder for resumes)."""
        from edgefed.calibrate import measure_machine, write_profile
        from edgefed.profiles import load_profile

        path = self.out / "host_profile.toml"
        if given:  # kept beside the results, which its figures produced
            write_profile(load_profile(given), path)
        elif not path.is_file():
            self.echo("edgefed bench: measuring this machine for the simulated clock (edgefed profile)")
            write_profile(measure_machine("bench-host", quick=True, echo=lambda line: None), path)
        return load_profile(str(path))

    def indented(self, text: str) -> None:
        """A run's own lines, under the bench's."""
        for line in text.splitlines():
            self.echo(f"    {line}")

    def done(self, cell_id: str) -> bool:
        return (self.cells_dir / cell_id / "summary.json").is_file()

    def run_cell(self, cell_id: str, config) -> list[dict]:
        """Run (or resume) one cell's federation; its metrics and summary are kept in the results."""
        from edgefed.recipe import run

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
        shutil.copy(run_dir / "summary.json", kept / "summary.json")  # last: it marks the cell done
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # full fine-tuning's is the whole model
        return self.rounds(cell_id)

    def rounds(self, cell_id: str) -> list[dict]:
        path = self.cells_dir / cell_id / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def resolve_target(self) -> Grid:
        """The grid with its target: a target-margin grid first runs its centralised reference."""
        grid = self.grid
        if grid.target_margin is None:
            return grid
        if not self.done(REFERENCE):
            self.echo("edgefed bench: the reference run, centralised full fine-tuning, sets the target")
            self.run_cell(REFERENCE, reference_config(grid))
        reference = self.rounds(REFERENCE)
        best = max(reference, key=lambda metrics: metrics["accuracy"])
        config = reference_config(grid)
        target = math.floor((best["accuracy"] - grid.target_margin) * 1000) / 1000
        note = (
            f"Set {100 * grid.target_margin:.1f} points under the best evaluation accuracy of centralised "
            f"full fine-tuning, {100 * best['accuracy']:.1f} % (round {best['round']} of {config.rounds}: "
            f"one client holding all the training data, {config.local_steps} steps of batch "
            f"{config.batch_size} a round, the cap of every run below; cells/{REFERENCE}). "
        )
        return dataclasses.replace(grid, target_accuracy=target, target_note=note + grid.target_note)


def run_grid(
    grid: Grid,
    out: Path,
    work: Path,
    host_profile: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[CellResult]:
    """Run the grid's unfinished cells in order, then write results.csv, table.md and the plots."""
    bench = Bench(grid, out, work, echo)
    bench.check_folder()
    host = bench.host_profile(host_profile)
    clocks = {method: method_clocks(grid, method, host) for method in grid.methods}
    grid = bench.resolve_target()
    target = grid.target_accuracy
    cells = grid.cells()
    todo = [cell for cell in cells if not bench.done(cell.id)]
    echo(
        f"edgefed bench: grid {grid.name}: {len(cells)} runs ({len(grid.methods)} methods × "
        f"{len(grid.partitions)} partitions × {len(grid.seeds)} seeds; {len(grid.profiles)} device profiles "
        f"replayed from each), {len(cells) - len(todo)} done, {len(todo)} to run; target accuracy "
        f"{target:.3f}; results in {out}"
    )
    started = time.perf_counter()
    for index, cell in enumerate(todo):
        position = f"[{cells.index(cell) + 1}/{len(cells)}]"
        elapsed = time.perf_counter() - started
        eta = f", about {format_duration(elapsed / index * (len(todo) - index))} left" if index else ""
        echo(f"edgefed bench: {position} {cell.method} {cell.partition} seed {cell.seed}{eta}")
        rounds = bench.run_cell(cell.id, cell_config(grid, cell, target))
        result = cell_results(cell, rounds, target, clocks[cell.method])[0]
        echo(f"edgefed bench: {position} {describe(result)}")
    rounds = {cell: bench.rounds(cell.id) for cell in cells}
    results = [
        result for cell in cells for result in cell_results(cell, rounds[cell], target, clocks[cell.method])
    ]
    write_reports(grid, out, results, rounds, clocks, host)
    echo(f"edgefed bench: wrote {out / 'results.csv'}, {out / 'table.md'} and the plots")
    return results


def describe(result: CellResult) -> str:
    if not result.reached:
        return f"target not reached in {result.rounds_run} rounds (final {result.final_accuracy:.4f})"
    return (
        f"target reached at round {result.rounds_to_target}: {result.wall_s:.1f} s critical path on this "
        f"machine, {result.simulated_s:.1f} s SIMULATED on {result.profile}, "
        f"{result.bytes_to_target / MB:.1f} MB"
    )


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def write_reports(grid: Grid, out: Path, results: list[CellResult], rounds: dict, clocks: dict, host) -> None:
    fields = [field.name for field in dataclasses.fields(CellResult)]
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in results:
            writer.writerow(dataclasses.asdict(result))
    (out / "table.md").write_text(markdown_report(grid, results, host), encoding="utf-8")
    plot_reports(grid, out, results, rounds, clocks)


def mean_sd(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_table(grid: Grid, results: list[CellResult]) -> list[str]:
    """One row per (method, partition): means ± sd over the seeds that reached the target."""
    profiles = grid.profiles
    first = profiles[0]
    header = (
        ["partition", "method", "reached", "rounds", "wall s (critical path)"]
        + [f"SIMULATED s, {name}" for name in profiles]
        + ["MB to target", "sequential s (this machine)", "final accuracy"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for partition in grid.partitions:
        for method in grid.methods:
            own = [r for r in results if r.method == method and r.partition == partition]
            on_first = [r for r in own if r.profile == first]
            hit = [r for r in on_first if r.reached]
            row = [
                partition,
                method,
                f"{len(hit)}/{len(on_first)}",
                mean_sd([r.rounds_to_target for r in hit]),
                mean_sd([r.wall_s for r in hit]),
            ]
            for name in profiles:
                row.append(mean_sd([r.simulated_s for r in own if r.profile == name and r.reached]))
            row += [
                mean_sd([r.bytes_to_target / MB for r in hit]),
                mean_sd([r.sequential_s for r in hit]),
                mean_sd([r.final_accuracy for r in on_first], 3),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def cut_table(grid: Grid, results: list[CellResult]) -> list[str]:
    """FeDeRA's cut in time to target against fft and against the fastest other PEFT method, per clock."""
    if "federa" not in grid.methods:
        return []
    clocks = [("wall (critical path, this machine)", grid.profiles[0], "wall_s")] + [
        (f"SIMULATED {name}", name, "simulated_s") for name in grid.profiles
    ]
    lines = [
        "| partition | clock | FeDeRA s | fft s | cut vs fft | fastest other PEFT | its s | cut vs it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for partition in grid.partitions:
        for label, profile, key in clocks:
            times = {method: mean_time(results, method, partition, profile, key) for method in grid.methods}
            federa, fft = times["federa"], times.get("fft")
            others = {m: t for m in PEFT_BASELINES if (t := times.get(m)) is not None}
            fastest = min(others, key=others.get) if others else None
            lines.append(
                f"| {partition} | {label} | {fmt(federa)} | {fmt(fft)} | {cut(federa, fft)} | "
                f"{fastest or '–'} | {fmt(others.get(fastest))} | "
                f"{cut(federa, others.get(fastest))} |"
            )
    return lines


def mean_time(results: list[CellResult], method: str, partition: str, profile: str, key: str) -> float | None:
    """The mean over seeds of a time to target; None unless every seed reached it."""
    own = [r for r in results if (r.method, r.partition, r.profile) == (method, partition, profile)]
    if not own or not all(r.reached for r in own):
        return None
    return statistics.mean(getattr(r, key) for r in own)


def fmt(seconds: float | None) -> str:
    return "not every seed reached it" if seconds is None else f"{seconds:.1f}"


def cut(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None:
        return "–"
    return f"{100 * (1 - ours / theirs):.1f} %"


def markdown_report(grid: Grid, results: list[CellResult], host) -> str:
    run = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in grid.run.items())
    lines = [
        f"# Time to {100 * grid.target_accuracy:.1f} % accuracy: grid `{grid.name}`",
        "",
        f"Methods {', '.join(grid.methods)}; partitions {', '.join(grid.partitions)}; seeds "
        f"{', '.join(map(str, grid.seeds))}; every run: {run}. Each run stops at the first round whose "
        "global model reaches the target on the evaluation set, or at the round cap.",
        "",
        f"Command (from the project root): `edgefed bench --grid {grid.name}`, or `edgefed bench --grid "
        "grid.toml` with the grid.toml beside this file.",
        "",
        f"**Target**: {100 * grid.target_accuracy:.1f} % accuracy. {grid.target_note}",
        "",
        "**Clocks.** Time to target is the federation's critical path summed over rounds: per round, the "
        "slowest participating client's local training plus its transfers over the device profile's link, "
        "plus the server's aggregation. *wall* uses the training times measured on this machine "
        f"({host.description or host.name}); *SIMULATED* scales them to the device profile "
        "(edgefed/clock.py; never measured on a device). *sequential* is this machine's own wall "
        "clock for the same rounds, clients trained one after another and the server's evaluation "
        "included. Means ± standard deviation over the seeds that reached the target; *reached* counts them.",
        "",
        *summary_table(grid, results),
        "",
    ]
    cuts = cut_table(grid, results)
    if cuts:
        lines += [
            "## FeDeRA's cut in time to target",
            "",
            f"The FeDeRA paper reports {PAPER_CUT_VS_FFT} against full fine-tuning and {PAPER_CUT_VS_PEFT} "
            "against the fastest other PEFT method, on a Jetson AGX Orin (its own models, data and "
            "fleet). A cut needs every seed of both methods to reach the target.",
            "",
            *cuts,
            "",
        ]
    lines += [
        "Per run: results.csv (one row per run and profile); per-round metrics: cells/<run>/metrics.jsonl. "
        "Plots: accuracy_wall.png, accuracy_simulated.png, bytes_to_target.png.",
        "",
    ]
    return "\n".join(lines)


def plot_reports(grid: Grid, out: Path, results: list[CellResult], rounds: dict, clocks: dict) -> bool:
    """Accuracy against the critical-path wall time and the simulated time; bytes to target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colours = {method: f"C{index}" for index, method in enumerate(grid.methods)}
    clock_panels = [("wall", grid.profiles[0])] + [("simulated", name) for name in grid.profiles]
    for filename, panels in (
        ("accuracy_wall.png", clock_panels[:1]),
        ("accuracy_simulated.png", clock_panels[1:]),
    ):
        figure, axes = plt.subplots(
            len(panels), len(grid.partitions), figsize=(5 * len(grid.partitions), 3.8 * len(panels)),
            squeeze=False, sharey=True,
        )  # fmt: skip
        for row, (kind, profile) in enumerate(panels):
            for column, partition in enumerate(grid.partitions):
                axis = axes[row][column]
                for cell, cell_rounds in rounds.items():
                    if cell.partition != partition:
                        continue
                    clock = clocks[cell.method][profile]
                    times, total = [], 0.0
                    for metrics in cell_rounds[1:]:  # round 0 is at time 0, off a log axis
                        total += round_seconds(metrics, clock)[0 if kind == "wall" else 1]
                        times.append(total)
                    axis.plot(
                        times,
                        [metrics["accuracy"] for metrics in cell_rounds[1:]],
                        marker=".",
                        color=colours[cell.method],
                        alpha=0.7,
                        linewidth=1,
                        label=cell.method if cell.seed == grid.seeds[0] else None,
                    )
                axis.axhline(grid.target_accuracy, color="grey", linestyle="--", linewidth=1)
                if any(len(line.get_xdata()) for line in axis.get_lines()[:-1]):  # [-1]: the target
                    axis.set_xscale("log")  # fft's seconds are two orders above the others
                axis.set_title(f"{partition}" + (f" · SIMULATED {profile}" if kind == "simulated" else ""))
                axis.set_xlabel(
                    "seconds, critical path (this machine's training)"
                    if kind == "wall"
                    else "SIMULATED device seconds, critical path"
                )
                axis.grid(alpha=0.3)
            axes[row][0].set_ylabel("evaluation accuracy")
        axes[0][0].legend()
        figure.tight_layout()
        figure.savefig(out / filename, dpi=100)
        plt.close(figure)
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(grid.partitions) * len(grid.methods) / 3, 4))
    width = 0.8 / len(grid.methods)
    for index, method in enumerate(grid.methods):
        heights = []
        for partition in grid.partitions:
            hit = [
                r.bytes_to_target / MB
                for r in results
                if (r.method, r.partition, r.profile) == (method, partition, grid.profiles[0]) and r.reached
            ]
            heights.append(statistics.mean(hit) if hit else 0.0)
        positions = [p + (index - (len(grid.methods) - 1) / 2) * width for p in range(len(grid.partitions))]
        axis.bar(positions, heights, width, label=method, color=colours[method])
    axis.set_xticks(range(len(grid.partitions)), grid.partitions)
    if any(patch.get_height() > 0 for patch in axis.patches):
        axis.set_yscale("log")
    axis.set_ylabel("MB on the wire to target (up + down, all clients)")
    axis.set_title("bytes to target (missing bar: target not reached)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "bytes_to_target.png", dpi=100)
    plt.close(figure)
    return True


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="benchmarks/time_to_accuracy.py", description=__doc__)
    add = parser.add_argument
    add("--grid", default="smoke", help="a shipped grid (see --list) or a grid TOML file (default smoke)")
    add("--list", action="store_true", help="list the shipped grids")
    add("--out", metavar="DIR", help="results folder (default benchmarks/results/<grid name>)")
    add("--work", metavar="DIR", help="where the runs themselves go (default runs/bench/<grid name>)")
    add("--data", metavar="PATH", help="the runs' data (overrides the grid's)")
    add("--methods", help="comma-separated (overrides the grid's)")
    add("--partitions", help="comma-separated, e.g. iid,dirichlet:0.5 (overrides the grid's)")
    add("--profiles", help="comma-separated device profiles (overrides the grid's)")
    add("--seeds", help="comma-separated (overrides the grid's)")
    add("--target-accuracy", type=float, help="a fraction, e.g. 0.8 (overrides the grid's)")
    add("--host-profile", metavar="FILE", help="this machine's profile (default: measured once per grid)")
    return parser


def bench_command(args: dict[str, Any]) -> int:
    if args["list"]:
        for name in grid_names():
            print(name)
        return 0
    lists = ("methods", "partitions", "profiles")
    listed = {key: args[key].split(",") if args[key] else None for key in lists}
    overrides = dict(listed, target_accuracy=args["target_accuracy"])
    if args["seeds"]:
        try:
            overrides["seeds"] = [int(seed) for seed in args["seeds"].split(",")]
        except ValueError:
            raise EdgefedError(f"--seeds: expected integers like 0,1,2, got {args['seeds']!r}") from None
    grid = load_grid(args["grid"], overrides)
    if args["data"]:
        grid = dataclasses.replace(grid, run={**grid.run, "data": args["data"]})
    out = Path(args["out"] or Path("benchmarks") / "results" / grid.name)
    work = Path(args["work"] or Path("runs") / "bench" / grid.name)
    run_grid(grid, out, work, args["host_profile"])
    return 0


def main(argv: list[str] | None = None) -> int:
    from edgefed.cli import report_errors

    return report_errors(lambda: bench_command(vars(build_parser().parse_args(argv))))
