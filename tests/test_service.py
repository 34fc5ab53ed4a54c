"""`edgefed client` as a service: settings from the environment and a file, the token from a file, a
server tried forever, SIGTERM, and the systemd unit that ships in deploy/."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgefed.cli.client import SETTINGS, client_settings
from edgefed.components import resolve_config
from edgefed.errors import EdgefedError
from edgefed.transport.grpc_client import GrpcClient, Stopped
from edgefed.transport.loopback import write_shards
from tests.test_transport import free_port, task_shards, wait_for

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef0123456789abcdef"


def secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_a_setting_comes_from_the_flag_then_the_environment_then_the_file(tmp_path):
    config = tmp_path / "client.toml"
    config.write_text('server = "file:1"\ndata = "file.tsv"\nname = "from-file"\nretry-s = "forever"\n')
    env = {"EDGEFED_CONFIG": str(config), "EDGEFED_NAME": "from-env", "EDGEFED_THREADS": "3"}
    settings = client_settings({"server": "flag:1"}, env)
    assert settings["server"] == "flag:1"  # flag over environment and file
    assert settings["name"] == "from-env" and settings["threads"] == 3  # environment over file
    assert settings["data"] == "file.tsv" and math.isinf(settings["retry_s"])  # the file
    assert settings["profile"] == "" and settings["token"] is None  # defaults


def test_the_token_comes_from_its_file_or_the_environment_never_a_flag(tmp_path, capsys):
    token_file = secret(tmp_path / "token", TOKEN)
    base = {"server": "s:1", "data": "d.tsv"}
    assert client_settings({**base, "token_file": str(token_file)}, {})["token"] == TOKEN
    assert client_settings(base, {"EDGEFED_TOKEN": "from-env-0123456789"})["token"] == "from-env-0123456789"
    token_file.chmod(0o644)
    client_settings({**base, "token_file": str(token_file)}, {})
    assert "readable by other users" in capsys.readouterr().out
    from edgefed.cli import build_parser

    with pytest.raises(SystemExit):  # there is no --token flag to leak the token into `ps`
        build_parser().parse_args(["client", "--server", "s:1", "--data", "d", "--token", TOKEN])


@pytest.mark.parametrize(
    ("file_text", "env", "expected"),
    [
        ("", {}, "the client needs --server (or $EDGEFED_SERVER"),
        ('token = "abc"\n', {}, "put the token in a file of its own"),
        ('servr = "x"\n', {}, "unknown setting 'servr'"),
        ('server = "s:1"\ndata = "d"\nthreads = "many"\n', {}, "threads: invalid literal"),
        (
            'server = "s:1"\ndata = "d"\n',
            {"EDGEFED_RETRY_S": "-4"},
            "$EDGEFED_RETRY_S: retry-s must be positive",
        ),
        ('server = "s:1"\ndata = "d"\ntoken-file = "/no/such/token"\n', {}, "token file /no/such/token"),
        ("server = [", {}, "invalid TOML"),
    ],
)
def test_bad_client_settings_get_one_clear_error(tmp_path, file_text, env, expected):
    config = tmp_path / "client.toml"
    config.write_text(file_text)
    with pytest.raises(EdgefedError, match=None) as error:
        client_settings({"config": str(config)}, env)
    assert expected in str(error.value)


def test_stop_finishes_a_push_on_the_wire_and_abandons_anything_else():
    client = GrpcClient.__new__(GrpcClient)  # only its stop logic, no server
    client.pushing, client.stopping = None, None
    with pytest.raises(Stopped):
        client.stop("SIGTERM")  # training, fetching or waiting: abandoned at once
    client.pushing, client.stopping = 3, None
    client.stop("SIGTERM")  # round 3's update is on the wire: it is finished first
    assert client.stopping == "SIGTERM"


def test_the_env_file_names_only_client_settings():
    variables = {setting.variable for setting in SETTINGS}
    lines = (ROOT / "deploy" / "client.env").read_text().splitlines()
    named = [line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")]
    assert named and set(named) <= variables


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """The shipped unit, with ExecStart pointing at this environment's edgefed (verify checks that the
    program exists); verify prints a warning for any directive or value it does not accept."""
    unit = (ROOT / "deploy" / "edgefed-client.service").read_text()
    assert "ExecStart=/opt/edgefed/venv/bin/edgefed client\n" in unit
    edgefed = Path(sys.executable).parent / "edgefed"
    installed = tmp_path / "edgefed-client.service"
    installed.write_text(unit.replace("/opt/edgefed/venv/bin/edgefed", str(edgefed)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr


def test_a_service_client_waits_for_its_server_trains_and_stops_on_sigterm(
    tmp_path, tiny_model_dir, small_data_dir
):
    """The client starts first, configured by the environment and a file alone (its token in a file):
    it tries the absent server with backoff until the server comes up, trains, and on SIGTERM exits 0
    with a line that says so. Its command line never holds the token."""
    config = resolve_config(None, {"model": str(tiny_model_dir), "data": str(small_data_dir), "clients": 1})
    shard = write_shards(*task_shards(config), tmp_path)[0]
    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "client.toml").write_text(
        f'data = "{shard}"\nmodel = "{tiny_model_dir}"\nthreads = 1\nretry-s = "forever"\n'
    )
    env = {
        **os.environ,
        "EDGEFED_CONFIG": str(tmp_path / "client.toml"),
        "EDGEFED_SERVER": address,
        "EDGEFED_NAME": "client-0",
        "EDGEFED_TOKEN_FILE": str(secret(tmp_path / "token", TOKEN)),
    }
    env.pop("EDGEFED_TOKEN", None)
    client_log = (tmp_path / "client.log").open("wb")
    client = subprocess.Popen(
        [sys.executable, "-m", "edgefed", "client"], stdout=client_log, stderr=subprocess.STDOUT, env=env
    )
    server = None
    try:
        wait_for(lambda: "trying again with backoff forever" in read(tmp_path / "client.log"), 60, "retries")
        assert TOKEN not in Path(f"/proc/{client.pid}/cmdline").read_bytes().decode(errors="replace")
        (tmp_path / "tokens.txt").write_text(f"client-0 {TOKEN}\n")
        flags = {
            "model": tiny_model_dir, "data": small_data_dir, "clients": 1, "rounds": 50, "local_steps": 2,
            "batch_size": 8, "max_seq_len": 24, "rank": 4, "out": tmp_path / "run",
            "tokens": tmp_path / "tokens.txt",
        }  # fmt: skip
        argv = [sys.executable, "-m", "edgefed", "server", "--address", address]
        argv += [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: "round 2:" in read(tmp_path / "client.log"), 180, "two trained rounds")
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=60) == 0, read(tmp_path / "client.log")
    finally:
        for process in (client, server):
            if process is not None:
                process.kill()
        client_log.close()
    log = read(tmp_path / "client.log")
    assert "answers again" in log and "is client 0 of run" in log
    assert "stopped by SIGTERM" in log.splitlines()[-1]
    assert "Traceback" not in log


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
