"""Power mode and energy per round: INA3221 rails read from a fake sysfs tree laid out as a Jetson AGX
Orin's (JetPack 6), `nvpmodel -q` from a fake nvpmodel, the simulated figure and its warnings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefed.components import resolve_config
from edgefed.devices.power import SAMPLE_S, EnergyMeter, find_rails, open_meter, parse_nvpmodel, power_mode
from edgefed.devices.profiles import load_profile, parse_profile, profile_toml
from edgefed.transport.loopback import write_shards
from tests.test_transport import free_port, task_shards, wait_for

# AGX Orin (P3701): two INA3221 monitors on I2C bus 1. Channels as Jetson Linux r36 labels them;
# NC channels are not connected; channel 7 is the chip's shunt-voltage sum, not a rail.
AGX_ORIN = {
    "1-0040": {1: "VDD_GPU_SOC", 2: "VDD_CPU_CV", 3: "VIN_SYS_5V0", 7: "sum of shunt voltages"},
    "1-0041": {1: "NC", 2: "VDDQ_VDD2_1V8AO", 3: "NC", 7: "sum of shunt voltages"},
}
# Readings in mV and mA (a busy AGX Orin: about 20 W over the four rails).
BUSY = {
    "VDD_GPU_SOC": (4968, 1800),
    "VDD_CPU_CV": (4976, 900),
    "VIN_SYS_5V0": (4984, 1100),
    "VDDQ_VDD2_1V8AO": (4992, 200),
}


def busy_watts(readings: dict[str, tuple[int, int]]) -> float:
    return sum(mv * ma for mv, ma in readings.values()) / 1e6


def agx_orin_sysfs(root: Path, readings: dict[str, tuple[int, int]] = BUSY, hwmon: int = 3) -> Path:
    """The hwmon files of an AGX Orin's INA3221 monitors under root/bus/i2c/drivers/ina3221."""
    driver = root / "bus" / "i2c" / "drivers" / "ina3221"
    driver.mkdir(parents=True)
    for name in ("bind", "unbind", "uevent"):
        (driver / name).write_text("")
    for offset, (device, channels) in enumerate(AGX_ORIN.items()):
        folder = driver / device / "hwmon" / f"hwmon{hwmon + offset}"
        folder.mkdir(parents=True)
        (folder / "name").write_text("ina3221\n")
        (folder / "update_interval").write_text("1100\n")
        for channel, label in channels.items():
            (folder / f"in{channel}_label").write_text(label + "\n")
            millivolts, milliamps = readings.get(label, (0, 0))
            (folder / f"in{channel}_input").write_text(f"{millivolts}\n")
            if channel <= 3:
                (folder / f"curr{channel}_input").write_text(f"{milliamps}\n")
                (folder / f"curr{channel}_crit").write_text("40000\n")
                (folder / f"curr{channel}_max").write_text("36000\n")
                (folder / f"in{channel}_enable").write_text("1\n")
                (folder / f"shunt{channel}_resistor").write_text("5000\n")
    return root


def set_readings(root: Path, readings: dict[str, tuple[int, int]]) -> None:
    """New readings, each file replaced whole: a sysfs read never sees a half-written value, and the
    meter samples while this runs."""
    for label_file in root.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label"):
        label = label_file.read_text().strip()
        if label in readings:
            channel = label_file.name.removeprefix("in").removesuffix("_label")
            for name, value in (
                (f"in{channel}_input", readings[label][0]),
                (f"curr{channel}_input", readings[label][1]),
            ):
                staged = label_file.with_name(name + ".new")
                staged.write_text(f"{value}\n")
                os.replace(staged, label_file.with_name(name))


def test_the_agx_orin_rails_are_found_and_summed(tmp_path):
    rails = find_rails(agx_orin_sysfs(tmp_path, hwmon=5))  # the hwmon index varies: it is globbed
    assert sorted(rail.label for rail in rails) == sorted(BUSY)
    assert sum(rail.watts() for rail in rails) == pytest.approx(busy_watts(BUSY))


def test_a_module_input_rail_is_taken_alone(tmp_path):
    """Orin NX and Nano: VDD_IN is the module's input; the other rails are inside it."""
    folder = tmp_path / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    folder.mkdir(parents=True)
    for channel, (label, mv, ma) in enumerate(
        [("VDD_IN", 5000, 2000), ("VDD_CPU_GPU_CV", 5000, 900), ("VDD_SOC", 5000, 500)], start=1
    ):
        (folder / f"in{channel}_label").write_text(label)
        (folder / f"in{channel}_input").write_text(str(mv))
        (folder / f"curr{channel}_input").write_text(str(ma))
    rails = find_rails(tmp_path)
    assert [rail.label for rail in rails] == ["VDD_IN"] and rails[0].watts() == 10.0


def measure(meter: EnergyMeter, seconds: float, midway=None) -> tuple[float | None, float]:
    start = time.monotonic()
    meter.start()
    time.sleep(seconds / 2)
    if midway:
        midway()
    time.sleep(seconds / 2)
    joules = meter.stop()
    return joules, time.monotonic() - start


def test_energy_is_volts_times_amps_integrated_over_the_round(tmp_path):
    root = agx_orin_sysfs(tmp_path)
    warnings: list[str] = []
    meter = open_meter(warnings.append, str(root))
    assert meter is not None and not warnings
    joules, elapsed = measure(meter, 0.6)
    # A measurement over wall time, not a float comparison: the meter samples the rails every
    # SAMPLE_S, so the integral may be off by up to a period at each end of the 0.6 s window.
    window = 2 * SAMPLE_S / 0.6
    assert joules == pytest.approx(busy_watts(BUSY) * elapsed, rel=window)
    # Half the round at twice the GPU's current: the integral follows the change.
    doubled = {**BUSY, "VDD_GPU_SOC": (4968, 3600)}
    joules, elapsed = measure(meter, 0.6, midway=lambda: set_readings(root, doubled))
    expected = (busy_watts(BUSY) + busy_watts(doubled)) / 2 * elapsed
    assert joules == pytest.approx(expected, rel=window)
    assert not warnings


def test_a_sensor_that_vanishes_mid_run_gives_one_warning_and_no_figure(tmp_path):
    root = agx_orin_sysfs(tmp_path)
    warnings: list[str] = []
    meter = open_meter(warnings.append, str(root))
    assert measure(meter, 0.2)[0] is not None
    gone = lambda: shutil.rmtree(root / "bus/i2c/drivers/ina3221/1-0041")  # noqa: E731 - the driver unbinds
    assert measure(meter, 0.4, midway=gone)[0] is None  # this round: simulated
    assert measure(meter, 0.2)[0] is None  # and every later one, without a second warning
    assert len(warnings) == 1 and "stopped answering" in warnings[0] and "SIMULATED" in warnings[0]


def test_no_sensors_or_an_unreadable_one_gives_one_warning_and_no_meter(tmp_path, monkeypatch):
    warnings: list[str] = []
    assert open_meter(warnings.append, str(tmp_path)) is None
    root = agx_orin_sysfs(tmp_path / "orin")
    denied = next(root.glob("bus/i2c/drivers/ina3221/1-0040/hwmon/*/curr1_input"))
    if os.geteuid() == 0:  # root reads any file: refuse this one as the kernel would refuse a user
        read_text = Path.read_text

        def refuse(path, *args, **kwargs):
            if path == denied:
                raise PermissionError(13, "Permission denied", str(path))
            return read_text(path, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", refuse)
    else:
        denied.chmod(0)
    assert open_meter(warnings.append, str(root)) is None
    assert len(warnings) == 2
    assert "no INA3221 power sensors" in warnings[0] and "Permission denied" in warnings[1]


def test_the_power_mode_comes_from_nvpmodel(tmp_path, monkeypatch):
    nvpmodel = tmp_path / "nvpmodel"
    nvpmodel.write_text(
        "#!/bin/sh\necho 'NVPM WARN: fan mode is not set!'\necho 'NV Power Mode: MODE_30W'\necho 2\n"
    )
    nvpmodel.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    mode = power_mode()
    assert (mode.name, mode.number, mode.watts) == ("MODE_30W", 2, 30.0)
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n").watts is None  # MAXN states no budget
    assert parse_nvpmodel("nvpmodel: command failed\n") is None


def test_edgefed_profile_records_the_power_mode(tmp_path):
    """`edgefed profile` on a Jetson (a fake nvpmodel on PATH): the mode and its budget in the profile."""
    nvpmodel = tmp_path / "nvpmodel"
    nvpmodel.write_text("#!/bin/sh\necho 'NV Power Mode: MODE_15W'\necho 1\n")
    nvpmodel.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "orin.toml"
    command = [sys.executable, "-m", "edgefed", "profile", "--quick", "--name", "orin", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "power mode (nvpmodel -q): MODE_15W (mode 1)" in result.stderr
    profile = parse_profile(out.read_text(), str(out))
    assert (profile.power_mode, profile.power_w) == ("MODE_15W", 15.0)
    assert profile.calibration["nvpmodel_number"] == 1
    assert parse_profile(profile_toml(profile), "again") == profile


def test_every_shipped_profile_has_a_power_budget():
    from edgefed.devices.profiles import profile_names

    for name in profile_names():
        assert load_profile(name).power_w > 0, name


def test_in_process_fleet_energy_is_simulated_from_each_profile(tmp_path, tiny_model_dir, small_data_dir):
    from edgefed.federation.runner import run

    profiles = ("jetson-agx-orin-64gb-maxn", "raspberry-pi-5-8gb")
    config = resolve_config(
        None,
        {
            "model": str(tiny_model_dir),
            "data": str(small_data_dir),
            "clients": 2,
            "rounds": 2,
            "local_steps": 2,
            "batch_size": 8,
            "max_seq_len": 24,
            "rank": 4,
            "profiles": ",".join(profiles),
            "out": str(tmp_path / "run"),
        },
    )
    summary = run(config, echo=lambda line: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    total = 0.0
    for row in rows[1:]:
        assert row["client_energy_source"] == ["simulated", "simulated"]
        for client, joules in zip(row["clients"], row["client_energy_j"], strict=True):
            power = load_profile(profiles[client]).power_w
            assert joules > 0 and joules / power < row["sim_round_s"] + 1e-9  # budget × its own busy time
            total += joules
    assert summary.energy_j == {"simulated": pytest.approx(total)}


def test_a_device_client_reports_measured_energy_and_one_without_sensors_the_simulated(
    tmp_path, tiny_model_dir, small_data_dir
):
    """An `edgefed server` for two clients on AGX Orin profiles; one client reads a fake AGX Orin sysfs
    (EDGEFED_SYSFS), the other has no sensors: one warning line, and its energy is simulated."""
    flags = {
        "model": tiny_model_dir, "data": small_data_dir, "clients": 2, "rounds": 2, "local_steps": 2,
        "batch_size": 8, "max_seq_len": 24, "rank": 4, "out": tmp_path / "run",
        "profiles": "2×jetson-agx-orin-64gb-30w",
    }  # fmt: skip
    config = resolve_config(None, {"model": str(tiny_model_dir), "data": str(small_data_dir), "clients": 2})
    shards = write_shards(*task_shards(config), tmp_path)
    address = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "edgefed", "server", "--address", address]
    argv += [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    sysfs = agx_orin_sysfs(tmp_path / "sys")
    clients, logs = [], []
    try:
        for index, sensors in enumerate((sysfs, tmp_path / "no-sensors")):
            env = {**os.environ, "EDGEFED_SYSFS": str(sensors)}
            log = tmp_path / f"client-{index}.log"
            logs.append(log)
            command = [
                sys.executable,
                "-m",
                "edgefed",
                "client",
                "--server",
                address,
                "--data",
                str(shards[index]),
            ]
            command += [
                "--model",
                str(tiny_model_dir),
                "--name",
                f"client-{index}",
                "--profile",
                "jetson-agx-orin-64gb-30w",
                "--threads",
                "1",
            ]
            with log.open("wb") as handle:
                clients.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env))
            wait_for(lambda log=log: "is client" in log.read_text(), 120, f"client {index} to join")
        assert server.wait(timeout=180) == 0
        for client in clients:
            assert client.wait(timeout=30) == 0
    finally:
        for process in [server, *clients]:
            process.kill()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        sources = dict(zip(row["clients"], row["client_energy_source"], strict=True))
        joules = dict(zip(row["clients"], row["client_energy_j"], strict=True))
        assert sources == {0: "measured", 1: "simulated"}
        assert joules[0] > 0 and joules[1] > 0
    with_sensors, without = (log.read_text() for log in logs)
    assert "J (VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO)" in with_sensors
    assert "warning" not in with_sensors
    assert without.count("warning") == 1 and "no INA3221 power sensors" in without


def test_meter_stop_without_start_measures_nothing(tmp_path):
    meter = EnergyMeter(find_rails(agx_orin_sysfs(tmp_path)), lambda line: None)
    assert meter.stop() is None
