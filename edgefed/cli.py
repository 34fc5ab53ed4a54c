"""The `edgefed` command line."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from edgefed import __version__
from edgefed.errors import EdgefedError
from edgefed.transport.auth import TOKEN_ENV


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefed",
        description="Federated fine-tuning of pre-trained transformer language models across edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgefed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a federation from this command (no arguments: the FeDeRA demo on the shipped SST-2 sample)",
        description="Run a federated fine-tuning. Every option can also be set in a TOML file (--config) "
        "under the same name without the dashes; flags override the file, the file overrides the preset.",
        argument_default=argparse.SUPPRESS,
    )
    add_run_options(run)
    run.add_argument(
        "--transport",
        help="inproc (default: clients in this process) or grpc (a server and one client process per "
        "client on 127.0.0.1, same metrics for the same seed)",
    )
    server = commands.add_parser(
        "server",
        help="serve a federation to `edgefed client`s over gRPC",
        description="Serve a federated fine-tuning to clients on other processes or devices. The run's "
        "options are those of `edgefed run` (the server evaluates on the data's evaluation split).",
        argument_default=argparse.SUPPRESS,
    )
    server.add_argument("--address", required=True, help="HOST:PORT to listen on, e.g. 0.0.0.0:50051")
    server.add_argument(
        "--tokens", metavar="FILE", help="one `client-id token` pair per line; only they may join"
    )
    server.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve over TLS")
    server.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    server.add_argument(
        "--heartbeat-s", type=float, help="client heartbeat interval; 3 missed = dropped (default 1)"
    )
    add_run_options(server)
    client = commands.add_parser(
        "client",
        help="join a federation served by `edgefed server` and train on local data",
        description="Join a federation and train on this device's data; the data never leaves it.",
    )
    client.add_argument("--server", required=True, help="HOST:PORT of the edgefed server")
    client.add_argument(
        "--data", required=True, metavar="PATH", help="TSV/CSV/JSONL file, or a folder with train.*"
    )
    client.add_argument(
        "--name", default=socket.gethostname(), help="client id, stable across restarts (default: host name)"
    )
    client.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    client.add_argument("--profile", default="", help="device profile name, reported to the server")
    client.add_argument("--model", metavar="PATH", help="pre-trained model (default: the one the run names)")
    client.add_argument("--tls-ca", metavar="FILE", help="PEM certificate(s) to trust: connect over TLS")
    client.add_argument("--threads", type=int, help="CPU threads for training (default: torch's)")
    client.add_argument(
        "--retry-s", type=float, default=120.0, help="how long to retry an unreachable server (default 120)"
    )
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML file with the same keys as these flags")
    add("--preset", help="demo (default) or smoke (a small slice, two short rounds)")
    add("--method", help="fft, lora, federa (default), bitfit or adapter")
    add("--aggregator", help="fedavg (default: A and B averaged apart) or product (exact, in ΔW = B·A space)")
    add("--codec", help="how client deltas travel: none (default), fp16, bf16, int8, int4 or topk:<fraction>")
    add("--clients", type=int, help="number of clients (default 4)")
    add("--rounds", type=int, help="federated rounds (default 16)")
    add("--local-steps", type=int, help="local optimizer steps per client per round (default 5)")
    add("--local-epochs", type=float, help="local passes over the client's data per round, instead of steps")
    add("--sample-fraction", type=float, help="share of clients sampled each round (default 1.0)")
    add("--partition", help="iid or dirichlet:<alpha> label skew (default dirichlet:0.5)")
    add(
        "--data",
        metavar="PATH",
        help="TSV/CSV/JSONL file, or a folder with train.* and dev.* (default: SST-2 sample)",
    )
    add("--model", metavar="PATH_OR_NAME", help="local model folder or all-MiniLM-L6-v2 (default)")
    add("--target-modules", help="comma-separated module names that LoRA/FeDeRA adapt (default query,value)")
    add("--rank", type=int, help="LoRA/FeDeRA rank, adapter bottleneck width (default 8)")
    add("--alpha", type=float, help="LoRA/FeDeRA alpha; scale = alpha / rank (default 8)")
    add("--lr", type=float, help="learning rate (default: the method's own)")
    add("--batch-size", type=int, help="local batch size (default 16)")
    add("--max-seq-len", type=int, help="tokens per example after truncation (default 64)")
    add("--train-limit", type=int, help="use only the first N training examples")
    add("--eval-limit", type=int, help="evaluate on the first N evaluation examples")
    add(
        "--target-accuracy",
        type=float,
        help="report rounds and time to this accuracy (a fraction, e.g. 0.85)",
    )
    add(
        "--fused-kernels",
        action=argparse.BooleanOptionalAction,
        help="LoRA/FeDeRA layers run edgefed's fused Triton kernel on CUDA (default on; off for comparison)",
    )
    add(
        "--min-clients",
        type=int,
        help="connected clients a round needs, and updates it counts (default: all)",
    )
    add(
        "--round-deadline-s", type=float, help="a sampled client that has not pushed by then is dropped (600)"
    )
    add(
        "--max-update-norm",
        type=float,
        help="refuse client updates with a larger L2 norm (default: no bound)",
    )
    add("--chunk-bytes", type=int, help="largest slice of a state in one gRPC message (default 1 MiB)")
    add("--seed", type=int, help="seed for partitioning, sampling, initialisation and batches (default 0)")
    add("--out", metavar="DIR", help="run directory (default runs/<method>-<time>)")
    add("--resume", action="store_true", help="continue the run in --out from its last completed round")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None)
    if command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[command](args)
    except EdgefedError as error:
        print(f"edgefed: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgefed: interrupted", file=sys.stderr)
        return 130


def run_command(args: dict[str, Any]) -> int:
    from edgefed.recipe import run

    resume = args.pop("resume", False)
    run(run_config(args, resume), resume=resume)
    return 0


def run_config(args: dict[str, Any], resume: bool):
    """Flags over --config; a resumed run without --config reads its own config.toml."""
    from edgefed.config import resolve_config

    config_file = args.pop("config", None)
    if resume and config_file is None and "out" in args:
        config_file = str(Path(args["out"]) / "config.toml")
    return resolve_config(config_file, args)


def server_command(args: dict[str, Any]) -> int:
    from edgefed.recipe import serve
    from edgefed.transport.auth import TokenBook

    address, tokens = args.pop("address"), args.pop("tokens", None)
    cert, key = args.pop("tls_cert", None), args.pop("tls_key", None)
    heartbeat_s, resume = args.pop("heartbeat_s", 1.0), args.pop("resume", False)
    if (cert is None) != (key is None):
        raise EdgefedError("--tls-cert and --tls-key go together")
    serve(
        run_config(args, resume),
        address,
        tokens=TokenBook.read(tokens) if tokens else None,
        tls=(read_bytes(key), read_bytes(cert)) if cert else None,
        resume=resume,
        heartbeat_s=heartbeat_s,
    )
    return 0


def client_command(args: dict[str, Any]) -> int:
    import torch

    from edgefed.transport.grpc_client import GrpcClient

    if args["threads"] is not None:
        torch.set_num_threads(args["threads"])
    client = GrpcClient(
        args["server"],
        args["data"],
        args["name"],
        token=args["token"] or os.environ.get(TOKEN_ENV),
        profile=args["profile"],
        model=args["model"],
        tls_ca=read_bytes(args["tls_ca"]) if args["tls_ca"] else None,
        retry_s=args["retry_s"],
    )
    client.run()
    return 0


def read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise EdgefedError(f"{path}: {error.strerror}") from None


COMMANDS = {"run": run_command, "server": server_command, "client": client_command}
