"""`edgefed profile`: measure the machine this runs on and describe it as a `DeviceProfile`.

Shipped profiles carry datasheet peaks and guessed efficiencies (device_profiles/README.md); a measured
profile instead carries what this machine reaches with this torch build and thread count, so both
efficiencies are 1.0 and the cost model's t = max(FLOPs / F, bytes / BW) + t_launch uses the measured
figures as is.

    compute   timed forward + backward of nn.Linear(d, 4d) and nn.Linear(4d, d) on T tokens, FP32, the
              best FLOP/s over the sizes (fp32_tflops); on CUDA also a half-precision GEMM (fp16_tflops)
    memory    y = x + 1 over a tensor well beyond the last-level cache, read + write bytes (bandwidth_gbs);
              total and usable memory from psutil (host) or the CUDA device; the framework's own footprint
    launch    a 16-element torch.add, per call (launch_us)
    link      not measurable without a peer: stated defaults, to be edited
    power     on a Jetson, the power mode (`nvpmodel -q`), and its budget in watts when the mode's name
              states it (MODE_30W); elsewhere none (energy per round is then measured or not reported)

Every timing is the minimum over repetitions after a warm-up: the minimum is the least disturbed run,
which matters on shared machines. Nothing here assumes temperature or battery sensors or cgroup files.
"""

from __future__ import annotations

import datetime
import platform
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from edgefed.devices.power import power_mode
from edgefed.devices.profiles import GB, DeviceProfile, profile_toml
from edgefed.errors import EdgefedError
from edgefed.models import default_device

# The link needs a peer to measure; these defaults match the shipped profiles' Wi-Fi/LTE-class edge link.
DEFAULT_UPLINK_MBPS = 50.0
DEFAULT_DOWNLINK_MBPS = 100.0
DEFAULT_LATENCY_MS = 20.0

# (d, tokens): reference layers are Linear(d, 4d) and Linear(4d, d), a transformer MLP's two GEMMs.
GEMM_SIZES = ((256, 2048), (512, 2048), (1024, 2048))
GEMM_SIZES_QUICK = ((128, 512), (256, 512))
# Streaming tensor: far beyond any CPU's last-level cache (and a GPU's L2), so it measures DRAM.
STREAM_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}
STREAM_BYTES_QUICK = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}
HALF_GEMM_N = 8192
HALF_GEMM_N_QUICK = 2048
# Share of a discrete GPU's memory kept back from training (allocator fragmentation, cuBLAS workspaces).
CUDA_RESERVE = 0.05

NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def measure_machine(
    name: str | None = None,
    device: torch.device | str | None = None,
    quick: bool = False,
    echo: Callable[[str], Any] = print,
) -> DeviceProfile:
    """Measure this machine (or the given CUDA device) and return it as a calibrated DeviceProfile.

    `quick` uses fewer and smaller measurements (seconds instead of tens of seconds, lower figures on
    big machines); `echo` receives one progress line per measurement.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type not in ("cpu", "cuda"):
        raise EdgefedError(f"edgefed profile measures a cpu or cuda device, not '{device}'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EdgefedError("no CUDA device is available; measure the cpu instead")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    profile_name = check_name(name) if name is not None else default_name()
    sync = cuda_sync(device)
    now = datetime.datetime.now(datetime.timezone.utc).astimezone()
    threads = torch.get_num_threads()
    process = psutil.Process()
    host_total = psutil.virtual_memory().total
    host_available = psutil.virtual_memory().available
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    logical = psutil.cpu_count() or physical
    cpu = cpu_model()
    echo(
        f"host: {cpu}, {physical} physical / {logical} logical cores, torch {torch.__version__} "
        f"with {threads} threads, {host_total / GB:.1f} GB RAM ({host_available / GB:.1f} GB available)"
    )

    # Warm-up first: the first GEMM, backward and element-wise op load BLAS / oneDNN / cuBLAS and start
    # autograd's threads; that (and no big tensor yet) is the framework's own footprint.
    warm_up(device, sync)
    rss = process.memory_info().rss
    calibration: dict[str, Any] = {
        "measured_on": now.isoformat(timespec="seconds"),
        "tool": "edgefed profile",
        "torch": torch.__version__,
        "device": str(device),
        "threads": threads,
        "quick": quick,
        "physical_cores": physical,
        "logical_cores": logical,
        "host_total_gb": round(host_total / GB, 3),
        "host_available_gb": round(host_available / GB, 3),
        "process_rss_gb": round(rss / GB, 3),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        integrated = bool(getattr(props, "is_integrated", False))
        free, device_total = torch.cuda.mem_get_info(device)
        # CUDA context and library handles: device memory in use that torch's allocator does not hold
        # (on a GPU shared with other processes this includes theirs).
        context = max(0, device_total - free - torch.cuda.memory_reserved(device))
        if integrated:
            # Jetson-style unified memory: the GPU allocates from the host's RAM, so the host figures apply.
            total, usable = host_memory(host_total, host_available)
            runtime = rss + context
            usable_note = "usable_gb = host memory available when measured (the GPU shares it)"
        else:
            total = device_total
            usable = int(total * (1 - CUDA_RESERVE))
            runtime = context
            usable_note = f"usable_gb = GPU memory minus a {CUDA_RESERVE:.0%} reserve"
        calibration["cuda_context_gb"] = round(context / GB, 3)
        calibration["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        hardware = f"{props.name} ({total / GB:.1f} GB) on {cpu}"
        echo(
            f"gpu: {props.name}, {device_total / GB:.1f} GB ({free / GB:.1f} GB free), "
            f"{'integrated' if integrated else 'discrete'}, runtime footprint {runtime / GB:.2f} GB"
        )
    else:
        total, usable = host_memory(host_total, host_available)
        runtime = rss
        usable_note = "usable_gb = memory available when measured"
        hardware = cpu
        echo(f"runtime footprint (process RSS after warm-up): {rss / GB:.2f} GB")
    calibration["usable_gb_source"] = usable_note

    launch_us = measure_launch(device, sync, calls=100, batches=5 if quick else 30)
    echo(f"launch: {launch_us:.2f} µs per tiny op")

    gemm_rows = []
    for d, tokens in GEMM_SIZES_QUICK if quick else GEMM_SIZES:
        for d_in, d_out in ((d, 4 * d), (4 * d, d)):
            row = measure_gemm(device, sync, d_in, d_out, tokens, reps=3 if quick else 10)
            gemm_rows.append(row)
            echo(
                f"gemm Linear({d_in}, {d_out}) on {tokens} tokens, fwd+bwd: "
                f"{row['fwd_bwd_s'] * 1e3:.2f} ms, {row['tflops']:.4g} TFLOP/s"
            )
    calibration["gemm"] = gemm_rows
    fp32_tflops = max(row["tflops"] for row in gemm_rows)

    stream_bytes = (STREAM_BYTES_QUICK if quick else STREAM_BYTES)[device.type]
    stream_rows = [measure_stream(device, sync, stream_bytes, reps=5 if quick else 20)]
    calibration["stream"] = stream_rows
    bandwidth_gbs = max(row["gbs"] for row in stream_rows)
    row = stream_rows[0]
    echo(
        f"stream y = x + 1 over {row['bytes'] / 2 / 2**20:.0f} MiB: "
        f"{row['seconds'] * 1e3:.2f} ms, {row['gbs']:.4g} GB/s"
    )

    if device.type == "cuda":
        half = measure_half_gemm(
            device, sync, HALF_GEMM_N_QUICK if quick else HALF_GEMM_N, reps=5 if quick else 10
        )
        calibration["fp16_gemm"] = [half]
        fp16_tflops = half["tflops"]
        echo(f"fp16 GEMM {half['n']}³: {half['seconds'] * 1e3:.2f} ms, {fp16_tflops:.4g} TFLOP/s")
    else:
        # A CPU has no half-precision GEMM units torch would use for training; FP16 is no faster than FP32.
        fp16_tflops = fp32_tflops

    mode = power_mode()  # a Jetson: the figures above hold in this mode only
    if mode is not None:
        calibration["nvpmodel_mode"], calibration["nvpmodel_number"] = mode.name, mode.number
        echo(f"power mode (nvpmodel -q): {mode.name} (mode {mode.number})")
    total_gb = round(total / GB, 3)
    usable_gb = min(round(usable / GB, 3), total_gb)
    runtime_gb = max(round(runtime / GB, 3), 0.001)  # the parser accepts 0, but a process is never free
    description = (
        f"Measured by `edgefed profile` on {socket.gethostname()}: {hardware}, {physical} physical / "
        f"{logical} logical cores, torch {torch.__version__} with {threads} threads, "
        f"{now.date().isoformat()}; {usable_note}"
    )
    profile = DeviceProfile(
        name=profile_name,
        description=clean_text(description),
        accelerator="gpu" if device.type == "cuda" else "cpu",
        power_mode=mode.name if mode else "as measured",
        fp32_tflops=fp32_tflops,
        fp16_tflops=fp16_tflops,
        compute_efficiency=1.0,
        launch_us=launch_us,
        total_gb=total_gb,
        usable_gb=usable_gb,
        bandwidth_gbs=bandwidth_gbs,
        bandwidth_efficiency=1.0,
        runtime_gb=runtime_gb,
        uplink_mbps=DEFAULT_UPLINK_MBPS,
        downlink_mbps=DEFAULT_DOWNLINK_MBPS,
        latency_ms=DEFAULT_LATENCY_MS,
        power_w=mode.watts if mode else None,  # the mode's budget where its name states it (MODE_30W)
        calibration=calibration,
    )
    echo(
        f"profile '{profile.name}': fp32 {profile.fp32_tflops:.4g} TFLOP/s, "
        f"{profile.bandwidth_gbs:.4g} GB/s, launch {profile.launch_us:.3g} µs, "
        f"{profile.usable_gb:.1f} of {profile.total_gb:.1f} GB usable, "
        f"runtime {profile.runtime_gb:.2f} GB"
    )
    return profile


def profile_header(profile: DeviceProfile) -> str:
    """The comment `write_profile` puts above a measured profile: where each figure came from."""
    when = profile.calibration.get("measured_on", "an unrecorded time")
    lines = [
        f"Device profile '{profile.name}', written by `edgefed profile` on {when}.",
        "Every [compute] and [memory] figure was measured on this machine with this torch build and thread",
        "count (details in [calibration]), so both efficiencies are 1.0: the figures are already what",
        "training kernels reach here.",
        "  fp32_tflops: best FLOP/s of forward + backward of nn.Linear(d, 4d) / (4d, d) in FP32.",
    ]
    if profile.accelerator == "cpu":
        lines.append("  fp16_tflops: set equal to fp32_tflops; half precision is no faster on a CPU.")
    else:
        lines.append("  fp16_tflops: a square half-precision GEMM.")
    lines += [
        "  bandwidth_gbs: y = x + 1 over a tensor far beyond the last-level cache, read + write bytes.",
        "  launch_us: one 16-element torch.add.",
        "  runtime_gb: the framework's own footprint after warm-up, before any big tensor.",
        f"  {profile.calibration.get('usable_gb_source', 'usable_gb: memory training may use')}.",
        "[link] was NOT measured (it needs a peer): "
        f"{profile.uplink_mbps:g} Mbps up, {profile.downlink_mbps:g} Mbps down and {profile.latency_ms:g} ms",
        "latency are assumptions; edit them to match this device's network.",
    ]
    return "\n".join(lines)


def write_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write `profile` as TOML (with `profile_header`) to `path`; `load_profile(path)` reads it back."""
    path = Path(path)
    try:
        path.write_text(profile_toml(profile, profile_header(profile)), encoding="utf-8")
    except OSError as error:
        raise EdgefedError(f"{path}: {error.strerror}") from None
    return path


# --- measurements -------------------------------------------------------------------------------------


def cuda_sync(device: torch.device) -> Callable[[], None]:
    """A barrier for timings: CUDA kernels run asynchronously, CPU ops do not."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def best_seconds(
    run: Callable[[], Any], sync: Callable[[], None], reps: int, warmup: int = 1, budget_s: float = 2.0
) -> float:
    """Minimum wall time of `run` over up to `reps` calls after `warmup` untimed ones.

    Stops early, after at least 3 calls, once `budget_s` is spent: on a slow CPU the big sizes take
    half a second each, and more repetitions there add time, not accuracy.
    """
    for _ in range(warmup):
        run()
    sync()
    best = float("inf")
    began = time.perf_counter()
    for rep in range(reps):
        start = time.perf_counter()
        run()
        sync()
        end = time.perf_counter()
        best = min(best, end - start)
        if rep >= 2 and end - began > budget_s:
            break
    return best


def warm_up(device: torch.device, sync: Callable[[], None]) -> None:
    layer = nn.Linear(64, 256, device=device)
    x = torch.randn(128, 64, device=device, requires_grad=True)
    layer(x).sum().backward()
    torch.add(x.detach(), 1)
    sync()


def measure_launch(device: torch.device, sync: Callable[[], None], calls: int, batches: int) -> float:
    """µs per tiny op: batches of back-to-back calls, so on CUDA one sync is spread over many launches."""
    a = torch.ones(16, device=device)
    b = torch.ones(16, device=device)

    def batch() -> None:
        for _ in range(calls):
            torch.add(a, b)

    return sig(best_seconds(batch, sync, reps=batches) / calls * 1e6, 4)


def measure_gemm(
    device: torch.device, sync: Callable[[], None], d_in: int, d_out: int, tokens: int, reps: int
) -> dict[str, Any]:
    """Forward + backward of Linear(d_in, d_out) on `tokens` rows: 3 GEMMs of 2·T·d_in·d_out FLOPs each."""
    layer = nn.Linear(d_in, d_out, device=device)
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device)

    def step() -> None:
        # Gradients set to None as an optimizer's zero_grad does, so no accumulation kernel is timed.
        layer.weight.grad = layer.bias.grad = x.grad = None
        layer(x).backward(grad)

    seconds = sig(best_seconds(step, sync, reps=reps), 6)
    flops = 3 * 2 * tokens * d_in * d_out
    return {
        "d_in": d_in,
        "d_out": d_out,
        "tokens": tokens,
        "fwd_bwd_s": seconds,
        "tflops": sig(flops / seconds / 1e12, 6),
    }


def measure_stream(device: torch.device, sync: Callable[[], None], nbytes: int, reps: int) -> dict[str, Any]:
    """y = x + 1 into a preallocated y (a fresh one would time page faults, not bandwidth)."""
    nbytes = fit_stream_bytes(device, nbytes)
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    seconds = sig(best_seconds(lambda: torch.add(x, 1, out=y), sync, reps=reps), 6)
    moved = 2 * x.numel() * x.element_size()  # read x, write y
    return {"bytes": moved, "seconds": seconds, "gbs": sig(moved / seconds / GB, 6)}


def fit_stream_bytes(device: torch.device, nbytes: int) -> int:
    """Halve the streaming tensor while x and y would take more than a quarter of the free memory."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    while nbytes > 16 * 2**20 and 2 * nbytes > free / 4:
        nbytes //= 2
    return nbytes


def measure_half_gemm(device: torch.device, sync: Callable[[], None], n: int, reps: int) -> dict[str, Any]:
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    out = torch.empty(n, n, device=device, dtype=torch.float16)
    seconds = sig(best_seconds(lambda: torch.mm(a, b, out=out), sync, reps=reps), 6)
    return {"n": n, "dtype": "float16", "seconds": seconds, "tflops": sig(2 * n**3 / seconds / 1e12, 6)}


# --- machine facts ------------------------------------------------------------------------------------


def host_memory(total: int, available: int) -> tuple[int, int]:
    """Host (total, usable) bytes, capped by a cgroup memory limit when one is set (containers)."""
    limit = cgroup_memory_limit()
    if limit is None or limit[0] >= total:
        return total, min(available, total)
    limit_bytes, used = limit
    return limit_bytes, max(0, min(available, limit_bytes - used))


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, usage) bytes of this cgroup's memory limit, or None: no files, no limit, or unreadable."""
    for limit_file, usage_file in (
        (root / "memory.max", root / "memory.current"),  # cgroup v2
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),  # v1
    ):
        try:
            limit_text = limit_file.read_text().strip()
        except OSError:
            continue
        if not limit_text.isdigit() or int(limit_text) >= 2**60:  # "max", or v1's "unlimited" sentinel
            return None
        try:
            used = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            used = 0
        return int(limit_text), used
    return None


def cpu_model() -> str:
    """The CPU's (or board's) model name; Linux files are read only when present."""
    board = read_text_if_present("/proc/device-tree/model")  # Jetson / Raspberry Pi boards name themselves
    if board:
        return clean_text(board)
    cpuinfo = read_text_if_present("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("model name", "hardware")) and ":" in line:
            value = line.split(":", 1)[1].strip()
            if value:
                return clean_text(value)
    return clean_text(platform.processor() or platform.machine() or "unknown CPU")


def read_text_if_present(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def clean_text(text: str) -> str:
    """One printable line: device-tree strings end in NUL, and a profile's description is one line."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def default_name() -> str:
    host = NAME_CHARS.sub("-", socket.gethostname().lower()).strip("-")
    return f"measured-{re.sub('-+', '-', host) or 'machine'}"


def check_name(name: str) -> str:
    """A profile name doubles as a file stem: lowercase letters, digits and dashes."""
    if not name or NAME_CHARS.search(name) or name.startswith("-"):
        raise EdgefedError(f"profile name '{name}' must be lowercase letters, digits and dashes")
    return name


def sig(value: float, digits: int) -> float:
    """`value` rounded to `digits` significant digits: readable TOML, no false precision."""
    return float(f"{value:.{digits}g}")
