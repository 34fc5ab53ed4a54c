"""A bench grid: methods × partitions × (device profiles, or fleets × strategies) × seeds, the runs'
shared settings and the target.

Two kinds of grid. A *profile* grid trains each (method, partition, seed) once, every client on the
run's settings, and replays the run on each named device profile's simulated clock. A *fleet* grid
names fleets (`[fleets]`, each a mixed list of devices like `2×jetson-agx-orin-64gb-maxn +
2×raspberry-pi-5-8gb`), strategies (edgefed/devices/fleet.py FLEET_STRATEGIES) and a per-round budget;
each (method, partition, fleet, strategy, seed) is its own run, because what the clients train depends
on the strategy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgefed.components import resolve_config, taken
from edgefed.config import RunConfig, key_of
from edgefed.devices.fleet import FLEET_STRATEGIES
from edgefed.devices.profiles import parse_fleet
from edgefed.errors import EdgefedError
from edgefed.shipped import read_shipped, shipped_names
from edgefed.toml_io import parse_toml, toml_scalar

GRIDS = "edgefed.bench.grids"
TARGET_KEYS = ("target_accuracy", "target_margin")
REFERENCE = "reference-fft-centralised"  # the cell that sets a target-margin grid's target


@dataclass(frozen=True)
class Grid:
    name: str
    methods: tuple[str, ...]
    partitions: tuple[str, ...]
    seeds: tuple[int, ...]
    run: dict[str, Any]  # `edgefed run` keys every cell shares
    profiles: tuple[str, ...] = ()  # a profile grid's clocks, or:
    fleets: dict[str, str] = field(default_factory=dict)  # a fleet grid's fleets: name -> devices
    strategies: tuple[str, ...] = ()  # a fleet grid's strategies
    budget_s: float | None = None  # a fleet grid's per-round budget (SIMULATED seconds)
    target_accuracy: float | None = None  # a fixed target, or:
    target_margin: float | None = None  # this far under what centralised full fine-tuning reaches
    target_note: str = ""  # how the target was chosen, for the table

    def settings(self) -> list[tuple[str, str]]:
        """(fleet, strategy) of each run per (method, partition, seed); ("", "") in a profile grid."""
        return [(fleet, strategy) for fleet in self.fleets for strategy in self.strategies] or [("", "")]

    def cells(self) -> list[Cell]:
        return [
            Cell(method, partition, seed, fleet, strategy)
            for partition in self.partitions
            for method in self.methods
            for fleet, strategy in self.settings()
            for seed in self.seeds
        ]

    def to_toml(self) -> str:
        lines = ["# The grid these results come from (edgefed bench --grid grid.toml reruns it)", ""]
        keys = ("name", "methods", "partitions", "profiles", "strategies", "budget_s", "seeds")
        for key in (*keys, *TARGET_KEYS, "target_note"):
            if getattr(self, key) not in (None, ()):
                lines.append(f"{key_of(key)} = {toml_scalar(getattr(self, key))}")
        lines += ["", "[run]"] + [f"{key_of(key)} = {toml_scalar(value)}" for key, value in self.run.items()]
        if self.fleets:
            lines += ["", "[fleets]"] + [
                f"{name} = {toml_scalar(spec)}" for name, spec in self.fleets.items()
            ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Cell:
    method: str
    partition: str
    seed: int
    fleet: str = ""
    strategy: str = ""

    @property
    def id(self) -> str:
        setting = f"-{self.fleet}-{self.strategy}" if self.fleet else ""
        return f"{self.method}-{self.partition.replace(':', '')}{setting}-s{self.seed}"

    @property
    def setting(self) -> tuple[str, str, str]:
        """What the cell's clocks depend on: runs of other seeds and partitions share them."""
        return self.method, self.fleet, self.strategy


def grid_names() -> list[str]:
    return shipped_names(GRIDS)


def load_grid(name_or_path: str, overrides: dict[str, Any] | None = None) -> Grid:
    """A shipped grid by name (`edgefed bench --list`) or a TOML file; `overrides` replace its keys."""
    text, _ = read_shipped(name_or_path, GRIDS, "grid", "edgefed/bench/grids")
    raw = parse_toml(text, name_or_path)
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    fields = {each.name for each in dataclasses.fields(Grid)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise EdgefedError(f"{name_or_path}: unknown grid keys {unknown}; valid: {sorted(fields)}")
    optional = {"target_note", "profiles", "fleets", "strategies", "budget_s", *TARGET_KEYS}
    missing = sorted(name for name in fields - optional if not values.get(name))
    if missing:
        raise EdgefedError(f"{name_or_path}: the grid needs {missing}")
    if (values.get("target_accuracy") is None) == (values.get("target_margin") is None):
        raise EdgefedError(f"{name_or_path}: set one of target-accuracy and target-margin")
    run = {key.replace("-", "_"): value for key, value in values.pop("run").items()}
    per_cell = ("method", "partition", "seed", "target_accuracy", "stop_at_target", "out", "profiles")
    per_fleet = ("clients", "fleet_strategy", "budget_s", "aggregator") if values.get("fleets") else ()
    for key in (*per_cell, *per_fleet):
        if key in run:
            raise EdgefedError(f"{name_or_path}: [run] must not set {key}: the grid sets it per cell")
    if bool(values.get("profiles")) == bool(values.get("fleets")):
        raise EdgefedError(f"{name_or_path}: name device profiles (replayed) or [fleets], one of the two")
    if values.get("fleets") and not values.get("strategies"):
        raise EdgefedError(f"{name_or_path}: a fleet grid needs strategies, e.g. {list(FLEET_STRATEGIES)}")
    unknown = sorted(set(values.get("strategies", ())) - set(FLEET_STRATEGIES))
    if unknown:
        raise EdgefedError(
            f"{name_or_path}: unknown strategies {unknown}; choose from {list(FLEET_STRATEGIES)}"
        )
    grid = Grid(
        name=str(values["name"]),
        methods=tuple(values["methods"]),
        partitions=tuple(values["partitions"]),
        seeds=tuple(int(seed) for seed in values["seeds"]),
        run=run,
        profiles=tuple(values.get("profiles", ())),
        fleets={str(name): str(spec) for name, spec in values.get("fleets", {}).items()},
        strategies=tuple(values.get("strategies", ())),
        budget_s=optional_float(values.get("budget_s")),
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


def cell_config(grid: Grid, cell: Cell, target: float) -> RunConfig:
    """The run of one cell: the grid's shared keys, the cell's own, to `target` or the round cap."""
    flags = dict(grid.run)
    flags.update(
        method=cell.method,
        partition=cell.partition,
        seed=cell.seed,
        target_accuracy=target,
        stop_at_target=True,
    )
    if cell.fleet:
        devices = parse_fleet([grid.fleets[cell.fleet]])
        flags.update(
            profiles=devices, clients=len(devices), fleet_strategy=cell.strategy, budget_s=grid.budget_s
        )
        # Planned clients train different tensors; the others all train everything: plain FedAvg.
        flags["aggregator"] = "hetero" if cell.strategy == "planned" else "fedavg"
    return resolve_config(None, taken(flags))


def reference_config(grid: Grid) -> RunConfig:
    """Centralised full fine-tuning: one client holding all the training data, as many rounds and local
    steps as a cell's cap, every round run (the target is set under its best evaluation accuracy)."""
    flags = dict(grid.run, method="fft", partition="iid", seed=grid.seeds[0], clients=1, min_clients=None)
    return resolve_config(None, taken(flags))
