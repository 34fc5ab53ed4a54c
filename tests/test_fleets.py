"""Mixed fleets: fleet specs, the three strategies in a bench grid, recorded plans, a deterministic clock."""

import csv
import subprocess
import sys

import pytest

from edgefed.bench.grid import Grid, load_grid
from edgefed.bench.replay import grid_clocks
from edgefed.bench.run import run_grid
from edgefed.cli import main
from edgefed.devices.profiles import parse_fleet
from edgefed.errors import EdgefedError
from edgefed.federation.recorder import read_metrics
from tests.test_run import tiny_run

BUDGET = 1.5  # SIMULATED s: the slow device's full plan misses it, its planned one fits


def test_fleet_specs_expand_counts_and_keep_exit_caps():
    assert parse_fleet(["2×a + b@3"]) == ("a", "a", "b@3")
    assert parse_fleet(["2xa,1*b", "c"]) == ("a", "a", "b", "c")


@pytest.mark.parametrize(
    ("spec", "message"),
    [("0×a", "count must be at least 1"), ("2×", "expected COUNT×PROFILE"), ("a@0", "@EXIT is a number")],
)
def test_malformed_fleet_specs_are_refused(spec, message):
    with pytest.raises(EdgefedError, match=message):
        parse_fleet([spec])


def tiny_fleet_grid(model, data, method: str, fleet: str, strategies: tuple[str, ...], **run) -> Grid:
    """A one-method, one-seed fleet grid on the tiny model, every run to its round cap."""
    return Grid(
        name=f"tiny-{method}",
        methods=(method,),
        partitions=("iid",),
        seeds=(0,),
        run={"model": str(model), "data": str(data), "batch_size": 8, "max_seq_len": 24, "rank": 4, **run},
        fleets={"mixed": fleet},
        strategies=strategies,
        budget_s=BUDGET,
        target_accuracy=0.99,
    )


@pytest.fixture(scope="module")
def fleet_grid(tmp_path_factory, tiny_model_dir, small_data_dir, fleet_profiles):
    fast, slow = fleet_profiles.split(",")
    strategies = ("uniform", "deadline", "planned")
    grid = tiny_fleet_grid(
        tiny_model_dir,
        small_data_dir,
        "lora",
        f"2×{fast} + {slow}",
        strategies,
        rounds=2,
        local_steps=3,
        lr=0.01,
    )
    folder = tmp_path_factory.mktemp("fleet-bench")
    results = run_grid(grid, folder / "out", folder / "work", echo=lambda line: None)
    return grid, folder / "out", {result.strategy: result for result in results}


def test_each_strategy_is_its_own_run_with_its_own_plans(fleet_grid):
    grid, out, results = fleet_grid
    assert set(results) == {"uniform", "deadline", "planned"}
    uniform, deadline, planned = results["uniform"], results["deadline"], results["planned"]
    assert (uniform.dropped, uniform.slowed, uniform.reduced) == (0, 1, 0)  # everyone waits for it
    assert (deadline.dropped, deadline.slowed, deadline.reduced) == (0 + 1, 0, 0)  # the slow one is dropped
    assert (planned.dropped, planned.slowed, planned.reduced) == (0, 0, 1)  # it trains less, in time
    for strategy in results:
        rows = read_metrics(out / "cells" / f"lora-iid-mixed-{strategy}-s0" / "metrics.jsonl")
        plans = rows[0].plans  # recorded once, when the clients joined
        assert sorted(plans) == ["0", "1", "2"] and all(row.plans is None for row in rows[1:])
        assert [plans[k]["profile"] for k in ("0", "1", "2")] == ["fast-device", "fast-device", "slow-device"]
        frozen = plans["2"]["frozen_layers"]
        assert frozen == (1 if strategy == "planned" else 0)
        if strategy == "deadline":
            assert all(row.dropped == [2] and row.clients == [0, 1] for row in rows[1:])
            assert all(row.sim_round_s == BUDGET for row in rows[1:])  # the server waited for the deadline
        else:
            assert all(row.clients == [0, 1, 2] for row in rows[1:])
            assert all(row.sim_slowest_client == 2 for row in rows[1:])
    # The slow device is the round's critical path: waiting for it costs more than the deadline.
    assert uniform.simulated_s is None  # not reached: the table's figures come from the full rounds
    table = (out / "table.md").read_text()
    assert "| iid | lora | mixed | deadline | 0/1 |" in table
    assert "| lora | mixed | planned | slow-device | 2 | 1–1 |" in table
    with (out / "results.csv").open() as handle:
        assert [row["strategy"] for row in csv.DictReader(handle)] == ["uniform", "deadline", "planned"]
    assert load_grid(str(out / "grid.toml")) == grid  # the recorded grid, fleets included, reruns itself


def test_the_bench_replays_a_fleet_run_to_the_seconds_it_recorded(fleet_grid):
    grid, out, _ = fleet_grid
    for cell in grid.cells():
        (clock,) = grid_clocks(grid)[cell.setting].values()
        for row in read_metrics(out / "cells" / cell.id / "metrics.jsonl")[1:]:
            assert clock.replay(row, 0).seconds == row.sim_round_s


def test_simulated_time_is_the_same_whatever_the_hosts_load(
    tmp_path, tiny_model_dir, small_data_dir, fleet_profiles
):
    flags = {"profiles": fleet_profiles, "aggregator": "hetero", "budget_s": BUDGET, "rounds": 2}
    quiet = tiny_run(tmp_path, tiny_model_dir, small_data_dir, name="quiet", **flags)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = tiny_run(tmp_path, tiny_model_dir, small_data_dir, name="busy", **flags)
    finally:
        burner.kill()
    quiet_rows, busy_rows = (read_metrics(run / "metrics.jsonl") for run in (quiet, busy))
    assert [row.sim_s for row in quiet_rows] == [row.sim_s for row in busy_rows]
    assert [row.client_steps for row in quiet_rows] == [row.client_steps for row in busy_rows]
    assert quiet_rows[-1].sim_s > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"profiles": "no-such-device"}, "no-such-device"),
        ({"profiles": "0×jetson-orin-nano-8gb"}, "count must be at least 1"),
        (
            {"profiles": "jetson-orin-nano-8gb", "fleet_strategy": "deadline", "budget_s": 1e-6},
            "no device meets",
        ),
        ({"profiles": "jetson-orin-nano-8gb", "fleet_strategy": "deadline"}, "set budget-s"),
        ({"profiles": "jetson-orin-nano-8gb", "fleet_strategy": "fastest"}, "unknown fleet-strategy"),
        ({"profiles": "jetson-orin-nano-8gb@3", "method": "ee-adapter"}, "the model has 2"),
        ({"profiles": "jetson-orin-nano-8gb@1"}, "needs an early-exit method"),
    ],
)
def test_bad_fleets_exit_2_with_one_line_and_leave_nothing(
    tmp_path, tiny_model_dir, small_data_dir, capsys, flags, message
):
    out = tmp_path / "refused"
    argv = ["run", "--model", str(tiny_model_dir), "--data", str(small_data_dir), "--out", str(out)]
    argv += ["--max-seq-len", "24", "--batch-size", "8", "--rank", "4", "--local-steps", "2"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_a_grid_with_a_bad_fleet_writes_no_results(tmp_path, tiny_model_dir, small_data_dir, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text(
        "name = 'bad'\nmethods = ['lora']\npartitions = ['iid']\nseeds = [0]\nstrategies = ['deadline']\n"
        f"budget-s = 1e-6\ntarget-accuracy = 0.9\n[run]\nmodel = '{tiny_model_dir}'\n"
        f"data = '{small_data_dir}'\n"
        "max-seq-len = 24\nlocal-steps = 2\n[fleets]\none = '2×raspberry-pi-5-8gb'\n"
    )
    out = tmp_path / "results"
    assert main(["bench", "--grid", str(grid), "--out", str(out), "--work", str(tmp_path / "work")]) == 2
    assert "no device meets the budget" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "work").exists()


def test_an_early_exit_fleet_reports_each_exits_accuracy_and_latency(
    tmp_path, tiny_model_dir, small_data_dir, fleet_profiles
):
    fast, slow = fleet_profiles.split(",")
    fleet = f"{fast} + {slow}"
    grid = tiny_fleet_grid(
        tiny_model_dir, small_data_dir, "ee-adapter", fleet, ("planned",), rounds=1, local_steps=2
    )
    (result,) = run_grid(grid, tmp_path / "out", tmp_path / "work", echo=lambda line: None)
    assert len(result.final_exit_accuracy) == 2
    table = (tmp_path / "out" / "table.md").read_text()
    anytime = table.split("## Anytime inference")[1]
    rows = [line for line in anytime.splitlines() if line.startswith("| ee-adapter | planned |")]
    assert [row.split(" | ")[2] for row in rows] == ["1", "2"]
    fast_ms = [float(row.split(" | ")[4]) for row in rows]  # fast-device's column comes first
    slow_ms = [float(row.split(" | ")[5].rstrip(" |")) for row in rows]
    assert fast_ms[0] < fast_ms[1] < slow_ms[1] and slow_ms[0] < slow_ms[1]
    assert (tmp_path / "out" / "accuracy_latency.png").stat().st_size > 0
