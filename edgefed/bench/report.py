"""A bench grid's reports: results.csv, table.md (means ± sd, FeDeRA's cuts beside the paper's) and plots."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

from edgefed.bench.anytime_report import AnytimeRow, anytime_rows, anytime_table, plot_anytime
from edgefed.bench.grid import Grid
from edgefed.bench.replay import MB, CellResult, critical_path_s, recorded_plans
from edgefed.devices.fleet import FLEET_STRATEGIES
from edgefed.plotting import pyplot

PEFT_BASELINES = ("lora", "adapter", "bitfit")  # "the fastest other PEFT method" is one of these
# The FeDeRA paper's reported cuts in time to target on a Jetson AGX Orin (arXiv 2404.18848).
PAPER_CUT_VS_FFT = "95.9–97.9 %"
PAPER_CUT_VS_PEFT = "up to 74.6 %"


def write_reports(
    grid: Grid, out: Path, results: list[CellResult], rounds: dict, clocks: dict, default_steps: int
) -> None:
    """`rounds`: Cell -> its metrics; `clocks`: Cell.setting -> clock name -> SimulatedClock."""
    fields = [field.name for field in dataclasses.fields(CellResult)]
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in results:
            writer.writerow(dataclasses.asdict(result))
    if grid.fleets:
        report = fleet_report(grid, results, rounds, anytime_rows(grid, results, clocks))
    else:
        report = markdown_report(grid, results)
    (out / "table.md").write_text(report, encoding="utf-8")
    plot_reports(grid, out, results, rounds, clocks, default_steps)
    if grid.fleets:
        plot_anytime(out, anytime_rows(grid, results, clocks))


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
        + ["MB to target"]
        + [f"SIMULATED kJ, {name}" for name in profiles]
        + ["sequential s (this machine)", "final accuracy"]
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
            row.append(mean_sd([r.bytes_to_target / MB for r in hit]))
            for name in profiles:
                row.append(mean_sd(kilojoules(r for r in own if r.profile == name and r.reached), 3))
            row += [
                mean_sd([r.sequential_s for r in hit]),
                mean_sd([r.final_accuracy for r in on_first], 3),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def kilojoules(results) -> list[float]:
    """The energies to target that are known, in kJ."""
    return [r.energy_to_target_j / 1e3 for r in results if r.energy_to_target_j is not None]


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


CLOCKS = (
    "**Clocks.** Time to target is the federation's critical path summed over rounds: per round, the "
    "slowest participating client. *SIMULATED* is the cost model's time for that client's local steps "
    "on its device (the plan's predicted step time × its steps) plus its transfers over the device's "
    "link: equal work gives equal simulated time whatever this machine's load (edgefed/devices/clock.py; "
    "never measured on a device). *wall* is measured: the training times on this machine plus the same "
    "transfers and the server's aggregation. *sequential* is this machine's own wall clock for the same "
    "rounds, clients trained one after another and the server's evaluation included. *SIMULATED kJ* "
    "is the energy over every participating client's rounds to the target: its device's power budget in "
    "that power mode (the profile's [power] watts: an upper bound, training draws less) × its SIMULATED "
    "busy time; a device's sensors measure it in a real fleet (`edgefed client`). Means ± standard "
    "deviation over the seeds that reached the target; *reached* counts them."
)


def header_lines(grid: Grid, kinds: str) -> list[str]:
    run = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in grid.run.items())
    return [
        f"# Time to {100 * grid.target_accuracy:.1f} % accuracy: grid `{grid.name}`",
        "",
        f"Methods {', '.join(grid.methods)}; partitions {', '.join(grid.partitions)}; {kinds}seeds "
        f"{', '.join(map(str, grid.seeds))}; every run: {run}. Each run stops at the first round whose "
        "global model reaches the target on the evaluation set, or at the round cap.",
        "",
        f"Command (from the project root): `edgefed bench --grid {grid.name}`, or `edgefed bench --grid "
        "grid.toml` with the grid.toml beside this file.",
        "",
        f"**Target**: {100 * grid.target_accuracy:.1f} % accuracy. {grid.target_note}",
        "",
        CLOCKS,
        "",
    ]


def fleet_report(grid: Grid, results: list[CellResult], rounds: dict, anytime: list[AnytimeRow]) -> str:
    fleets = "; ".join(f"fleet `{name}`: {spec}" for name, spec in grid.fleets.items())
    budget = "none" if grid.budget_s is None else f"{grid.budget_s:g} SIMULATED s"
    lines = header_lines(grid, f"{fleets}; strategies {', '.join(grid.strategies)}; budget {budget}; ")
    lines += [
        "**Strategies.** "
        + "; ".join(f"*{name}*: {FLEET_STRATEGIES[name]}" for name in grid.strategies)
        + ". *dropped*: clients the deadline dropped; *slowed*: clients whose round exceeds the budget, "
        "so that every round waits for them; *reduced*: clients whose plan trains less than the run's "
        "settings (frozen layers, a shallower exit, a lower rank, a smaller batch or shorter inputs).",
        "",
        *fleet_table(grid, results),
        "",
        "## What each device trained",
        "",
        "The plan each client was given when it joined (the first seed's run on the first partition; "
        "times are the cost model's, SIMULATED).",
        "",
        *plan_table(grid, rounds),
        "",
        *anytime_table(anytime),
        "Per run: results.csv; per-round metrics (each client's plan in the record of the round it joined): "
        "cells/<run>/metrics.jsonl. Plots: accuracy_wall.png, accuracy_simulated.png, bytes_to_target.png.",
        "",
    ]
    return "\n".join(lines)


def fleet_table(grid: Grid, results: list[CellResult]) -> list[str]:
    header = [
        "partition", "method", "fleet", "strategy", "reached", "rounds", "SIMULATED s to target",
        "MB to target", "SIMULATED kJ to target", "final accuracy", "final accuracy per exit", "dropped",
        "slowed", "reduced",
        "wall s (measured, this machine)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for partition in grid.partitions:
        for method in grid.methods:
            for fleet, strategy in grid.settings():
                key = (method, partition, fleet, strategy)
                own = [r for r in results if (r.method, r.partition, r.fleet, r.strategy) == key]
                hit = [r for r in own if r.reached]
                exits = [r.final_exit_accuracy for r in own if r.final_exit_accuracy]
                per_exit = [statistics.mean(values) for values in zip(*exits, strict=True)]
                row = [
                    partition, method, fleet, strategy, f"{len(hit)}/{len(own)}",
                    mean_sd([r.rounds_to_target for r in hit]),
                    mean_sd([r.simulated_s for r in hit]),
                    mean_sd([r.bytes_to_target / MB for r in hit]),
                    mean_sd(kilojoules(hit), 3),
                    mean_sd([r.final_accuracy for r in own], 3),
                    " / ".join(f"{value:.3f}" for value in per_exit) or "–",
                    mean_sd([r.dropped for r in own], 0),
                    mean_sd([r.slowed for r in own], 0),
                    mean_sd([r.reduced for r in own], 0),
                    mean_sd([r.wall_s for r in hit]),
                ]  # fmt: skip
                lines.append("| " + " | ".join(row) + " |")
    return lines


def plan_table(grid: Grid, rounds: dict) -> list[str]:
    lines = [
        "| method | fleet | strategy | device | clients | trains layers | exit | rank | batch | length | "
        "round s (SIMULATED) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, cell_rounds in rounds.items():
        if cell.partition != grid.partitions[0] or cell.seed != grid.seeds[0]:
            continue
        by_device: dict[tuple, list[int]] = {}
        for client, plan in sorted(recorded_plans(cell_rounds).items()):
            key = tuple(
                plan[k]
                for k in (
                    "profile",
                    "frozen_layers",
                    "exit_layer",
                    "rank",
                    "batch_size",
                    "seq_len",
                    "round_s",
                )
            )
            by_device.setdefault(key, []).append(client)
        for (profile, frozen, exit_layer, rank, batch, length, round_s), clients in by_device.items():
            lines.append(
                f"| {cell.method} | {cell.fleet} | {cell.strategy} | {profile} | "
                f"{', '.join(map(str, clients))} | {frozen}–{exit_layer - 1} | {exit_layer} | {rank} | "
                f"{batch} | {length} | {round_s:.2f} |"
            )
    return lines


def markdown_report(grid: Grid, results: list[CellResult]) -> str:
    lines = [
        *header_lines(grid, ""),
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


def label_of(cell) -> str:
    return f"{cell.method} {cell.strategy}" if cell.strategy else cell.method


def plot_reports(
    grid: Grid, out: Path, results: list[CellResult], rounds: dict, clocks: dict, default_steps: int
) -> bool:
    """Accuracy against the critical-path wall time and the simulated time; bytes to target."""
    plt = pyplot()
    if plt is None:
        return False
    labels = list(dict.fromkeys(label_of(cell) for cell in rounds))
    colours = {label: f"C{index}" for index, label in enumerate(labels)}
    names = list(grid.fleets) or list(grid.profiles)
    clock_panels = [("wall", name) for name in names[:1]] + [("simulated", name) for name in names]
    for filename, panels in (
        ("accuracy_wall.png", clock_panels[:1]),
        ("accuracy_simulated.png", clock_panels[1:]),
    ):
        figure, axes = plt.subplots(
            len(panels), len(grid.partitions), figsize=(5 * len(grid.partitions), 3.8 * len(panels)),
            squeeze=False, sharey=True,
        )  # fmt: skip
        for row, (kind, name) in enumerate(panels):
            for column, partition in enumerate(grid.partitions):
                axis = axes[row][column]
                for cell, cell_rounds in rounds.items():
                    clock = clocks[cell.setting].get(name)
                    if cell.partition != partition or clock is None:
                        continue
                    times, total = [], 0.0
                    for metrics in cell_rounds[1:]:  # round 0 is at time 0, off a log axis
                        if kind == "wall":
                            total += critical_path_s(metrics, clock.transfer_s)
                        else:
                            total += clock.replay(metrics, default_steps).seconds
                        times.append(total)
                    axis.plot(
                        times,
                        [metrics.accuracy for metrics in cell_rounds[1:]],
                        marker=".",
                        color=colours[label_of(cell)],
                        alpha=0.7,
                        linewidth=1,
                        label=label_of(cell) if cell.seed == grid.seeds[0] else None,
                    )
                axis.axhline(grid.target_accuracy, color="grey", linestyle="--", linewidth=1)
                if any(len(line.get_xdata()) for line in axis.get_lines()[:-1]):  # [-1]: the target
                    axis.set_xscale("log")  # fft's seconds are two orders above the others
                    axis.xaxis.set_minor_formatter(plt.NullFormatter())  # labels overlap on short spans
                axis.set_title(f"{partition}" + (f" · SIMULATED {name}" if kind == "simulated" else ""))
                axis.set_xlabel(
                    "seconds, critical path (this machine's training)"
                    if kind == "wall"
                    else "SIMULATED device seconds, critical path"
                )
                axis.grid(alpha=0.3)
            axes[row][0].set_ylabel("evaluation accuracy")
        axes[0][0].legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(out / filename, dpi=100)
        plt.close(figure)
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(grid.partitions) * len(labels) / 3, 4))
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        heights = []
        for partition in grid.partitions:
            hit = [
                r.bytes_to_target / MB
                for r in results
                if (label_of(r), r.partition, r.profile) == (label, partition, names[0]) and r.reached
            ]
            heights.append(statistics.mean(hit) if hit else 0.0)
        positions = [p + (index - (len(labels) - 1) / 2) * width for p in range(len(grid.partitions))]
        axis.bar(positions, heights, width, label=label, color=colours[label])
    axis.set_xticks(range(len(grid.partitions)), grid.partitions)
    if any(patch.get_height() > 0 for patch in axis.patches):
        axis.set_yscale("log")
    axis.set_ylabel("MB on the wire to target (up + down, all clients)")
    axis.set_title("bytes to target (missing bar: target not reached)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "bytes_to_target.png", dpi=100)
    plt.close(figure)
    return True
