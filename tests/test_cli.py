"""The command line as a user meets it: bad input exits non-zero with one clear line, never a traceback.

Most cases call the command line's `main` in this process (what a user sees on stderr, captured at the
file descriptor); the first ones start `python -m edgefed` itself, so that nothing the imports print
escapes the check.
"""

import subprocess
import sys
from typing import NamedTuple

import pytest

from edgefed.cli import main


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def edgefed(*args):
    done = subprocess.run(
        [sys.executable, "-m", "edgefed", *args], capture_output=True, text=True, timeout=300
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def edgefed_here(capfd, monkeypatch, tmp_path):
    """`edgefed ARGS` in this process, run in tmp_path."""
    monkeypatch.chdir(tmp_path)

    def call(*args) -> Result:
        capfd.readouterr()
        code = main(list(args))
        out, err = capfd.readouterr()
        return Result(code, out, err)

    return call


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("case", "content", "expected"),
    [
        ("missing_column", "sentence\tscore\nfine\t1\n", "missing_column.tsv:1: no 'label' column"),
        (
            "bad_label",
            "sentence\tlabel\nfine\t1\nawful\tbad\n",
            "bad_label.tsv:3: label 'bad' is not an integer",
        ),
        ("empty", "", "empty.tsv: the file is empty"),
    ],
)
def test_bad_data_files(tmp_path, tiny_model_dir, case, content, expected, edgefed_here):
    data = write(tmp_path / f"{case}.tsv", content)
    run = edgefed if case == "missing_column" else edgefed_here  # one of them as its own process
    result = run("run", "--data", data, "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"))
    assert_one_clear_line(result, expected)
    assert not (tmp_path / "run").exists(), "bad input must not leave a run directory behind"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--method", "qlora"],
            "unknown method 'qlora'; choose one of: adapter, bitfit, ee-adapter, fdapt, fedbert, federa, "
            "ffdapt, fft, lora",
        ),
        (["--model", "/no/such/model"], "model '/no/such/model' is not a local folder, a packaged model"),
        (["--data", "/no/such/data.tsv"], "/no/such/data.tsv: no such data file or folder"),
        (["--partition", "dirichlet"], "partition 'dirichlet': dirichlet needs a positive alpha"),
        (["--config", "/no/such.toml"], "/no/such.toml: no such config file"),
        (
            ["--max-seq-len", "1024", "--preset", "smoke"],
            "max-seq-len 1024 exceeds the model's 512 positions",
        ),
    ],
)
def test_bad_options(tmp_path, args, expected, edgefed_here):
    assert_one_clear_line(edgefed_here("run", "--out", str(tmp_path / "run"), *args), expected)


def assert_one_clear_line(result, expected):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgefed: error: ")
    assert expected in lines[0]


def test_help_and_version():
    assert "run" in edgefed("--help").stdout
    assert edgefed("--version").stdout.startswith("edgefed ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["server", "--address", "127.0.0.1:0", "--tls-cert", "cert.pem"],
            "--tls-cert and --tls-key go together",
        ),
        (
            ["server", "--address", "127.0.0.1:0", "--tokens", "tokens.txt"],
            "tokens.txt:2: expected `client-id token`",
        ),
        (["server", "--address", "127.0.0.1:0", "--resume"], "--resume needs --out DIR"),
        (
            ["server", "--address", "127.0.0.1:0", "--resume", "--out", "nothing"],
            "nothing/config.toml: no such config",
        ),
        (
            ["run", "--transport", "carrier-pigeon"],
            "unknown transport 'carrier-pigeon'; choose one of: inproc, grpc",
        ),
        (["run", "--clients", "2", "--min-clients", "3"], "min-clients 3 exceeds clients 2"),
        (
            ["run", "--transport", "flower", "--method", "fedbert"],
            "fedbert trains its body over edgefed's Split service",
        ),
        (
            ["server", "--address", "127.0.0.1:0", "--tls-client-ca", "ca.pem"],
            "--tls-client-ca needs the server's own --tls-cert and --tls-key",
        ),
        (
            [
                "client",
                "--server",
                "127.0.0.1:9",
                "--data",
                "d.tsv",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
            ],
            "--tls-cert needs --tls-ca",
        ),
        (
            ["client", "--server", "127.0.0.1:9", "--data", "d.tsv", "--retry-s", "0.5"],
            "server 127.0.0.1:9 unreachable or busy for 0.5 s",
        ),
    ],
)
def test_bad_federation_options(tmp_path, args, expected, edgefed_here):
    write(tmp_path / "tokens.txt", "client-0 0123456789abcdef0123\nclient-1 short\n")
    assert_one_clear_line(edgefed_here(*args), expected)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--address", "127.0.0.1"], "address '127.0.0.1': expected HOST:PORT"),
        (["--address", "127.0.0.1:99999"], "with a port from 0 to 65535"),
        (["--address", "127.0.0.1:0", "--heartbeat-s", "nan"], "heartbeat-s must be positive, got nan"),
        (["--address", "127.0.0.1:0", "--heartbeat-s", "0"], "heartbeat-s must be positive"),
        (["--address", "127.0.0.1:0", "--heartbeat-s", "-1"], "heartbeat-s must be positive"),
        (["--address", "127.0.0.1:0", "--stream-idle-s", "0"], "stream-idle-s must be positive"),
        (["--address", "127.0.0.1:0", "--stream-idle-s", "0.01"], "stream-idle-s must be at least 1"),
        (["--address", "127.0.0.1:0", "--split-port", "70000"], "split-port must be a port"),
        (["--address", "0.0.0.0:0", "--data", "nowhere"], "0.0.0.0:0 without --tokens would let anyone"),
    ],
)
def test_bad_server_settings_are_one_line(flags, expected, edgefed_here, tmp_path):
    """Each refused before anything listens: no spinning watcher, no server on :443 or a wrapped port."""
    result = edgefed_here("server", *flags, "--out", str(tmp_path / "run"))
    assert_one_clear_line(result, expected)
    assert not (tmp_path / "run").exists()


def test_a_token_file_others_can_read_gets_a_warning(tmp_path, capsys):
    from edgefed.transport.auth import TokenBook

    path = tmp_path / "tokens"
    TokenBook.generate(["client-0"]).write(path)
    TokenBook.read(path)
    assert "readable by other users" not in capsys.readouterr().err
    path.chmod(0o644)
    TokenBook.read(path)
    assert "edgefed: warning: " in capsys.readouterr().err
