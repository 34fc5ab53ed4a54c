"""A bench grid: methods × partitions × device profiles × seeds, the runs' shared settings and the target."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgefed.config import RunConfig, key_of, resolve_config
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
    text, _ = read_shipped(name_or_path, GRIDS, "grid", "edgefed/bench/grids")
    raw = parse_toml(text, name_or_path)
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
    return resolve_config(None, flags)


def reference_config(grid: Grid) -> RunConfig:
    """Centralised full fine-tuning: one client holding all the training data, as many rounds and local
    steps as a cell's cap, every round run (the target is set under its best evaluation accuracy)."""
    flags = dict(grid.run, method="fft", partition="iid", seed=grid.seeds[0], clients=1, min_clients=None)
    return resolve_config(None, flags)
