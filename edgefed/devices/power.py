"""Power on the device: the Jetson's power mode, and energy per local round from its power sensors.

A Jetson reports its power mode through `nvpmodel -q` ("NV Power Mode: MODE_30W", then the mode's
number) and its power through TI INA3221 monitors, which Jetson Linux (JetPack 5 and 6) exposes as
hwmon devices under /sys/bus/i2c/drivers/ina3221/<bus>-<address>/hwmon/hwmon<N>/ (N varies from
boot to boot, so it is globbed): per channel n, `in<n>_label` names the rail, `in<n>_input` is its
voltage in mV and `curr<n>_input` its current in mA. A channel labelled NC is not connected, and
`sum of shunt voltages` is no rail.

Which rails make the board's power: a rail labelled VDD_IN is the module's input (Orin NX, Orin
Nano) and is taken alone; otherwise (AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0,
VDDQ_VDD2_1V8AO, which supply disjoint parts) the rails are summed.

`EnergyMeter` samples the rails on a thread (every 50 ms) while a round runs and integrates volts ×
amps over it (trapezoids). Where there is no sensor, or it cannot be read, or it vanishes mid-run,
the meter says so in one warning line and measures nothing more: the round's energy is then
SIMULATED from the device profile's power figure for its power mode (`simulated_energy_j`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SYSFS_ENV = "EDGEFED_SYSFS"  # where sysfs is mounted (a container may mount the host's elsewhere)
INA3221_GLOB = "bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label"
MODULE_INPUT = "VDD_IN"
NOT_RAILS = re.compile(r"^(NC|sum of shunt voltages)$", re.IGNORECASE)
SAMPLE_S = 0.05


@dataclass(frozen=True)
class PowerMode:
    name: str  # as nvpmodel names it: MAXN, MODE_30W, 15W, ...
    number: int

    @property
    def watts(self) -> float | None:
        """The mode's power budget when its name states one (MODE_30W: 30.0); None for MAXN."""
        found = re.search(r"(\d+(?:\.\d+)?)\s*W\b", self.name, re.IGNORECASE)
        return float(found.group(1)) if found else None


def power_mode(timeout_s: float = 10.0) -> PowerMode | None:
    """The Jetson's power mode from `nvpmodel -q`; None where there is no nvpmodel or it says nothing."""
    nvpmodel = shutil.which("nvpmodel")
    if nvpmodel is None:
        return None
    try:
        output = subprocess.run(
            [nvpmodel, "-q"], capture_output=True, text=True, timeout=timeout_s, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvpmodel(output)


def parse_nvpmodel(output: str) -> PowerMode | None:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("NV Power Mode:"):
            name = line.removeprefix("NV Power Mode:").strip()
            after = lines[index + 1] if index + 1 < len(lines) else ""
            if name:
                return PowerMode(name, int(after) if after.isdigit() else -1)
    return None


@dataclass(frozen=True)
class Rail:
    label: str
    millivolts: Path
    milliamps: Path

    def watts(self) -> float:
        return read_number(self.millivolts) * read_number(self.milliamps) / 1e6


def read_number(path: Path) -> float:
    text = path.read_text().strip()
    try:
        return float(text)
    except ValueError:
        raise OSError(f"{path} reads '{text[:20]}', not a number") from None


def find_rails(sysfs: Path) -> list[Rail]:
    """The board's power rails on INA3221 monitors under `sysfs` (see the module docstring); OSError
    when the sensors are there but cannot be read."""
    rails = []
    for label_file in sorted(sysfs.glob(INA3221_GLOB)):
        channel = label_file.name.removeprefix("in").removesuffix("_label")
        label = label_file.read_text().strip()
        volts, amps = label_file.with_name(f"in{channel}_input"), label_file.with_name(f"curr{channel}_input")
        if NOT_RAILS.match(label) or not (volts.exists() and amps.exists()):
            continue
        rails.append(Rail(label, volts, amps))
    module_input = [rail for rail in rails if rail.label == MODULE_INPUT]
    return module_input or rails


class EnergyMeter:
    """Joules drawn by `rails` between `start` and `stop`; None (and one warning, ever) when they fail."""

    def __init__(self, rails: list[Rail], warn: Callable[[str], None], sample_s: float = SAMPLE_S) -> None:
        self.rails = rails
        self.warn = warn
        self.sample_s = sample_s
        self.failed = False
        self._samples: list[tuple[float, float]] = []  # (monotonic s, watts)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        return " + ".join(rail.label for rail in self.rails)

    def start(self) -> None:
        if self.failed:
            return
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="edgefed-energy", daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """The energy since `start`, in joules; None when the sensors failed (now or before)."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.failed or len(self._samples) < 2:
            return None
        return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in itertools.pairwise(self._samples))

    def _sample_until_stopped(self) -> None:
        while True:
            try:
                self._samples.append((time.monotonic(), sum(rail.watts() for rail in self.rails)))
            except OSError as error:
                self.failed = True
                self.warn(
                    f"edgefed: warning: power sensor {self.source} stopped answering ({error}); energy is "
                    "SIMULATED from the device profile from now on"
                )
                return
            if self._stop.is_set():
                return  # the sample just taken closes the interval
            self._stop.wait(self.sample_s)


def open_meter(warn: Callable[[str], None], sysfs: str | None = None) -> EnergyMeter | None:
    """An EnergyMeter on this device's INA3221 rails, or None after one warning line that says why."""
    root = Path(sysfs or os.environ.get(SYSFS_ENV, "/sys"))
    try:
        rails = find_rails(root)
        for rail in rails:
            rail.watts()  # readable now, or not at all
    except OSError as error:
        warn(f"edgefed: warning: cannot read the power sensors ({error}); energy per round is SIMULATED")
        return None
    if not rails:
        warn(
            f"edgefed: warning: no INA3221 power sensors under {root}; energy per round is SIMULATED from "
            "the device profile"
        )
        return None
    return EnergyMeter(rails, warn)


def simulated_energy_j(power_w: float | None, seconds: float) -> float | None:
    """A round's energy at the power mode's budget (an upper bound); None without a power figure."""
    return None if power_w is None else power_w * seconds
