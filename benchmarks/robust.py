"""What robust aggregation costs an honest fleet: the demo (FeDeRA on the shipped SST-2 sample, 4
clients under Dirichlet 0.5, 16 rounds, in process) with FedAvg, the coordinate-wise median and the
trimmed mean (edgefed/aggregators/robust.py), side by side in one run, same seed.

    python benchmarks/robust.py [--out benchmarks/results/robust.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from publish import publish

from edgefed.components import resolve_config
from edgefed.federation.runner import run

AGGREGATORS = ("fedavg", "median", "trimmed-mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    rows, finals = [], {}
    with tempfile.TemporaryDirectory(prefix="edgefed-robust-") as folder:
        for name in AGGREGATORS:
            config = resolve_config(None, {"aggregator": name, "out": str(Path(folder) / name)})
            summary = run(config, echo=lambda line: None)
            final = finals[name] = summary.final_accuracy
            rows.append(
                f"| {name} | {final:.4f} | {summary.best_accuracy:.4f} (round {summary.best_round}) "
                f"| {100 * (final - finals['fedavg']):+.2f} |"
            )
            print(f"ran the demo with aggregator {name}", file=sys.stderr)
    lines = [
        f"`python benchmarks/robust.py` on {platform.machine()} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}: the demo (`edgefed run`: FeDeRA, all-MiniLM-L6-v2, the shipped "
        "SST-2 sample, 4 clients, Dirichlet 0.5, 16 rounds of 5 local steps), honest clients only.",
        "",
        "| aggregator | final accuracy | best accuracy | final − fedavg (points) |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
