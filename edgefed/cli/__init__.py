"""The `edgefed` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from edgefed import __version__
from edgefed.cli.bench import add_bench_options, bench_command
from edgefed.cli.client import add_client_options, client_command, read_bytes
from edgefed.cli.options import add_config_option, add_run_options, add_server_options, server_settings
from edgefed.errors import EdgefedError, one_line, report_errors


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage error stays one line whatever the arguments it quotes hold
    (`unrecognized arguments: ...` quotes them as they are); its subcommands' parsers are its kind."""

    def error(self, message: str) -> NoReturn:
        super().error(one_line(message))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        "--tls-client-ca",
        metavar="FILE",
        help="PEM certificate(s): mutual TLS, only clients with a certificate they signed may connect",
    )
    add_server_options(server)
    add_run_options(server, skip=("transport",))
    client = commands.add_parser(
        "client",
        help="join a federation served by `edgefed server` and train on local data",
        description="Join a federation and train on this device's data; the data never leaves it. Every "
        "setting can also come from the environment (EDGEFED_<NAME>) or a TOML file (--config), so that "
        "the client runs as a service (deploy/edgefed-client.service); SIGTERM stops it cleanly.",
        allow_abbrev=False,  # `--token SECRET` must fail, not pass for --token-file
    )
    add_client_options(client)
    profile = commands.add_parser(
        "profile",
        help="measure this machine and write its device profile",
        description="Measure this machine (cores and memory through psutil; timed forward and backward "
        "of reference layers; memory bandwidth; operator overhead; on a Jetson, the power mode from "
        "nvpmodel -q) and write a calibrated device profile.",
    )
    profile.add_argument("--out", metavar="FILE", help="write the profile here (default: print it)")
    profile.add_argument("--name", help="the profile's name (default measured-<host name>)")
    profile.add_argument("--quick", action="store_true", help="fewer, smaller measurements (seconds)")
    plan = commands.add_parser(
        "plan",
        help="print the plan a device profile gets: frozen layers, adapter layers, rank, exit, batch, length",
        description="Plan what a client on this device trains, with its predicted step time and peak memory, "
        "and say why. The run's settings are the request; the plan departs from them only where the "
        "device's memory or the time budget forces it.",
    )
    plan.add_argument("--profile", help="a shipped profile name or a profile file")
    plan.add_argument("--list", action="store_true", help="list the shipped profiles")
    for name in ("model", "method", "budget_s", "rank", "batch_size", "max_seq_len", "local_steps", "codec"):
        add_config_option(plan, name, with_default=True)
    plan.add_argument("--memory-gb", type=float, help="use at most this much memory (besides the profile's)")
    plan.add_argument("--num-labels", type=int, default=2, help="classes of the head (default 2)")
    bench = commands.add_parser(
        "bench",
        help="time to a target accuracy over a grid: methods × partitions × (profiles or fleets) × seeds",
        description="Run a grid of federated runs, each to a target accuracy or its round cap, and write "
        "results.csv, table.md and plots of accuracy against time (critical path: this machine's "
        "training, and the SIMULATED device clock) and of bytes to target. Resumable: run it again "
        "to continue a killed grid.",
    )
    add_bench_options(bench)
    predict = commands.add_parser(
        "predict",
        help="answer texts with a trained run, within a latency budget on a device (anytime inference)",
        description="Classify texts (one per line, from --input or stdin) with a finished run. With "
        "--profile and --latency-ms, an early-exit run (ee-adapter) answers from the deepest exit whose "
        "predicted latency on that device fits; --confidence stops at the first exit that sure. "
        "Latencies are the cost model's (SIMULATED). Prints label, probability, exit and latency.",
    )
    predict.add_argument("--run", required=True, metavar="DIR", help="a finished run's folder")
    predict.add_argument("--profile", help="the device that answers (a shipped profile or a file)")
    predict.add_argument("--latency-ms", type=float, help="the latency budget per text, on --profile")
    predict.add_argument("--confidence", type=float, help="stop at the first exit this sure (0-1)")
    predict.add_argument("--input", metavar="FILE", help="texts, one per line (default: stdin)")
    export = commands.add_parser(
        "export",
        help="write a finished run's model as an ONNX file that ONNX Runtime serves",
        description="Export a finished run's model for inference with ONNX Runtime (which, unlike "
        "training, has wheels for Linux on ARM). The file is kept only if ONNX Runtime's logits on the "
        "run's own texts match torch's; an early-exit run has one output per exit.",
    )
    export.add_argument("--onnx", required=True, metavar="RUN", help="a finished run's folder")
    export.add_argument("--out", metavar="FILE", help="where to write it (default RUN/model.onnx)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None)
    if command is None:
        parser.print_help()
        return 0
    return report_errors(lambda: COMMANDS[command](args))


def run_command(args: dict[str, Any]) -> int:
    from edgefed.federation.runner import run

    resume = args.pop("resume", False)
    config = run_config(args, resume)
    if config.transport == "flower":
        try:
            from edgefed.flower.app import simulate
        except ImportError as error:
            raise EdgefedError(
                f"--transport flower needs Flower ({error}): pip install 'edgefed[flower]' (Python 3.11+)"
            ) from None
        simulate(config, resume=resume)
    else:
        run(config, resume=resume)
    return 0


def run_config(args: dict[str, Any], resume: bool):
    """Flags over --config; a resumed run without --config reads its own config.toml."""
    from edgefed.components import resolve_config

    config_file = args.pop("config", None)
    if resume and config_file is None and "out" in args:
        config_file = str(Path(args["out"]) / "config.toml")
    return resolve_config(config_file, args)


def server_command(args: dict[str, Any]) -> int:
    from edgefed.federation.runner import serve
    from edgefed.transport.auth import TokenBook
    from edgefed.wire.channels import ServerTls, check_address

    address, tokens = args.pop("address"), args.pop("tokens", None)
    check_address(address)
    cert, key, client_ca = (args.pop(name, None) for name in ("tls_cert", "tls_key", "tls_client_ca"))
    settings, resume = server_settings(args), args.pop("resume", False)
    if (cert is None) != (key is None):
        raise EdgefedError("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise EdgefedError("--tls-client-ca needs the server's own --tls-cert and --tls-key")
    tls = None
    if cert is not None:
        tls = ServerTls(read_bytes(key), read_bytes(cert), read_bytes(client_ca) if client_ca else None)
    serve(
        run_config(args, resume),
        address,
        tokens=TokenBook.read(tokens) if tokens else None,
        tls=tls,
        resume=resume,
        settings=settings,
    )
    return 0


def profile_command(args: dict[str, Any]) -> int:
    from edgefed.devices.calibrate import measure_machine, profile_header, write_profile
    from edgefed.devices.profiles import profile_toml

    profile = measure_machine(
        args["name"], quick=args["quick"], echo=lambda line: print(line, file=sys.stderr)
    )
    if args["out"]:
        path = write_profile(profile, args["out"])
        print(f"edgefed: wrote {path}; use it with `edgefed plan --profile {path}`", file=sys.stderr)
    else:
        print(profile_toml(profile, profile_header(profile)), end="")
    return 0


def plan_command(args: dict[str, Any]) -> int:
    from edgefed.codecs import bytes_per_value
    from edgefed.devices.fleet import adapt_and_measure
    from edgefed.devices.planner import Request, format_plan, plan_for
    from edgefed.devices.profiles import load_profile, profile_names
    from edgefed.methods import METHODS
    from edgefed.models import load_classifier, resolve_model_path
    from edgefed.types import AdapterSpec

    if args["list"]:
        for name in profile_names():
            profile = load_profile(name)
            print(f"{name:<28} {profile.description}")
        return 0
    if not args["profile"]:
        raise EdgefedError("--profile NAME_OR_FILE is required (or --list)")
    profile = load_profile(args["profile"])
    for key in ("rank", "batch_size", "max_seq_len", "local_steps", "num_labels"):
        if args[key] <= 0:
            raise EdgefedError(f"--{key.replace('_', '-')} must be positive")
    method = METHODS.create(args["method"])
    base, new_modules = load_classifier(resolve_model_path(args["model"]), args["num_labels"])
    spec = AdapterSpec(rank=args["rank"], alpha=float(args["rank"]), head_modules=tuple(new_modules))
    _, _, shape = adapt_and_measure(method, base, spec)
    request = Request(
        rank=args["rank"],
        batch_size=args["batch_size"],
        seq_len=args["max_seq_len"],
        local_steps=args["local_steps"],
        bytes_per_sent_value=bytes_per_value(args["codec"]),
        budget_s=args["budget_s"],
        memory_gb=args["memory_gb"],
    )
    plan = plan_for(shape, profile, request, method.early_exits)
    print(format_plan(plan, shape, args["model"], args["method"]))
    return 0


def predict_command(args: dict[str, Any]) -> int:
    from edgefed.anytime import AnytimePredictor

    predictor = AnytimePredictor(args["run"], args["profile"], args["latency_ms"], args["confidence"])
    if predictor.profile is not None:
        latencies = ", ".join(f"{k}: {ms:.2f}" for k, ms in predictor.latencies_ms.items())
        print(
            f"edgefed predict: answering from exit {predictor.depth} on {predictor.profile.name}; predicted "
            f"latency per exit, ms (SIMULATED, {predictor.seq_len} tokens): {latencies}",
            file=sys.stderr,
        )
    texts = read_lines(args["input"])
    for prediction in predictor.predict(texts):
        latency = "" if prediction.latency_ms is None else f"\t{prediction.latency_ms:.2f} ms SIMULATED"
        print(f"{prediction.name}\t{prediction.probability:.3f}\texit {prediction.exit_layer}{latency}")
    return 0


def export_command(args: dict[str, Any]) -> int:
    from edgefed.components import data_settings, resolve_config, task_of
    from edgefed.models import load_tokenizer, resolve_model_path
    from edgefed.setup import load_trained

    try:
        import onnxruntime  # noqa: F401

        from edgefed.ort.export import export_onnx
    except ImportError as error:
        raise EdgefedError(
            f"export --onnx needs onnx and onnxruntime ({error}): pip install 'edgefed[onnx,ort]' (where "
            "onnxruntime-training has no wheel: 'edgefed[onnx]' onnxruntime)"
        ) from None
    run_dir = Path(args["onnx"])
    model = load_trained(run_dir)
    config = resolve_config(str(run_dir / "config.toml"), {})
    evaluation = task_of(config).load_data(data_settings(config))[1]
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    sample = dict(
        tokenizer(
            list(evaluation.texts[:8]), truncation=True, max_length=config.max_seq_len, padding=True,
            return_tensors="pt", return_token_type_ids=True,
        )
    )  # fmt: skip
    export_onnx(model, sample, Path(args["out"]) if args["out"] else run_dir / "model.onnx")
    return 0


def read_lines(path: str | None):
    """Non-empty lines of a file or stdin, without their line ends."""
    try:
        handle = open(path, encoding="utf-8") if path else sys.stdin  # noqa: SIM115 - closed below
    except OSError as error:
        raise EdgefedError(f"{path}: {error.strerror}") from None
    try:
        for line in handle:
            if line.strip():
                yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise EdgefedError(f"{path or 'stdin'}: not UTF-8 text") from None
    finally:
        if path:
            handle.close()


COMMANDS = {
    "run": run_command,
    "bench": bench_command,
    "server": server_command,
    "client": client_command,
    "profile": profile_command,
    "plan": plan_command,
    "predict": predict_command,
    "export": export_command,
}
