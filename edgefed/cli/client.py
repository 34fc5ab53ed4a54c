"""`edgefed client`: its settings from flags, the environment and a file, so that it runs as a service.

Each setting is looked up, first found wins, in: the flag (`--retry-s 30`), the environment
(`EDGEFED_RETRY_S=30`), the file named by `--config` or `$EDGEFED_CONFIG` (TOML, `retry-s = 30`),
the default. The bearer token is never a flag, where `ps` would show it: it comes from `token-file`
(a file holding only the token) or `$EDGEFED_TOKEN`.

SIGTERM (`systemctl stop`) ends the client cleanly, with exit status 0: a push on the wire is finished
first; local training, a fetch or a wait is abandoned (the server drops the client and runs its round
without it).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefed.errors import EdgefedError
from edgefed.runtimes import RUNTIMES
from edgefed.toml_io import parse_toml
from edgefed.transport.auth import TOKEN_ENV
from edgefed.wire.channels import check_address

ENV_PREFIX = "EDGEFED_"
CONFIG_ENV = "EDGEFED_CONFIG"


# More CPU threads than any device has: beyond it a typo (torch refuses 0 and overflows past 2**31).
MAX_THREADS = 1024


def retry_seconds(text: str) -> float:
    """Seconds, or `forever` (a service: try an unreachable server until it comes back)."""
    if str(text).strip().lower() in ("forever", "inf"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither seconds nor 'forever'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"retry-s must be positive, got {text}")
    return value


def runtime_name(text: str) -> str:
    names = RUNTIMES.device_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown runtime '{text}'; choose from: {', '.join(names)}")
    return text


def thread_count(text: str) -> int:
    """CPU threads: from 1 to MAX_THREADS."""
    value = int(text)  # a ValueError names the text
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"threads must be from 1 to {MAX_THREADS}, got {value}")
    return value


def server_address(text: str) -> str:
    """HOST:PORT, checked as the server checks its own (a name gRPC cannot encode is no traceback)."""
    try:
        check_address(text)
    except EdgefedError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


@dataclass(frozen=True)
class Setting:
    name: str  # the flag without its dashes, the file's key; the variable is EDGEFED_<NAME>
    help: str
    default: Any = None
    kind: Callable[[str], Any] = str
    metavar: str | None = None
    required: bool = False

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


SETTINGS = (
    Setting(
        "server", "HOST:PORT of the edgefed server", kind=server_address, metavar="HOST:PORT", required=True
    ),
    Setting(
        "data",
        "TSV/CSV/JSONL file (pre-training: also .txt, one document per line), or a folder with train.* "
        "(a few-shot multi-task run: labels.txt, train.* and unlabeled.txt)",
        metavar="PATH",
        required=True,
    ),
    Setting(
        "name", "client id, stable across restarts (default: this host's name)", default=socket.gethostname()
    ),
    Setting(
        "token-file",
        f"file holding the bearer token and nothing else (without it: ${TOKEN_ENV})",
        metavar="FILE",
    ),
    Setting(
        "profile",
        "this device's profile (a name from `edgefed plan --list` or a file from `edgefed profile`); the "
        "server plans what this client trains from it",
        default="",
    ),
    Setting("model", "pre-trained model (default: the one the run names)", metavar="PATH"),
    Setting("tls-ca", "PEM certificate(s) to trust: connect over TLS", metavar="FILE"),
    Setting("tls-cert", "PEM certificate of this client (mutual TLS)", metavar="FILE"),
    Setting("tls-key", "PEM private key of tls-cert", metavar="FILE"),
    Setting("threads", "CPU threads for training (default: the runtime's)", kind=thread_count),
    Setting(
        "runtime",
        "what trains on this device: torch, or ort (ONNX Runtime training artifacts the server makes; "
        "neither torch nor transformers needed: pip install 'edgefed[ort]')",
        default="torch",
        kind=runtime_name,
    ),
    Setting(
        "retry-s",
        "how long to retry an unreachable or busy server, or 'forever' (default 120)",
        default=120.0,
        kind=retry_seconds,
    ),
)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help=f"TOML file with these settings by name (or set ${CONFIG_ENV})"
    )
    for setting in SETTINGS:
        parser.add_argument(
            f"--{setting.name}",
            dest=setting.key,
            type=setting.kind,
            metavar=setting.metavar,
            default=argparse.SUPPRESS,
            help=f"{setting.help}; ${setting.variable}",
        )


def client_settings(flags: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Every setting, from the flags, then the environment, then the config file, then the default."""
    config_path = flags.get("config") or environ.get(CONFIG_ENV)
    from_file = read_client_config(config_path) if config_path else {}
    settings = {}
    for setting in SETTINGS:
        if setting.key in flags:
            value = flags[setting.key]
        elif environ.get(setting.variable, "") != "":
            value = convert(setting, environ[setting.variable], f"${setting.variable}")
        elif setting.name in from_file:
            value = convert(setting, from_file[setting.name], f"{config_path}: {setting.name}")
        elif setting.required:
            raise EdgefedError(
                f"the client needs --{setting.name} (or ${setting.variable}, or {setting.name} = ... in "
                "its --config file)"
            )
        else:
            value = setting.default
        settings[setting.key] = value
    token_file = settings["token_file"]
    settings["token"] = read_token(token_file) if token_file else environ.get(TOKEN_ENV) or None
    return settings


def read_client_config(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or a NUL in the path
        raise EdgefedError(f"{path}: {getattr(error, 'strerror', None) or 'not UTF-8 text'}") from None
    values = parse_toml(text, path)
    if "token" in values:
        raise EdgefedError(f"{path}: put the token in a file of its own and name it with token-file")
    known = {setting.name for setting in SETTINGS}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise EdgefedError(f"{path}: unknown setting '{unknown[0]}'; the settings are {names}")
    return values


def convert(setting: Setting, value: Any, origin: str) -> Any:
    if isinstance(value, bool | dict | list):
        raise EdgefedError(f"{origin}: expected {setting.kind.__name__}, got {value!r}")
    try:
        return setting.kind(str(value))
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise EdgefedError(f"{origin}: {error}") from None


def read_token(path: str) -> str:
    """The token in `path` (surrounding whitespace stripped); a warning when others may read it."""
    try:
        mode = os.stat(path).st_mode
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or a NUL in the path
        raise EdgefedError(f"token file {path}: {getattr(error, 'strerror', None) or 'not UTF-8'}") from None
    if not token or any(character.isspace() for character in token):
        raise EdgefedError(f"token file {path}: must hold one token and nothing else")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"edgefed: warning: token file {path} is readable by other users (chmod 600 it)")
    return token


def read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise EdgefedError(f"{path}: {error.strerror}") from None
    except ValueError:  # a NUL in the path
        raise EdgefedError(f"{path}: no such file") from None


def client_command(args: dict[str, Any]) -> int:
    from edgefed.transport.grpc_client import GrpcClient
    from edgefed.wire.channels import ClientTls

    settings = client_settings(args, dict(os.environ))
    if (settings["tls_cert"] is None) != (settings["tls_key"] is None):
        raise EdgefedError("--tls-cert and --tls-key go together")
    if settings["tls_cert"] is not None and settings["tls_ca"] is None:
        raise EdgefedError("--tls-cert needs --tls-ca, the certificate(s) of the server to trust")
    tls = None
    if settings["tls_ca"] is not None:
        identity = (
            (read_bytes(settings["tls_key"]), read_bytes(settings["tls_cert"]))
            if settings["tls_cert"]
            else (None, None)
        )
        tls = ClientTls(read_bytes(settings["tls_ca"]), *identity)
    client = GrpcClient(
        settings["server"],
        settings["data"],
        settings["name"],
        token=settings["token"],
        profile=settings["profile"],
        model=settings["model"],
        tls=tls,
        retry_s=settings["retry_s"],
        runtime=settings["runtime"],
        threads=settings["threads"],
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: client.stop("SIGTERM"))
    client.run()
    return 0
