"""Trainable parameters, bytes per client per round, and local step time of each method on one model.

Every figure is measured in this one run, side by side: sizes are the adapted model's own tensor
bytes (benchmarks/comm.py measures what each codec and the wire format make of them), step times
on this machine's clock.

    python benchmarks/method_sizes.py [--model all-MiniLM-L6-v2] [--out benchmarks/results/method_sizes.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from edgefed.methods import METHODS, AdapterSpec, trainable_state
from edgefed.models import load_classifier, load_tokenizer, resolve_model_path

SENTENCE = "a gorgeous , witty , seductive movie that is also , at times , deeply and uncomfortably sad ."


def payload_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def step_times_ms(model: torch.nn.Module, batch: dict, steps: int = 5, warmup: int = 2) -> float:
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    encoded = tokenizer(
        [SENTENCE] * args.batch_size,
        padding="max_length",
        max_length=args.seq_len,
        truncation=True,
        return_tensors="pt",
    )
    batch = {**encoded, "labels": torch.arange(args.batch_size) % 2}
    spec = AdapterSpec(rank=args.rank, alpha=float(args.rank))
    rows = []
    for name in ("fft", "lora", "federa", "bitfit", "adapter"):
        torch.manual_seed(0)
        base, new_modules = load_classifier(path, 2)
        model, setup = METHODS.create(name).prepare_global(
            base, AdapterSpec(spec.rank, spec.alpha, head_modules=tuple(new_modules))
        )
        state = trainable_state(model)
        total = sum(param.numel() for param in model.parameters())
        trainable = sum(tensor.numel() for tensor in state.values())
        rows.append(
            (
                name,
                trainable,
                100 * trainable / total,
                payload_bytes(state),
                payload_bytes(setup),
                step_times_ms(model, batch),
            )
        )
        print(f"measured {name}", file=sys.stderr)

    fft_ms = rows[0][5]
    lines = [
        f"Model `{args.model}`, rank/bottleneck {args.rank}, α = r, fp32 tensors with the `none` codec; "
        f"local step = forward + backward + AdamW on a batch of {args.batch_size} × {args.seq_len} tokens, "
        f"median of 5 after 2 warm-up steps, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}.",
        "",
        "| method | trainable parameters | share | bytes up per client per round | bytes down per client "
        "per round | one-off setup bytes per client | local step (ms) | step vs fft |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, trainable, share, wire, setup_bytes, step_ms in rows:
        lines.append(
            f"| {name} | {trainable:,} | {share:.2f} % | {wire:,} ({wire / 1e6:.2f} MB) | {wire:,} "
            f"| {setup_bytes:,} | {step_ms:.0f} | {step_ms / fft_ms:.2f}× |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python benchmarks/method_sizes.py " + " ".join(sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Method sizes\n\nCommand: `{command}`\n\n{table}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
