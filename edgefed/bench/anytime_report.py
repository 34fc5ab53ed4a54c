"""Anytime inference in a fleet grid's report: each early-exit method's exits, their final accuracy
beside their predicted latency on each device (SIMULATED), as a table and a plot."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from edgefed.bench.grid import Grid
from edgefed.bench.replay import CellResult
from edgefed.devices.costmodel import inference_seconds
from edgefed.plotting import pyplot


@dataclass
class AnytimeRow:
    """One early-exit method's exit under one strategy: its accuracy and its latency on each device."""

    method: str
    strategy: str
    exit_layer: int
    accuracy: float  # final evaluation accuracy, mean over the seeds (first partition)
    latency_ms: dict[str, float]  # device profile -> predicted latency of one text (SIMULATED)


def anytime_rows(grid: Grid, results: list[CellResult], clocks: dict) -> list[AnytimeRow]:
    rows = []
    for (method, fleet, strategy), named in clocks.items():
        exits = [
            r.final_exit_accuracy
            for r in results
            if (r.method, r.fleet, r.strategy, r.partition) == (method, fleet, strategy, grid.partitions[0])
            and r.final_exit_accuracy
        ]
        if not exits:
            continue
        fleet_plans = named[fleet].fleet
        profiles = {fleet_plans.profile_for(slot) for slot in range(len(fleet_plans.profiles))}
        for index, accuracies in enumerate(zip(*exits, strict=True)):
            latency = {
                profile.name: 1e3
                * inference_seconds(fleet_plans.shape, index + 1, fleet_plans.request.seq_len, profile)
                for profile in sorted(profiles, key=lambda profile: profile.name)
            }
            rows.append(AnytimeRow(method, strategy, index + 1, statistics.mean(accuracies), latency))
    return rows


def anytime_table(rows: list[AnytimeRow]) -> list[str]:
    if not rows:
        return []
    devices = list(rows[0].latency_ms)
    header = ["method", "strategy", "exit (blocks run)", "accuracy"] + [
        f"ms on {d} (SIMULATED)" for d in devices
    ]
    lines = [
        "## Anytime inference",
        "",
        "Each exit's final accuracy (mean over the seeds) beside its predicted latency for one text of "
        "max-seq-len tokens on each device (edgefed/devices/costmodel.py `inference_seconds`: SIMULATED). "
        "`edgefed predict --run DIR --profile NAME --latency-ms X` answers from the deepest exit that fits. "
        "Plot: accuracy_latency.png.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row.method, row.strategy, str(row.exit_layer), f"{row.accuracy:.3f}"]
        lines.append("| " + " | ".join(cells + [f"{row.latency_ms[d]:.2f}" for d in devices]) + " |")
    return [*lines, ""]


def plot_anytime(out: Path, rows: list[AnytimeRow]) -> bool:
    """Accuracy against predicted latency, one line per device and strategy."""
    plt = pyplot()
    if plt is None or not rows:
        return False
    figure, axes = plt.subplots(1, len({row.method for row in rows}), figsize=(8, 5.5), squeeze=False)
    for axis, method in zip(axes[0], dict.fromkeys(row.method for row in rows), strict=True):
        strategies = list(dict.fromkeys(row.strategy for row in rows))
        styles = dict(zip(strategies, ("-", ":", "--", "-."), strict=False))  # more strategies: solid
        for colour, device in enumerate(rows[0].latency_ms):
            for strategy in strategies:
                own = [row for row in rows if (row.method, row.strategy) == (method, strategy)]
                axis.plot(
                    [row.latency_ms[device] for row in own],
                    [row.accuracy for row in own],
                    styles.get(strategy, "-"),
                    marker="o",
                    color=f"C{colour}",
                    label=f"{device}, {strategy}",
                )
        axis.set_xscale("log")
        axis.set_xlabel("predicted latency per text, ms (SIMULATED)")
        axis.set_ylabel("accuracy of the exit")
        axis.set_title(f"{method}: anytime inference")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small", loc="lower right", ncol=2)
    figure.tight_layout()
    figure.savefig(out / "accuracy_latency.png", dpi=100)
    plt.close(figure)
    return True
