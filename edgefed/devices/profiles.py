"""Device profiles: the compute, memory and link figures of one device kind in one power mode.

A profile is a TOML file (the shipped ones live in `device_profiles/`, installed as
`edgefed.device_profiles`; `edgefed profile --out FILE` writes one measured on the machine it runs
on). Compute and memory bandwidth are separate figures because power modes scale them separately:
a Jetson AGX Orin in 15 W mode keeps 67 % of its bandwidth but 12 % of its GEMM throughput
(device_profiles/README.md). The cost model (edgefed/devices/costmodel.py) turns these figures into
step times.

    name = "jetson-agx-orin-64gb-maxn"      # the file's stem
    description = "..."
    accelerator = "gpu"                      # gpu or cpu
    power_mode = "MAXN"

    [compute]
    fp32_tflops = 5.3        # peak dense FP32 (edgefed trains in FP32)
    fp16_tflops = 42.5       # peak dense FP16/BF16 (tensor cores), for reference
    efficiency = 0.5         # share of fp32_tflops a training GEMM reaches
    launch_us = 10.0         # fixed cost per kernel launch / operator dispatch

    [memory]
    total_gb = 64.0
    usable_gb = 56.0         # what training may use (the OS and other processes keep the rest)
    bandwidth_gbs = 204.8    # peak
    efficiency = 0.75        # share of bandwidth_gbs a streaming kernel reaches
    runtime_gb = 1.0         # the framework itself: CUDA context, torch libraries

    [link]
    uplink_mbps = 50.0
    downlink_mbps = 100.0
    latency_ms = 20.0

    [power]                  # optional: the power mode's budget, for SIMULATED energy per round
    watts = 60.0

    [calibration]            # optional: what `edgefed profile` measured
    ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgefed.errors import EdgefedError
from edgefed.settings import MAX_CLIENTS
from edgefed.shipped import read_shipped, shipped_names
from edgefed.toml_io import parse_toml, toml_key, toml_scalar

PACKAGE = "edgefed.device_profiles"
ACCELERATORS = ("gpu", "cpu")
GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    accelerator: str
    power_mode: str
    fp32_tflops: float
    fp16_tflops: float
    compute_efficiency: float
    launch_us: float
    total_gb: float
    usable_gb: float
    bandwidth_gbs: float
    bandwidth_efficiency: float
    runtime_gb: float
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float
    power_w: float | None = None  # the power mode's budget (simulated energy); None: not known
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)  # the file it was read from

    @property
    def flops_per_s(self) -> float:
        """FP32 FLOP/s a training GEMM reaches on this device."""
        return self.fp32_tflops * 1e12 * self.compute_efficiency

    @property
    def bytes_per_s(self) -> float:
        """Bytes/s a streaming (element-wise) kernel reaches on this device."""
        return self.bandwidth_gbs * GB * self.bandwidth_efficiency

    def transfer_s(self, bytes_down: int, bytes_up: int) -> float:
        """Seconds to receive `bytes_down` and send `bytes_up` over this device's link."""
        if bytes_down == 0 and bytes_up == 0:
            return 0.0
        return (
            bytes_down * 8 / (self.downlink_mbps * 1e6)
            + bytes_up * 8 / (self.uplink_mbps * 1e6)
            + 2 * self.latency_ms / 1e3
        )


# (table, key, DeviceProfile field)
SCHEMA: tuple[tuple[str, str, str], ...] = (
    ("compute", "fp32_tflops", "fp32_tflops"),
    ("compute", "fp16_tflops", "fp16_tflops"),
    ("compute", "efficiency", "compute_efficiency"),
    ("compute", "launch_us", "launch_us"),
    ("memory", "total_gb", "total_gb"),
    ("memory", "usable_gb", "usable_gb"),
    ("memory", "bandwidth_gbs", "bandwidth_gbs"),
    ("memory", "efficiency", "bandwidth_efficiency"),
    ("memory", "runtime_gb", "runtime_gb"),
    ("link", "uplink_mbps", "uplink_mbps"),
    ("link", "downlink_mbps", "downlink_mbps"),
    ("link", "latency_ms", "latency_ms"),
)


def parse_profile(text: str, origin: str) -> DeviceProfile:
    """A profile from TOML text; every problem is an EdgefedError naming the origin and the key."""
    raw = parse_toml(text, origin)
    values: dict[str, Any] = {}
    for key in ("name", "description", "accelerator", "power_mode"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise EdgefedError(f"{origin}: '{key}' must be a non-empty string")
        values[key] = value
    if values["accelerator"] not in ACCELERATORS:
        raise EdgefedError(f"{origin}: accelerator must be one of {', '.join(ACCELERATORS)}")
    for table, key, name in SCHEMA:
        section = raw.get(table)
        if not isinstance(section, dict) or key not in section:
            raise EdgefedError(f"{origin}: missing [{table}] {key}")
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EdgefedError(f"{origin}: [{table}] {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise EdgefedError(f"{origin}: [{table}] {key} must be a finite number, got {value}")
        if value < 0 or (value == 0 and name not in ("launch_us", "latency_ms", "runtime_gb")):
            raise EdgefedError(f"{origin}: [{table}] {key} must be positive, got {value}")
        values[name] = float(value)
    for key in ("compute_efficiency", "bandwidth_efficiency"):
        if values[key] > 1:
            raise EdgefedError(f"{origin}: {key.replace('_', ' ')} is a share of the peak, at most 1")
    if values["usable_gb"] > values["total_gb"]:
        raise EdgefedError(f"{origin}: [memory] usable_gb exceeds total_gb")
    power = raw.get("power")
    if power is not None:
        watts = power.get("watts") if isinstance(power, dict) else None
        if isinstance(watts, bool) or not isinstance(watts, int | float) or not 0 < watts < math.inf:
            raise EdgefedError(f"{origin}: [power] watts must be a positive number, got {watts!r}")
        values["power_w"] = float(watts)
    calibration = raw.get("calibration", {})
    if not isinstance(calibration, dict):
        raise EdgefedError(f"{origin}: [calibration] must be a table")
    return DeviceProfile(**values, calibration=calibration, source=origin)


def profile_names() -> list[str]:
    """The profiles shipped with edgefed."""
    return shipped_names(PACKAGE)


def load_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name, or a profile file by path."""
    text, origin = read_shipped(
        name_or_path,
        PACKAGE,
        "device profile",
        "device_profiles",
        " (or pass a profile file written by `edgefed profile --out FILE`)",
    )
    profile = parse_profile(text, origin)
    if origin.startswith("device_profiles/") and profile.name != name_or_path:
        raise EdgefedError(f"{origin} names itself '{profile.name}'")
    return profile


def profile_toml(profile: DeviceProfile, header: str = "") -> str:
    """A profile as TOML that `parse_profile` reads back (what `edgefed profile --out` writes)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key in ("name", "description", "accelerator", "power_mode"):
        lines.append(f"{key} = {toml_scalar(getattr(profile, key))}")
    table = None
    for section, key, name in SCHEMA:
        if section != table:
            lines += ["", f"[{section}]"]
            table = section
        lines.append(f"{key} = {toml_scalar(getattr(profile, name))}")
    if profile.power_w is not None:
        lines += ["", "[power]", f"watts = {toml_scalar(profile.power_w)}"]
    if profile.calibration:
        lines += ["", "[calibration]"]
        nested = []
        for key, value in profile.calibration.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                nested.append((key, value))
            else:
                lines.append(f"{toml_key(key)} = {toml_scalar(value)}")
        for key, rows in nested:
            for row in rows:
                lines += ["", f"[[calibration.{toml_key(key)}]]"]
                lines += [f"{toml_key(k)} = {toml_scalar(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


FLEET_EXAMPLE = "2×jetson-agx-orin-64gb-maxn + 2×jetson-orin-nano-8gb + raspberry-pi-5-8gb@3"


def parse_fleet(entries: Iterable[str]) -> tuple[str, ...]:
    """A fleet's devices, one entry per client: `2×NAME` (or `2xNAME`, `2*NAME`) stands for NAME twice;
    `NAME@E` caps that device's exit depth at E blocks (early-exit methods). Entries may come joined by
    `+` or `,`. Counts must be positive; the names are checked when the profiles load."""
    devices: list[str] = []
    for text in entries:
        for entry in filter(None, (part.strip() for part in re.split(r"[+,]", text))):
            match = re.fullmatch(r"(?:([0-9]+)\s*[×xX*]\s*)?([^\s@×*]+)(?:@(\S+))?", entry)
            if match is None:
                raise EdgefedError(
                    f"fleet entry '{entry}': expected COUNT×PROFILE[@EXIT], e.g. {FLEET_EXAMPLE}"
                )
            count, name, exit_depth = match.groups()
            # Read as numbers only when short: int() refuses thousands of digits, and '²' is no digit.
            if count is not None and not (len(count) <= 9 and 1 <= int(count) <= MAX_CLIENTS):
                raise EdgefedError(
                    f"fleet entry '{entry}': a device count must be at least 1 and at most {MAX_CLIENTS:,}"
                )
            if exit_depth is not None and not (
                re.fullmatch(r"[0-9]{1,9}", exit_depth) and int(exit_depth) >= 1
            ):
                raise EdgefedError(f"fleet entry '{entry}': @EXIT is a number of blocks, at least 1")
            devices += [name if exit_depth is None else f"{name}@{int(exit_depth)}"] * int(count or 1)
            if len(devices) > MAX_CLIENTS:
                raise EdgefedError(f"a fleet of {len(devices):,} devices; at most {MAX_CLIENTS:,}")
    return tuple(devices)


def device_entry(entry: str) -> tuple[str, int | None]:
    """A fleet entry's profile name and exit-depth cap (None: no cap)."""
    name, _, exit_depth = entry.partition("@")
    return name, int(exit_depth) if exit_depth else None
