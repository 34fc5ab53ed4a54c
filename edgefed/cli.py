"""The `edgefed` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgefed import __version__
from edgefed.errors import EdgefedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefed",
        description="Federated fine-tuning of pre-trained transformer language models across edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgefed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a federation in this process (no arguments: the FeDeRA demo on the shipped SST-2 sample)",
        description="Run a federated fine-tuning. Every option can also be set in a TOML file (--config) "
        "under the same name without the dashes; flags override the file, the file overrides the preset.",
        argument_default=argparse.SUPPRESS,
    )
    add = run.add_argument
    add("--config", metavar="FILE", help="TOML file with the same keys as these flags")
    add("--preset", help="demo (default) or smoke (a small slice, two short rounds)")
    add("--method", help="fft, lora, federa (default), bitfit or adapter")
    add("--aggregator", help="fedavg (default: A and B averaged apart) or product (exact, in ΔW = B·A space)")
    add("--codec", help="how client deltas travel: none (default), fp16, int8, int4 or topk:<fraction>")
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
    add("--seed", type=int, help="seed for partitioning, sampling, initialisation and batches (default 0)")
    add("--out", metavar="DIR", help="run directory (default runs/<method>-<time>)")
    return parser


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
    from edgefed.config import resolve_config
    from edgefed.recipe import run

    config_file = args.pop("config", None)
    run(resolve_config(config_file, args))
    return 0


COMMANDS = {"run": run_command}
