"""Fused LoRA linear and fused aggregation against peft, the frozen Linear and a naive loop, side by side.

    python benchmarks/kernel_timing.py [--grid full|quick] [--out benchmarks/results/kernels_<device>.md]

Per shape it times forward + backward of (a) peft's LoRA Linear, (b) edgefed's `lora_linear`
(fused Triton on CUDA, the torch path on CPU) and (c) the frozen `nn.Linear` alone — the floor — and
prints the ratios, the achieved TFLOP/s and GB/s (compulsory traffic: every input read once, the output
written once, over the measured time) against this device's peaks, measured in the same run (a large matmul; a
large device-to-device copy). Then the aggregation reduction Σ_k w_k·dequant(q_k) over int8 deltas:
fused `weighted_sum` against dequantising each client and adding, in GB/s of compulsory traffic.
The default grid is the full one on CUDA and a quick one on CPU (the full one takes hours there).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from edgefed.kernels import dequantize_blockwise, lora_linear, quantize_blockwise, weighted_sum

FULL_GRID = [(t, d, r) for t in (512, 4096, 16384) for d in (384, 768, 1024, 4096) for r in (4, 8, 16, 64)]
QUICK_GRID = [(512, 384, 8), (512, 768, 8), (2048, 768, 8), (2048, 768, 64)]


def timer(device: torch.device):
    def measure(fn, repeats: int) -> float:
        """Median seconds of `fn` after two warm-up calls."""
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)

    return measure


def peaks(device, dtype, measure) -> tuple[float, float]:
    """(matmul TFLOP/s, copy GB/s) measured on this device."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / measure(functools.partial(torch.matmul, a, b), 5) / 1e12
    source = torch.empty(
        256 * 2**20 if device.type == "cuda" else 32 * 2**20, dtype=torch.uint8, device=device
    )
    target = torch.empty_like(source)
    copy = 2 * source.numel() / measure(functools.partial(target.copy_, source), 10) / 1e9
    return flops, copy


class Projection(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def forward_backward(fn, x: torch.Tensor, grad: torch.Tensor) -> None:
    fn(x).backward(grad)


def dequantise_then_add(q: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The unfused baseline: one dequantised temporary per client, then an axpy."""
    total = torch.zeros(q.shape[1] * (1 if q.dtype == torch.int8 else 2), device=q.device)
    for k in range(q.shape[0]):
        total += weights[k] * dequantize_blockwise(q[k], scales[k])
    return total


def lora_rows(grid, device, dtype, measure, peak_tflops, peak_gbs):
    element = torch.finfo(dtype).bits // 8
    rows = []
    for tokens, d, rank in grid:
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d, device=device, dtype=dtype)
        peft_model = get_peft_model(
            Projection(d), LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"])
        )
        peft_model.to(device=device)
        peft_model.base_model.model.proj.base_layer.to(dtype)  # peft keeps its adapters in fp32, as users get
        layer = peft_model.base_model.model.proj
        weight, bias = layer.base_layer.weight, layer.base_layer.bias
        a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
        b = torch.randn_like(layer.lora_B["default"].weight).mul_(0.01).requires_grad_()
        frozen = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)

        fused = functools.partial(lora_linear, weight=weight, lora_A=a, lora_B=b, scale=1.0, bias=bias)
        repeats = 20 if device.type == "cuda" else 3
        t_peft, t_fused, t_frozen = (
            measure(functools.partial(forward_backward, fn, x, grad), repeats)
            for fn in (peft_model, fused, frozen)
        )
        flops = 4 * tokens * d * d + 6 * tokens * rank * 2 * d
        floor_bytes = element * (2 * tokens * d + d * d + tokens * rank) + element * (3 * tokens * d + d * d)
        rows.append(
            f"| {tokens} | {d} | {rank} | {1e3 * t_peft:.3f} | {1e3 * t_fused:.3f} | {1e3 * t_frozen:.3f} "
            f"| {t_peft / t_fused:.2f}× | {t_fused / t_frozen:.2f}× | {flops / t_fused / 1e12:.2f} "
            f"({100 * flops / t_fused / 1e12 / peak_tflops:.0f} %) | {floor_bytes / t_fused / 1e9:.1f} "
            f"({100 * floor_bytes / t_fused / 1e9 / peak_gbs:.0f} %) |"
        )
        print(rows[-1], file=sys.stderr)
    return rows


def reduction_rows(device, measure, peak_gbs):
    rows = []
    sizes = [(16, 2**20), (100, 2**20)] if device.type == "cuda" else [(16, 2**18)]
    for clients, numel in sizes:
        encoded = [
            quantize_blockwise(torch.randn(numel, device=device), bits=8, block=64) for _ in range(clients)
        ]
        q, scales = torch.stack([e[0] for e in encoded]), torch.stack([e[1] for e in encoded])
        weights = torch.full((clients,), 1 / clients, device=device)

        t_fused = measure(functools.partial(weighted_sum, q, weights, scales), 10)
        t_naive = measure(functools.partial(dequantise_then_add, q, scales, weights), 10)
        traffic = q.numel() + 4 * scales.numel() + 4 * numel
        rows.append(
            f"| {clients} | {numel:,} | int8, block 64 | {1e3 * t_naive:.3f} | {1e3 * t_fused:.3f} "
            f"| {t_naive / t_fused:.1f}× | {traffic / t_fused / 1e9:.1f} "
            f"({100 * traffic / t_fused / 1e9 / peak_gbs:.0f} %) |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("full", "quick"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = (
        FULL_GRID if (args.grid or ("full" if device.type == "cuda" else "quick")) == "full" else QUICK_GRID
    )
    measure = timer(device)
    torch.manual_seed(0)
    peak_tflops, peak_gbs = peaks(device, dtype, measure)
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    path = "fused Triton kernels" if device.type == "cuda" else "the torch path (no Triton on CPU)"
    lines = [
        f"Device: {name}; {dtype}; torch {torch.__version__}; edgefed runs {path}.",
        f"Measured peaks: matmul {peak_tflops:.2f} TFLOP/s, device copy {peak_gbs:.1f} GB/s.",
        "",
        "Forward + backward (dx, dA, dB; W frozen), median ms:",
        "",
        "| tokens | d | r | peft | edgefed | frozen Linear | peft / edgefed | edgefed / frozen "
        "| edgefed TFLOP/s (of peak) | edgefed GB/s of floor traffic (of copy) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *lora_rows(grid, device, dtype, measure, peak_tflops, peak_gbs),
        "",
        "Aggregation Σ_k w_k·dequant(q_k), median ms:",
        "",
        "| clients | parameters | format | dequantise-then-add | weighted_sum | speed-up "
        "| weighted_sum GB/s (of copy) |",
        "|---:|---:|---|---:|---:|---:|---:|",
        *reduction_rows(device, measure, peak_gbs),
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/kernel_timing.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Kernel benchmark\n\nCommand: `{command}`\n\n{table}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
