"""A bench grid's reports: results.csv, table.md (means ± sd, FeDeRA's cuts beside the paper's) and plots."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

from edgefed.bench.grid import Grid
from edgefed.bench.replay import MB, CellResult, round_seconds
from edgefed.plotting import pyplot

PEFT_BASELINES = ("lora", "adapter", "bitfit")  # "the fastest other PEFT method" is one of these
# The FeDeRA paper's reported cuts in time to target on a Jetson AGX Orin (arXiv 2404.18848).
PAPER_CUT_VS_FFT = "95.9–97.9 %"
PAPER_CUT_VS_PEFT = "up to 74.6 %"


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
        "(edgefed/devices/clock.py; never measured on a device). *sequential* is this machine's own wall "
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
    plt = pyplot()
    if plt is None:
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
                        [metrics.accuracy for metrics in cell_rounds[1:]],
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
