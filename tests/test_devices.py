"""Fleets of device profiles end to end: per-client plans, hetero aggregation, the simulated clock, exits."""

import itertools
import json

import pytest

from edgefed.cli import main
from edgefed.devices.profiles import load_profile, profile_toml
from tests.test_run import read_metrics, tiny_run


@pytest.fixture(scope="module")
def fleet_profiles(tmp_path_factory):
    """A fast device and a slow one (slow enough that a budget makes it freeze a layer)."""
    folder = tmp_path_factory.mktemp("profiles")
    base = load_profile("jetson-agx-orin-64gb-maxn")
    paths = []
    for name, tflops in (("fast-device", 5.0), ("slow-device", 0.00005)):
        profile = base.__class__(**{**base.__dict__, "name": name, "fp32_tflops": tflops, "source": ""})
        path = folder / f"{name}.toml"
        path.write_text(profile_toml(profile), encoding="utf-8")
        paths.append(str(path))
    return ",".join(paths)


def fleet_flags(profiles: str) -> dict:
    """The fleet's run: within 1.5 s per round the slow device must freeze a layer."""
    return {"profiles": profiles, "aggregator": "hetero", "budget_s": 1.5, "target_accuracy": 0.4}


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory, tiny_model_dir, small_data_dir, fleet_profiles):
    return tiny_run(
        tmp_path_factory.mktemp("fleet"), tiny_model_dir, small_data_dir, **fleet_flags(fleet_profiles)
    )


def test_each_client_trains_its_own_plan(fleet_run):
    summary = json.loads((fleet_run / "summary.json").read_text())
    plans = summary["plans"]
    assert [plans[k]["profile"] for k in ("0", "1", "2")] == ["fast-device", "slow-device", "fast-device"]
    assert plans["0"]["frozen_layers"] == 0 and plans["1"]["frozen_layers"] == 1
    assert plans["1"]["batch_size"] == plans["0"]["batch_size"] == 8
    assert plans["1"]["round_s"] <= 1.5


def test_metrics_carry_the_simulated_clock_and_its_straggler(fleet_run):
    rows = read_metrics(fleet_run)
    assert rows[0]["sim_s"] == 0.0
    assert all(row["sim_s"] > previous["sim_s"] for previous, row in itertools.pairwise(rows))
    assert all(row["sim_slowest_client"] == 1 for row in rows[1:])  # the slow device sets the pace
    summary = json.loads((fleet_run / "summary.json").read_text())
    assert summary["time_to_target_s"]["simulated"] == rows[0]["sim_s"]  # reached at round 0 (0.4)
    assert summary["sim_s"] == rows[-1]["sim_s"]


def test_fedavg_refuses_a_fleet_with_different_plans(
    tmp_path, tiny_model_dir, small_data_dir, fleet_profiles, capsys
):
    argv = ["run", "--model", str(tiny_model_dir), "--data", str(small_data_dir), "--clients", "2"]
    argv += ["--profiles", fleet_profiles, "--budget-s", "1.5", "--max-seq-len", "24", "--batch-size", "8"]
    argv += ["--local-steps", "3", "--rank", "4", "--out", str(tmp_path / "refused")]
    assert main(argv) == 2
    assert "--aggregator hetero" in capsys.readouterr().err


def test_grpc_fleet_gets_the_same_plans_and_metrics(
    fleet_run, tmp_path, tiny_model_dir, small_data_dir, fleet_profiles
):
    over_grpc = tiny_run(
        tmp_path, tiny_model_dir, small_data_dir, **fleet_flags(fleet_profiles), transport="grpc"
    )
    for ours, theirs in zip(read_metrics(over_grpc), read_metrics(fleet_run), strict=True):
        assert ours["bytes_up"] == theirs["bytes_up"] and ours["bytes_down"] == theirs["bytes_down"]
        assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-9)
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)


def test_early_exit_run_reports_accuracy_per_exit(tmp_path, tiny_model_dir, small_data_dir):
    run = tiny_run(tmp_path, tiny_model_dir, small_data_dir, method="ee-adapter", rounds=2)
    rows = read_metrics(run)
    assert all(len(row["exit_accuracy"]) == 2 for row in rows)
    assert rows[-1]["exit_accuracy"][-1] == rows[-1]["accuracy"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_exit_accuracy"] == rows[-1]["exit_accuracy"]
