"""Many simulated clients of all-MiniLM-L6-v2 on this machine: the same federation on Flower's
Simulation Engine (Ray) at two fleet sizes, and on edgefed's in-process transport, side by side.

Each run is `edgefed run` in a process of its own; a sampler adds up the resident memory of that
process and every process it starts (Ray's GCS, raylet and actors) twice a second and keeps the
peak. Memory that grows with the adapter and the client's data, not with the model, per client is
what the two Flower fleet sizes show: (peak at N₂ − peak at N₁) / (N₂ − N₁).

    python benchmarks/flower_scale.py [--clients 50,200] [--out benchmarks/results/flower_scale.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from publish import publish

from edgefed.federation.recorder import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
MB = 1 << 20


def peak_tree_rss(process: subprocess.Popen, every_s: float = 0.5) -> list[int]:
    """Samples the resident memory of `process` and its descendants until it exits; [peak] when done."""
    peak = [0]

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(resident(member) for member in tree))
            except psutil.Error:
                return
            time.sleep(every_s)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def resident(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:  # it ended between the listing and the reading
        return 0


def one_run(transport: str, clients: int, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"{transport}-{clients}"
    command = [
        sys.executable, "-m", "edgefed", "run", "--transport", transport, "--clients", str(clients),
        "--data", str(SST2), "--partition", "iid", "--rounds", str(args.rounds),
        "--sample-fraction", str(args.per_round / clients), "--local-steps", str(args.local_steps),
        "--eval-limit", "300", "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    with (folder / f"{transport}-{clients}.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = peak_tree_rss(process)
        if process.wait() != 0:
            raise RuntimeError(f"{transport} with {clients} clients failed: see {log.name}")
    total_s = time.perf_counter() - started
    rows = read_metrics(out / "metrics.jsonl")
    rounds = [row for row in rows if row.round > 0]
    print(f"measured {transport} with {clients} clients", file=sys.stderr)
    return {
        "transport": transport,
        "clients": clients,
        "peak_mb": peak[0] / MB,
        "round_s": sum(row.round_s for row in rounds) / len(rounds),
        "total_s": total_s,
        "accuracy": rows[-1].accuracy,
        "bytes_up": sum(row.bytes_up for row in rounds) / len(rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="50,200", help="Flower fleet sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled each round")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    sizes = [int(size) for size in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgefed-flower-scale-") as folder:
        results = [one_run("flower", size, args, Path(folder)) for size in sizes]
        results.append(one_run("inproc", sizes[-1], args, Path(folder)))
    rows = [
        f"| {r['transport']} | {r['clients']} | {r['peak_mb']:,.0f} | {r['round_s']:.1f} | "
        f"{r['total_s']:.0f} | {r['accuracy']:.4f} |"
        for r in results
    ]
    small, large = results[0], results[len(sizes) - 1]
    per_client = (large["peak_mb"] - small["peak_mb"]) / max(1, large["clients"] - small["clients"])
    command = " ".join(["python", "benchmarks/flower_scale.py", *sys.argv[1:]])
    publish(
        [
            f"`{command}` on {platform.machine()} ({os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB): FeDeRA on all-MiniLM-L6-v2, SST-2 (IID), "
            f"{args.per_round} clients sampled a round, {args.local_steps} local steps, {args.rounds} "
            "rounds, evaluation on 300 dev sentences. Peak RSS: the run's process and every process it "
            "started.",
            "",
            "| transport | clients | peak RSS MB | s per round | total s | final accuracy |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Flower's peak grows by {per_client:.2f} MB per simulated client between {small['clients']} and "
            f"{large['clients']} clients.",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
