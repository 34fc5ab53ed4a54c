"""Plans for MiniLM on every shipped device profile, and the peak-memory prediction checked against RSS.

    python benchmarks/plans.py --out benchmarks/results/plans.md

Part 1 prints the plan each profile gets for the demo's FeDeRA run (rank 8, batch 16, length 64,
5 local steps) with and without a per-round budget. Part 2 runs local steps of real training in fresh
processes (edgefed/devices/peakmem.py) and compares the measured peak memory with the cost model's prediction.
"""

from __future__ import annotations

import argparse
import sys

import torch

from edgefed.devices.costmodel import Workload
from edgefed.devices.fleet import adapt_and_measure
from edgefed.devices.peakmem import measure_peak_memory
from edgefed.devices.planner import Request, plan_for
from edgefed.devices.profiles import load_profile, profile_names
from edgefed.methods import METHODS, AdapterSpec
from edgefed.models import load_classifier, resolve_model_path

MEMORY_CASES = [
    ("federa", Workload(0, 6, 8, 16, 64)),
    ("federa", Workload(0, 6, 8, 32, 128)),
    ("federa", Workload(3, 6, 8, 32, 128)),
    ("lora", Workload(0, 6, 8, 8, 256)),
    ("adapter", Workload(0, 6, 8, 16, 128)),
    ("bitfit", Workload(2, 6, 8, 16, 128)),
    ("fft", Workload(0, 6, 8, 16, 64)),
    ("fft", Workload(0, 6, 8, 32, 128)),
]


def plan_rows(model: str, budget_s: float | None) -> list[str]:
    torch.manual_seed(0)
    base, new_modules = load_classifier(resolve_model_path(model), 2)
    spec = AdapterSpec(rank=8, alpha=8.0, head_modules=tuple(new_modules))
    _, _, shape = adapt_and_measure(METHODS.create("federa"), base, spec)
    request = Request(rank=8, batch_size=16, seq_len=64, local_steps=5, budget_s=budget_s)
    rows = [
        "| profile | frozen layers | adapter layers | rank | batch | length | step s | round s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in profile_names():
        plan = plan_for(shape, load_profile(name), request, early_exits=False)
        frozen = f"0-{plan.frozen_layers - 1}" if plan.frozen_layers else "none"
        rows.append(
            f"| {name} | {frozen} | {plan.frozen_layers}-{plan.exit_layer - 1} | {plan.rank} | "
            f"{plan.batch_size} | {plan.seq_len} | {plan.step_s:.4f} | {plan.round_s:.2f} | "
            f"{plan.peak_gb:.2f} |"
        )
    return rows


def memory_rows(model: str) -> list[str]:
    rows = [
        "| method | frozen | batch × length | measured MB | predicted MB | error |",
        "|---|---|---|---|---|---|",
    ]
    for method, work in MEMORY_CASES:
        peak = measure_peak_memory(model, method, work.rank, work)
        rows.append(
            f"| {method} | {work.frozen_layers} | {work.batch_size} × {work.seq_len} | "
            f"{peak.measured_bytes / 1e6:.0f} | {peak.predicted_bytes / 1e6:.0f} | "
            f"{100 * peak.error:+.1f} % |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--budget-s", type=float, default=2.0, help="the budgeted table's per-round budget")
    parser.add_argument("--out", help="write the Markdown here as well")
    args = parser.parse_args()
    lines = [
        f"# Device plans and peak memory: {args.model}",
        "",
        f"Command: `python benchmarks/plans.py --budget-s {args.budget_s:g}"
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        "## Plans for FeDeRA (rank 8, batch 16, length 64, 5 local steps), no budget",
        "",
        "Predicted by the cost model (edgefed/devices/costmodel.py) from each profile's figures, "
        "not measured on the devices.",
        "",
        *plan_rows(args.model, None),
        "",
        f"## The same with a budget of {args.budget_s:g} s per round (local steps and transfers)",
        "",
        *plan_rows(args.model, args.budget_s),
        "",
        "## Peak training memory: predicted against measured (this machine, CPU, fresh process each)",
        "",
        "Measured: peak RSS (psutil, sampled every ms) over two local steps of the real trainer on",
        "full-length random token ids, above the RSS before the model was built. Predicted: the cost",
        "model for a CPU (activations × 1.8 for glibc's retained heap),",
        "the framework's own footprint excluded.",
        "",
        *memory_rows(args.model),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
