"""One suite over both transports: clients in this process, and client processes over gRPC on loopback.

For the same seed the two must compute the same run: the same clients, the same bytes (both count
the gRPC messages of the same wire format) and the same metrics, up to float summation order
(client processes train with one thread each, the in-process clients with as many as torch takes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgefed.cli import main
from edgefed.components import data_settings, resolve_config, task_of
from edgefed.errors import EdgefedError
from edgefed.federation.checkpoint import load_checkpoint
from edgefed.transport.auth import TOKEN_ENV, TokenBook
from edgefed.transport.base import state_payload
from edgefed.transport.loopback import LoopbackFleet, write_shards
from edgefed.transport.servicer import RunDescription
from tests.tiny import tiny_bert_config
from tests.tolerance import assert_runs_agree, training_terms

TRANSPORTS = ["inproc", "grpc"]
EXACT_KEYS = ("round", "clients", "dropped", "bytes_up", "bytes_down", "accuracy")


def run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    flags = {
        "--model": model,
        "--data": data,
        "--clients": 2,
        "--rounds": 3,
        "--local-steps": 2,
        "--batch-size": 8,
        "--max-seq-len": 16,
        "--rank": 4,
        "--out": out,
    }
    return [item for flag, value in flags.items() for item in (flag, str(value))] + list(extra)


# The runs' chain of roundings: 3 rounds of 2 local steps (an aggregation counted as a third step) on
# the tiny BERT at 16 tokens and batches of 8, then an evaluation over 100 examples.
TERMS = training_terms(tiny_bert_config(), seq_len=16, batch_size=8, steps=3 * 3, eval_examples=100)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir).global_state


def assert_same_run(
    a: Path, b: Path, setup_resent_in: int | None = None, exact_keys: tuple[str, ...] = EXACT_KEYS
) -> None:
    """`setup_resent_in`: the round in which `b`'s restarted clients fetched the setup state again."""
    for row_a, row_b in zip(rows_of(a), rows_of(b), strict=True):
        keys = [k for k in exact_keys if not (k == "bytes_down" and row_a["round"] == setup_resent_in)]
        assert {k: row_a[k] for k in keys} == {k: row_b[k] for k in keys}
        for key in ("loss", "train_loss"):
            assert (row_a[key] is None) == (row_b[key] is None), key
            if row_a[key] is not None:  # equal in one process; rounding may differ in another
                assert_runs_agree(row_a[key], row_b[key], TERMS, f"round {row_a['round']} {key}")
    assert_runs_agree(final_state(a), final_state(b), TERMS, "final state")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, small_data_dir):
    """Each transport's run with the int8 codec (error feedback on the clients), made once."""
    made: dict[str, Path] = {}

    def get(transport: str) -> Path:
        if transport not in made:
            out = tmp_path_factory.mktemp("runs") / transport
            argv = ["run", *run_args(tiny_model_dir, small_data_dir, out, "--codec", "int8")]
            assert main([*argv, "--transport", transport]) == 0
            made[transport] = out
        return made[transport]

    return get


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_run_records_each_round_and_checkpoints_it(runs, transport):
    run_dir = runs(transport)
    rows = rows_of(run_dir)
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert all(row["clients"] == [0, 1] and row["dropped"] == [] for row in rows[1:])
    assert rows[1]["bytes_down"] > rows[2]["bytes_down"] > 0  # round 1 carries the setup
    assert 0 < rows[2]["bytes_up"] < 0.5 * rows[2]["bytes_down"]  # int8 deltas, fp32 state
    for row in rows[1:]:  # each client's own figures, which the critical-path clocks replay
        downs, ups = zip(*row["client_bytes"], strict=True)
        assert (sum(downs), sum(ups)) == (row["bytes_down"], row["bytes_up"])
        assert len(row["client_train_s"]) == 2 and min(row["client_train_s"]) > 0 and row["aggregate_s"] > 0
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.round == 3 and checkpoint.wall_s == rows[-1]["wall_s"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transport"] == transport and summary["final_accuracy"] == rows[-1]["accuracy"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Flower 1.42 needs Python 3.11 (edgefed[flower])")
def test_a_flower_simulation_computes_the_in_process_run(
    runs, tmp_path, tiny_model_dir, small_data_dir, capsys
):
    """Flower's Simulation Engine (Ray, one SuperNode per client, nodes' messages spread over its
    actors) gives the in-process run's clients, accuracy and losses, error feedback included; its bytes
    are Flower's records, counted apart."""
    out = tmp_path / "flower"
    argv = ["run", *run_args(tiny_model_dir, small_data_dir, out, "--codec", "int8"), "--transport", "flower"]
    pythonpath = os.environ.get("PYTHONPATH")
    assert main(argv) == 0
    # Flower's Ray backend sets PYTHONPATH for its workers; the run puts it back for later subprocesses.
    assert os.environ.get("PYTHONPATH") == pythonpath
    said = capsys.readouterr().out
    assert said.count("joined as client") == 2 and "dropped" not in said and "again" not in said
    assert_same_run(runs("inproc"), out, exact_keys=("round", "clients", "dropped", "accuracy"))
    assert all(row["bytes_up"] > 0 for row in rows_of(out)[1:])
    assert json.loads((out / "summary.json").read_text())["transport"] == "flower"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Flower 1.42 needs Python 3.11 (edgefed[flower])")
def test_flower_carries_the_exact_aggregator_too(tmp_path, tiny_model_dir, small_data_dir):
    """`product` needs every reply of a round at once: on Flower as in process."""
    outs = {}
    for transport in ("inproc", "flower"):
        outs[transport] = tmp_path / transport
        argv = run_args(tiny_model_dir, small_data_dir, outs[transport], "--aggregator", "product")
        assert main(["run", *argv, "--rounds", "2", "--transport", transport]) == 0
    assert_same_run(outs["inproc"], outs["flower"], exact_keys=("round", "clients", "dropped", "accuracy"))


def test_grpc_computes_the_in_process_run(runs):
    assert_same_run(runs("inproc"), runs("grpc"))
    logs = sorted((runs("grpc") / "clients").glob("*.log"))
    assert [log.name for log in logs] == ["client-0.log", "client-1.log"]
    assert all("the run is finished (3 rounds trained)" in log.read_text() for log in logs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_crashed_run_resumes_to_the_uninterrupted_result(
    runs, transport, tmp_path, tiny_model_dir, small_data_dir, monkeypatch, crash_after_round
):
    """The run dies right after round 2's checkpoint; `--resume` redoes round 3 only, and ends where the
    uninterrupted run ended (codec none: a restarted client process has no error-feedback residual).
    The uninterrupted run is the in-process one, which a gRPC run computes (test above)."""
    uninterrupted, resumed = tmp_path / "whole", tmp_path / "resumed"
    base = ["run", "--transport", transport]
    assert (
        main(["run", "--transport", "inproc", *run_args(tiny_model_dir, small_data_dir, uninterrupted)]) == 0
    )
    crash_after_round(2)
    assert main([*base, *run_args(tiny_model_dir, small_data_dir, resumed)]) == 130
    assert load_checkpoint(resumed).round == 2 and not (resumed / "summary.json").exists()
    monkeypatch.undo()
    assert main(["run", "--out", str(resumed), "--resume"]) == 0
    assert_same_run(uninterrupted, resumed, setup_resent_in=3)
    assert rows_of(resumed)[3]["bytes_down"] > rows_of(uninterrupted)[3]["bytes_down"]


@pytest.mark.parametrize(
    ("round_number", "saved"), [(0, False), (0, True), (2, False)], ids=["before-any", "after-0", "before-2"]
)
def test_a_run_killed_at_any_checkpoint_resumes_with_metrics_no_further_than_it(
    round_number, saved, tmp_path, tiny_model_dir, small_data_dir, monkeypatch, crash_after_round
):
    """Killed before its first checkpoint (round 0, the starting model), just after it, or just before
    round 2's: metrics.jsonl on disk never holds a round the checkpoint does not, and `--resume` ends
    where the uninterrupted run ends."""
    uninterrupted, resumed = tmp_path / "whole", tmp_path / "resumed"
    argv = ["run", "--transport", "inproc"]
    assert main([*argv, *run_args(tiny_model_dir, small_data_dir, uninterrupted)]) == 0
    crash_after_round(round_number, saved)
    assert main([*argv, *run_args(tiny_model_dir, small_data_dir, resumed)]) == 130
    kept = round_number if saved else round_number - 1
    on_disk = rows_of(resumed) if (resumed / "metrics.jsonl").exists() else []
    assert [row["round"] for row in on_disk] == list(range(len(on_disk)))
    if kept < 0:
        assert not (resumed / "checkpoint").exists() and not on_disk
    else:
        assert load_checkpoint(resumed).round == kept and len(on_disk) <= kept + 1
    monkeypatch.undo()
    assert main(["run", "--out", str(resumed), "--resume"]) == 0
    assert_same_run(uninterrupted, resumed, exact_keys=("round", "clients", "dropped", "accuracy"))


def task_shards(config) -> tuple:
    """The run's task and its clients' shards, as the server draws them."""
    task, settings = task_of(config), data_settings(config)
    return task, task.shards(task.load_data(settings)[0], settings)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_killed_server_resumes_and_its_clients_carry_on(tmp_path, tiny_model_dir, small_data_dir, runs):
    """`edgefed server` and two `edgefed client` processes; the server is killed with SIGKILL after
    round 2, restarted with --resume, and the run ends exactly as the uninterrupted one."""
    args = run_args(tiny_model_dir, small_data_dir, tmp_path / "served", "--codec", "int8")
    config = resolve_config(None, {"model": str(tiny_model_dir), "data": str(small_data_dir), "clients": 2})
    shards = write_shards(*task_shards(config), tmp_path)
    tokens = TokenBook.generate(["client-0", "client-1"])
    tokens.write(tmp_path / "tokens.txt")
    address = f"127.0.0.1:{free_port()}"
    server_args = [sys.executable, "-m", "edgefed", "server", "--address", address, *args]
    server_args += ["--tokens", str(tmp_path / "tokens.txt"), "--heartbeat-s", "0.5"]
    logs = {
        name: (tmp_path / f"{name}.log").open("wb") for name in ("server", "server2", "client-0", "client-1")
    }
    server = subprocess.Popen(server_args, stdout=logs["server"], stderr=subprocess.STDOUT)

    def client_command(name: str, shard: Path) -> list[str]:
        flags = {"--server": address, "--data": shard, "--name": name, "--threads": 1, "--retry-s": 60}
        flags["--model"] = tiny_model_dir  # the server names its model folder, never where it lies
        return [sys.executable, "-m", "edgefed", "client", *(str(x) for pair in flags.items() for x in pair)]

    clients = [
        subprocess.Popen(
            client_command(name, shard),
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            env={**os.environ, TOKEN_ENV: tokens.token_for(name)},
        )
        for name, shard in zip(("client-0", "client-1"), shards, strict=True)
    ]
    try:
        checkpoint = tmp_path / "served" / "checkpoint" / "meta.json"
        wait_for(
            lambda: checkpoint.is_file() and json.loads(checkpoint.read_text())["round"] >= 2, 120, "round 2"
        )
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = subprocess.Popen(
            [*server_args, "--resume"], stdout=logs["server2"], stderr=subprocess.STDOUT
        )
        assert server.wait(timeout=120) == 0, (tmp_path / "server2.log").read_text()
        for client in clients:
            assert client.wait(timeout=30) == 0
    finally:
        for process in (server, *clients):
            process.kill()
        for log in logs.values():
            log.close()
    assert "resuming run" in (tmp_path / "server2.log").read_text()
    assert_same_run(runs("inproc"), tmp_path / "served")


def test_a_client_process_that_dies_stops_the_run_with_its_reason(tmp_path, tiny_model_dir, small_data_dir):
    """Client processes that cannot build the run's model (here: the server names another model's
    fingerprint) exit after joining; the server's round ends with the client's own error line."""
    config = resolve_config(None, {"model": str(tiny_model_dir), "data": str(small_data_dir), "clients": 2})
    description = RunDescription("run-1", config, 2, ("classifier",), "0" * 64, state_payload({}))
    fleet = LoopbackFleet.start(
        description, *task_shards(config), None, torch.device("cpu"), tmp_path, {}, lambda line: None, None
    )
    try:
        with pytest.raises(EdgefedError, match=r"client-\d exited with status 2 .*differs from the server's"):
            fleet.fit_round(1, fleet.wait_for_clients(), {})
    finally:
        fleet.close()


FLOWER_APP = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgefed-fleet"
version = "1.0.0"
description = "An edgefed federation on Flower's Deployment Engine"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgefed"

[tool.flwr.app.components]
serverapp = "edgefed.flower.app:serverapp"
clientapp = "edgefed.flower.app:clientapp"

[tool.flwr.app.config]
{config}
"""


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Flower 1.42 needs Python 3.11 (edgefed[flower])")
def test_a_superlink_and_supernodes_over_tls_run_the_in_process_federation(
    runs, tmp_path, tiny_model_dir, small_data_dir
):
    """Flower's Deployment Engine on 127.0.0.1: a SuperLink serving TLS, one SuperNode per client with
    its own data file, and `flwr run` of a Flower app that names edgefed's apps; the run computes the
    in-process one (its clients' files are that run's shards)."""
    from tests.federation_harness import self_signed_certificate

    key, certificate = self_signed_certificate()
    (tmp_path / "server.key").write_bytes(key)
    (tmp_path / "server.pem").write_bytes(certificate)
    config = resolve_config(None, {"model": str(tiny_model_dir), "data": str(small_data_dir), "clients": 2})
    shards = write_shards(*task_shards(config), tmp_path)
    out, superlink = tmp_path / "deployed", f"127.0.0.1:{free_port()}"
    flags = run_args(tiny_model_dir, small_data_dir, out, "--codec", "int8")
    options = "\n".join(
        f"{flag[2:]} = {json.dumps(convert(value))}"
        for flag, value in zip(flags[::2], flags[1::2], strict=True)
    )
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text(FLOWER_APP.format(config=options))
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{superlink}"\n'
        f'root-certificates = "{tmp_path / "server.pem"}"\n'
    )
    bin_dir = Path(sys.executable).parent
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    tls = ["--ssl-certfile", "server.pem", "--ssl-keyfile", "server.key", "--ssl-ca-certfile", "server.pem"]
    port = superlink.rsplit(":", 1)[1]
    commands = [
        ["flower-superlink", *tls, "--port", port, "--disable-runtime-dependency-installation"]
    ] + [
        ["flower-supernode", "--root-certificates", "server.pem", "--superlink", superlink, "--port",
         str(free_port()), "--node-config", f"slot={slot} data='{shard}'"]
        for slot, shard in enumerate(shards)
    ]  # fmt: skip
    logs, processes = [], []
    try:
        for index, command in enumerate(commands):
            logs.append((tmp_path / f"flower-{index}.log").open("wb"))
            processes.append(
                subprocess.Popen(
                    [str(bin_dir / command[0]), *command[1:]],
                    cwd=tmp_path,
                    env=env,
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log_path, process = tmp_path / f"flower-{index}.log", processes[-1]
            wait_for(
                lambda p=log_path, q=process: (
                    b"Starting Flower SuperExec" in p.read_bytes() or q.poll() is not None
                ),
                60,
                command[0],
            )
            assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
        submitted = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "local", "--stream"],
            cwd=tmp_path / "app", env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert (out / "summary.json").is_file(), submitted.stdout[-3000:] + submitted.stderr[-3000:]
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for log in logs:
            log.close()
    assert_same_run(runs("inproc"), out, exact_keys=("round", "clients", "dropped", "accuracy"))
    assert json.loads((out / "summary.json").read_text())["transport"] == "flower"


def convert(value: str):
    """A flag's value as its TOML type (a Flower app config holds no strings for numbers)."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value
