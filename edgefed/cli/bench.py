"""`edgefed bench`: its options and its command."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from edgefed.errors import EdgefedError


def add_bench_options(parser: argparse.ArgumentParser) -> None:
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


def bench_command(args: dict[str, Any]) -> int:
    from edgefed.bench.grid import grid_names, load_grid
    from edgefed.bench.run import run_grid

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
    run_grid(grid, out, work)
    return 0
