"""`edgefed bench` on the tiny model: the critical-path clocks, the grid's reports, resume, errors."""

import csv
import dataclasses
import json
import math

import pytest

from edgefed.bench.grid import REFERENCE, Cell, Grid, load_grid
from edgefed.bench.replay import cell_results, critical_path_s, grid_clocks
from edgefed.bench.run import run_grid
from edgefed.cli import main
from edgefed.components import resolve_config
from edgefed.devices.profiles import load_profile
from edgefed.errors import EdgefedError
from edgefed.federation.recorder import read_metrics
from edgefed.federation.runner import run
from edgefed.types import TIMING_FIELDS as TIMING_KEYS
from edgefed.types import RoundMetrics

PROFILES = ("jetson-agx-orin-64gb-maxn", "jetson-agx-orin-64gb-15w")


def tiny_grid(tiny_model_dir, small_data_dir, **changes) -> Grid:
    values = dict(
        name="tiny",
        methods=("lora", "federa"),
        partitions=("iid",),
        profiles=PROFILES,
        seeds=(0, 1),
        run={
            "model": str(tiny_model_dir),
            "data": str(small_data_dir),
            "clients": 3,
            "rounds": 3,
            "local_steps": 2,
            "batch_size": 8,
            "max_seq_len": 24,
            "rank": 4,
            "lr": 0.01,
        },
        target_accuracy=0.99,  # out of reach: every run goes to the round cap
    )
    values.update(changes)
    return Grid(**values)


def test_the_critical_path_is_the_slowest_client_with_its_transfer_not_the_sum():
    row = RoundMetrics(
        round=1, accuracy=0.5, loss=0.7, train_loss=0.7, bytes_up=5_000, bytes_down=10, clients=[0, 1, 2],
        dropped=[], slowest_client_s=3.0, client_train_s=[1.0, 3.0, 2.0],
        client_bytes=[[0, 0], [10, 0], [0, 5_000]], aggregate_s=0.25, round_s=3.25, wall_s=3.25,
    )  # fmt: skip
    transfer = lambda client, down, up: down * 0.01 + up * 0.001  # noqa: E731
    # Client 2 is the slowest once its transfer counts: 2 + 5 s, not 3 + 0.1 s; the sum would be 11.1 s.
    assert critical_path_s(row, transfer) == pytest.approx(7.0 + 0.25)


def test_replaying_a_run_gives_the_simulated_clock_it_ran_on(tiny_model_dir, small_data_dir, tmp_path):
    """The bench replays a run without profiles on each profile's clock; the run that trained with that
    profile got the same seconds from the live clock."""
    grid = tiny_grid(tiny_model_dir, small_data_dir)
    flags = dict(grid.run, method="federa", partition="iid", out=str(tmp_path / "run"))
    run(resolve_config(None, dict(flags, profiles=PROFILES[1])), echo=lambda line: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    clock = grid_clocks(grid)[("federa", "", "")][PROFILES[1]]
    for row in rows[1:]:
        # float64 sums of a few hundred terms: rounding below 1e-13 relative (n·u with u = 1.1e-16).
        assert clock.replay(row, 0).seconds == pytest.approx(row.sim_round_s, rel=1e-12)
        assert clock.replay(row, 0).slowest == row.sim_slowest_client
        # Rounds recorded before metrics carried each client's steps count the run's local steps.
        old = dataclasses.replace(row, client_steps=None)
        assert clock.replay(old, grid.run["local_steps"]).seconds == pytest.approx(row.sim_round_s)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_model_dir, small_data_dir):
    folder = tmp_path_factory.mktemp("bench")
    grid = tiny_grid(tiny_model_dir, small_data_dir)
    results = run_grid(grid, folder / "out", folder / "work", echo=lambda line: None)
    return grid, folder, results


def test_the_grid_writes_a_row_per_run_and_profile_a_table_and_plots(grid_run):
    grid, folder, results = grid_run
    out = folder / "out"
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["seed"], r["profile"]) for r in rows] == [
        (method, str(seed), profile) for method in grid.methods for seed in grid.seeds for profile in PROFILES
    ]
    assert all(r["reached"] == "False" and r["rounds_run"] == "3" for r in rows)
    assert len(results) == len(rows)
    table = (out / "table.md").read_text()
    assert "| iid | lora | 0/2 |" in table and "| iid | federa | 0/2 |" in table
    assert "SIMULATED s, jetson-agx-orin-64gb-15w" in table and "wall s (critical path)" in table
    for plot in ("accuracy_wall.png", "accuracy_simulated.png", "bytes_to_target.png"):
        assert (out / plot).stat().st_size > 0
    assert load_grid(str(out / "grid.toml")) == grid  # the recorded grid reruns itself


def test_a_reached_target_gives_rounds_time_and_bytes_up_to_that_round(grid_run):
    grid, folder, _ = grid_run
    cell = Cell("lora", "iid", 0)
    recorded = read_metrics(folder / "out" / "cells" / cell.id / "metrics.jsonl")
    # The tiny model's accuracy barely moves; the recorded times and bytes with a curve that rises.
    rounds = [dataclasses.replace(row, accuracy=0.5 + 0.1 * row.round) for row in recorded]
    clocks = grid_clocks(grid)[cell.setting]
    target, first = 0.7 - 1e-9, 2
    for result in cell_results(cell, rounds, target, clocks, 0):
        transfer = clocks[result.profile].transfer_s
        assert transfer(0, 10**6, 10**6) == load_profile(result.profile).transfer_s(10**6, 10**6)
        assert result.reached and result.rounds_to_target == first
        assert result.wall_s == pytest.approx(
            sum(critical_path_s(row, transfer) for row in rounds[1 : first + 1])
        )
        assert result.bytes_to_target == sum(row.bytes_up + row.bytes_down for row in rounds[1 : first + 1])
        assert result.sequential_s == rounds[first].wall_s
        # Energy: every client's simulated busy time at its device's power budget, rounds 1..first.
        busy_s = sum(
            sum(clocks[result.profile].replay(row, 0).client_s.values()) for row in rounds[1 : first + 1]
        )
        assert result.energy_to_target_j == pytest.approx(load_profile(result.profile).power_w * busy_s)
    maxn, low_power = cell_results(cell, rounds, target, clocks, 0)
    assert low_power.simulated_s > maxn.simulated_s  # 15 W is the slower clock
    assert maxn.wall_s == low_power.wall_s  # one training, one link: the same critical path


def test_a_killed_grid_resumes_at_the_unfinished_run(
    grid_run, tiny_model_dir, small_data_dir, tmp_path, monkeypatch, crash_after_round
):
    grid, folder, _ = grid_run
    out, work = tmp_path / "out", tmp_path / "work"
    crash_after_round(1)  # the first run dies after its first round
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, out, work, echo=lambda line: None)
    monkeypatch.undo()
    lines = []
    run_grid(grid, out, work, echo=lines.append)
    assert "0 done, 4 to run" in lines[0]
    assert any("resuming run" in line and "after round 1" in line for line in lines)
    # Resumed, the run computes what the uninterrupted grid's did (what goes down in the round after a
    # resume differs by a few bytes per client, so bytes down are left out).
    skipped = (*TIMING_KEYS, "bytes_down", "client_bytes")
    for cell in grid.cells():
        a, b = (
            [
                {k: v for k, v in json.loads(line).items() if k not in skipped}
                for line in (root / "cells" / cell.id / "metrics.jsonl").open()
            ]
            for root in (folder / "out", out)
        )
        assert a == b
    # Finished, the grid runs nothing again and only rewrites its reports.
    lines = []
    run_grid(grid, out, work, echo=lines.append)
    assert "4 done, 0 to run" in lines[0] and not any("[1/4]" in line for line in lines)


def test_runs_stop_at_the_first_round_that_reaches_the_target(grid_run, tmp_path):
    grid, _, _ = grid_run
    # With these settings the tiny model's accuracy goes 0.42, 0.42, 0.42, 0.58 (seeded).
    learning = {**grid.run, "local_steps": 4, "lr": 0.03, "rounds": 5}
    short = dataclasses.replace(grid, methods=("lora",), seeds=(0,), target_accuracy=0.5, run=learning)
    (result, _) = run_grid(short, tmp_path / "out", tmp_path / "work", echo=lambda line: None)
    assert result.reached and result.rounds_to_target == 3 == result.rounds_run
    started = dataclasses.replace(short, target_accuracy=0.42)
    (result, _) = run_grid(started, tmp_path / "0", tmp_path / "work0", echo=lambda line: None)
    assert result.rounds_to_target == 0 == result.rounds_run  # the starting model trains no round


def test_a_target_margin_runs_centralised_full_fine_tuning_first(tiny_model_dir, small_data_dir, tmp_path):
    grid = tiny_grid(
        tiny_model_dir,
        small_data_dir,
        methods=("lora",),
        seeds=(0,),
        target_accuracy=None,
        target_margin=0.05,
    )
    run_grid(grid, tmp_path / "out", tmp_path / "work", echo=lambda line: None)
    reference = tmp_path / "out" / "cells" / REFERENCE
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["method"], summary["clients"], summary["rounds"]) == ("fft", 1, 3)
    target = float((tmp_path / "out" / "table.md").read_text().split("**Target**: ")[1].split(" %")[0]) / 100
    # The target is floored to 0.1 % (never above best − margin); table.md prints it to one decimal of
    # a percent: within 0.05 % of the floored value.
    floored = math.floor((summary["best_accuracy"] - 0.05) * 1000) / 1000
    assert target == pytest.approx(floored, abs=5e-4)


def test_a_results_folder_of_another_grid_is_refused(grid_run):
    grid, folder, _ = grid_run
    other = tiny_grid(grid.run["model"], grid.run["data"], seeds=(5,))
    with pytest.raises(EdgefedError, match="different grid"):
        run_grid(other, folder / "out", folder / "work", echo=lambda line: None)


def test_a_profile_whose_plan_differs_from_the_run_is_refused(grid_run):
    grid, _, _ = grid_run
    asked = grid_clocks(grid)[("lora", "", "")][PROFILES[1]].fleet.plan(0)
    # A budget just under the plan's round: the planner must train less (freeze, exit early, lower rank).
    tight = dataclasses.replace(grid, run={**grid.run, "budget_s": 0.99 * asked.round_s})
    with pytest.raises(EdgefedError, match="departs from the run's settings"):
        grid_clocks(tight)


GRID_HEAD = (
    "name = 'x'\nmethods = ['lora']\npartitions = ['iid']\nprofiles = ['jetson-agx-orin-64gb-maxn']\n"
    "seeds = [0]\n"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = 'x'", "the grid needs"),
        (
            GRID_HEAD + "target-accuracy = 0.8\ntarget-margin = 0.03\n[run]\nclients = 2",
            "one of target-accuracy",
        ),
        (GRID_HEAD + "target-accuracy = 0.8\n[run]\nmethod = 'fft'", "must not set method"),
        (GRID_HEAD.replace("lora", "nope") + "target-accuracy = 0.8\n[run]\nclients = 2", "unknown method"),
        (GRID_HEAD + "target-margin = 1.5\n[run]\nclients = 2", "target-margin is a fraction"),
        ("colour = 'blue'", "unknown grid keys"),
        ("name = [", "invalid TOML"),
    ],
)
def test_bad_grids_get_one_line_errors(tmp_path, text, message):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(EdgefedError, match=message):
        load_grid(str(path))


def test_the_command_lists_grids_and_reports_bad_flags(capsys):
    assert main(["bench", "--list"]) == 0
    assert capsys.readouterr().out.split() == [
        "federa-sst2",
        "federa-sst2-skew",
        "fleet-sst2",
        "fleet-trec",
        "smoke",
    ]
    assert main(["bench", "--grid", "smoke", "--seeds", "one"]) == 2
    assert "--seeds: expected integers" in capsys.readouterr().err
    assert main(["bench", "--grid", "no-such-grid"]) == 2
    assert "unknown grid 'no-such-grid'" in capsys.readouterr().err
