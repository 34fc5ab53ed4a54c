"""Why `ee-adapter`'s exits learn (or do not): its design choices measured side by side.

Each variant is one federated run of `ee-adapter` (in-process, the same seed, data, partition and
budget), differing only in what the adapters read from each block (`pooling`: the first token's state,
or the mean of the tokens' states that all-MiniLM-L6-v2 was trained to produce), the exits' loss
(`distillation`: ReeFL's self-distillation from the batch's best exit, weight 0 = off; `balanced`:
balanced softmax against label skew), whether the adapters modulate the backbone (`modulation`) and
the learning rate; `federa` on the same budget is
the reference for the last exit. Prints each exit's final accuracy.

    python benchmarks/early_exits.py --partitions iid,dirichlet:0.5 > benchmarks/results/early_exits.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

from edgefed.components import resolve_config
from edgefed.federation.recorder import read_metrics
from edgefed.federation.runner import run
from edgefed.methods.ee_adapter import EarlyExitModel
from edgefed.types import RoundMetrics

VARIANTS = {  # name: (EarlyExitModel class attributes, learning rate; None: the method's default)
    "first token + modulation (before)": ({"pooling": "first", "modulation": True}, None),
    "first token + modulation + distillation": (
        {"pooling": "first", "modulation": True, "distillation": 1.0},
        None,
    ),
    "mean pooling + modulation": ({"modulation": True}, None),
    "mean pooling + modulation + distillation": ({"modulation": True, "distillation": 1.0}, None),
    "mean pooling + modulation + lr 5e-3": ({"modulation": True}, 5e-3),
    "mean pooling + modulation + lr 1e-3": ({"modulation": True}, 1e-3),
    "mean pooling": ({}, None),
    "mean pooling + distillation": ({"distillation": 1.0}, None),
    "mean pooling + balanced softmax": ({"balanced": True}, None),
    "mean pooling + balanced softmax + ensembled answers (the default now)": (
        {"balanced": True, "ensemble": True},
        None,
    ),
    "mean pooling + balanced softmax + depth-weighted loss": (
        {"balanced": True, "depth_weighted": True},
        None,
    ),
}
# What every variant changes: mean pooling, no modulation, plain cross-entropy, each exit's own answer
# (EarlyExitModel's defaults differ from it in `balanced` and `ensemble`).
BASELINE = {
    "pooling": "mean",
    "distillation": 0.0,
    "modulation": False,
    "balanced": False,
    "depth_weighted": False,
    "ensemble": False,
}


def final_metrics(flags: dict, out: Path) -> RoundMetrics:
    config = resolve_config(None, dict(flags, out=str(out)))
    with contextlib.redirect_stdout(io.StringIO()):
        run(config, echo=lambda line: None)
    return read_metrics(out / "metrics.jsonl")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", default="iid,dirichlet:0.5")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--data", default=None, help="default: the SST-2 sample shipped in the package")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--no-reference", action="store_true", help="skip the federa reference runs")
    args = parser.parse_args()
    base = dict(rounds=args.rounds, local_steps=args.local_steps, train_limit=args.train_limit, seed=0)
    if args.data:
        base["data"] = args.data
    print(
        f"# Early-exit variants: `ee-adapter`, {args.rounds} rounds × {args.local_steps} local steps, "
        f"{args.train_limit} training examples, 4 clients, seed 0\n"
    )
    print("| partition | variant | " + " | ".join(f"exit {i + 1}" for i in range(6)) + " |")
    print("|---|---|" + "---|" * 6)
    with tempfile.TemporaryDirectory() as work:
        for partition in args.partitions.split(","):
            flags = dict(base, partition=partition)
            if not args.no_reference:
                reference = final_metrics(dict(flags, method="federa"), Path(work) / f"federa-{partition}")
                accuracy = reference.accuracy
                print(f"| {partition} | federa (reference) | " + " | " * 5 + f"{accuracy:.3f} |", flush=True)
            for name in args.variants.split(","):
                attributes, lr = VARIANTS[name]
                for attribute, value in {**BASELINE, **attributes}.items():
                    setattr(EarlyExitModel, attribute, value)
                out = Path(work) / f"{name}-{partition}".replace(" ", "_")
                metrics = final_metrics(dict(flags, method="ee-adapter", lr=lr), out)
                cells = " | ".join(f"{value:.3f}" for value in metrics.exit_accuracy)
                print(f"| {partition} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
