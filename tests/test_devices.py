"""Fleets of device profiles end to end: per-client plans, hetero aggregation, the simulated clock, exits."""

import itertools
import json
import subprocess
import sys

import pytest

from edgefed.cli import main
from edgefed.components import resolve_config
from edgefed.transport.loopback import write_shards
from tests.test_run import TINY_RUN_TERMS, read_metrics, tiny_run
from tests.test_transport import free_port, task_shards, wait_for
from tests.tolerance import assert_runs_agree


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
        assert ours["accuracy"] == theirs["accuracy"]  # the same decisions: a count, not a float
        assert_runs_agree(ours["loss"], theirs["loss"], TINY_RUN_TERMS, f"round {ours['round']} loss")


def test_early_exit_run_reports_accuracy_per_exit(tmp_path, tiny_model_dir, small_data_dir):
    run = tiny_run(tmp_path, tiny_model_dir, small_data_dir, method="ee-adapter", rounds=2)
    rows = read_metrics(run)
    assert all(len(row["exit_accuracy"]) == 2 for row in rows)
    assert rows[-1]["exit_accuracy"][-1] == rows[-1]["accuracy"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_exit_accuracy"] == rows[-1]["exit_accuracy"]


def test_a_served_fleet_puts_each_announced_device_in_its_slot_and_sends_its_plan(
    fleet_run, tmp_path, tiny_model_dir, small_data_dir, fleet_profiles
):
    """`edgefed server --profiles fast,slow,fast` and one `edgefed client --profile` process per device,
    the slow device joining first: it gets the fleet's slow slot, its plan arrives in the Join reply, and
    the run's metrics are the in-process fleet's."""
    fast, slow = fleet_profiles.split(",")
    config = resolve_config(None, {"model": str(tiny_model_dir), "data": str(small_data_dir), "clients": 3})
    shards = write_shards(*task_shards(config), tmp_path)
    address = f"127.0.0.1:{free_port()}"
    flags = {
        "model": tiny_model_dir, "data": small_data_dir, "clients": 3, "rounds": 3, "local_steps": 3,
        "batch_size": 8, "max_seq_len": 24, "rank": 4, "lr": 0.01, "out": tmp_path / "served",
        **fleet_flags(fleet_profiles),
    }  # fmt: skip
    argv = [sys.executable, "-m", "edgefed", "server", "--address", address]
    argv += [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    server_log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(argv, stdout=server_log, stderr=subprocess.STDOUT)
    clients = []
    try:
        for joined, (name, profile, shard) in enumerate(
            [("client-1", slow, shards[1]), ("client-0", fast, shards[0]), ("client-2", fast, shards[2])],
            start=1,
        ):
            client = [sys.executable, "-m", "edgefed", "client", "--server", address, "--data", str(shard)]
            client += ["--model", str(tiny_model_dir)]
            client += ["--name", name, "--profile", profile, "--threads", "1", "--retry-s", "60"]
            log = (tmp_path / f"{name}.log").open("wb")
            clients.append((subprocess.Popen(client, stdout=log, stderr=subprocess.STDOUT), log))
            # One at a time, so that each shard is the in-process client's of the slot it gets.
            wait_for(
                lambda n=joined: (tmp_path / "server.log").read_text().count("joined as") >= n, 120, name
            )
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()
        for client, _ in clients:
            assert client.wait(timeout=30) == 0
    finally:
        for process in [server, *(client for client, _ in clients)]:
            process.kill()
        for log in [server_log, *(log for _, log in clients)]:
            log.close()
    served_log = (tmp_path / "server.log").read_text()
    # Named as the in-process clients (the names travel in every message, so the bytes match), the slow
    # device joins first and still gets the fleet's slow slot.
    assert "client-1 joined as client 1, profile" in served_log
    assert "client-0 joined as client 0, profile" in served_log
    assert "plan for slow-device: layers 1-1 train" in (tmp_path / "client-1.log").read_text()
    for ours, theirs in zip(read_metrics(tmp_path / "served"), read_metrics(fleet_run), strict=True):
        assert ours["bytes_up"] == theirs["bytes_up"] and ours["bytes_down"] == theirs["bytes_down"]
        assert ours["accuracy"] == theirs["accuracy"]  # the same decisions: a count, not a float
        assert ours["sim_s"] == theirs["sim_s"]

    def plans_of(run):  # recorded when the clients joined: round 0 in process, round 1 when served
        return {slot: plan for row in read_metrics(run) for slot, plan in (row.get("plans") or {}).items()}

    assert plans_of(tmp_path / "served") == plans_of(fleet_run) and len(plans_of(fleet_run)) == 3
