"""`edgefed profile`: a quick measurement of this machine, checked for shape and arithmetic, not speed."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from edgefed.devices import calibrate
from edgefed.devices.calibrate import measure_machine, profile_header, write_profile
from edgefed.devices.profiles import DeviceProfile, load_profile, parse_profile, profile_toml
from edgefed.errors import EdgefedError


@pytest.fixture(scope="module")
def measured() -> tuple[DeviceProfile, list[str]]:
    lines: list[str] = []
    profile = measure_machine(device="cpu", quick=True, echo=lines.append)
    return profile, lines


def test_measured_profile_round_trips_through_toml(measured) -> None:
    profile, _ = measured
    parsed = parse_profile(profile_toml(profile, profile_header(profile)), "measured.toml")
    # `source` records the file a profile was read from, so it differs by construction.
    assert dataclasses.replace(parsed, source="") == profile
    assert parsed.calibration == profile.calibration


def test_figures_are_positive_and_plausible(measured) -> None:
    profile, _ = measured
    assert profile.accelerator == "cpu"
    assert profile.power_mode == "as measured"
    assert re.fullmatch(r"[a-z0-9-]+", profile.name) and profile.name.startswith("measured-")
    assert torch.__version__ in profile.description
    assert 1e-3 <= profile.fp32_tflops <= 1e4
    assert profile.fp16_tflops == profile.fp32_tflops  # CPU: FP16 set equal to FP32
    assert 0.1 <= profile.bandwidth_gbs <= 1e5
    assert profile.compute_efficiency == profile.bandwidth_efficiency == 1.0
    assert profile.launch_us > 0
    assert 0 < profile.usable_gb <= profile.total_gb
    assert 0 < profile.runtime_gb < profile.total_gb
    assert (profile.uplink_mbps, profile.downlink_mbps, profile.latency_ms) == (50.0, 100.0, 20.0)


def test_calibration_rows_are_consistent(measured) -> None:
    profile, _ = measured
    calibration = profile.calibration
    assert calibration["torch"] == torch.__version__
    assert calibration["threads"] == torch.get_num_threads()
    assert calibration["quick"] is True
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", calibration["measured_on"])
    gemm = calibration["gemm"]
    assert len(gemm) >= 2
    for row in gemm:
        assert row["fwd_bwd_s"] > 0
        flops = 6 * row["tokens"] * row["d_in"] * row["d_out"]
        # Stored to 6 significant digits (calibrate.sig): within half a unit of the 6th, 5e-6 relative.
        assert row["tflops"] == pytest.approx(flops / row["fwd_bwd_s"] / 1e12, rel=5e-6)
    assert profile.fp32_tflops == max(row["tflops"] for row in gemm)
    # Both reference layers per size: Linear(d, 4d) and Linear(4d, d).
    assert {(row["d_in"], row["d_out"]) for row in gemm} >= {(128, 512), (512, 128)}
    (stream,) = calibration["stream"]
    assert stream["bytes"] >= 2 * 32 * 2**20  # read + write of a tensor beyond the last-level cache
    assert stream["gbs"] == pytest.approx(stream["bytes"] / stream["seconds"] / 1e9, rel=5e-6)
    assert profile.bandwidth_gbs == stream["gbs"]


def test_progress_is_echoed_per_measurement(measured) -> None:
    profile, lines = measured
    assert sum(line.startswith("gemm ") for line in lines) == len(profile.calibration["gemm"])
    assert any(line.startswith("stream ") for line in lines)
    assert any(line.startswith("launch: ") for line in lines)


def test_write_profile_loads_back_with_its_header(measured, tmp_path) -> None:
    profile, _ = measured
    path = write_profile(profile, tmp_path / "mine.toml")
    loaded = load_profile(str(path))
    assert dataclasses.replace(loaded, source="") == profile
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Device profile")
    assert "[link] was NOT measured" in text
    assert "fp16_tflops: set equal to fp32_tflops" in text


def test_write_profile_reports_a_missing_folder(measured, tmp_path) -> None:
    with pytest.raises(EdgefedError, match="missing"):
        write_profile(measured[0], tmp_path / "missing" / "mine.toml")


def test_names(monkeypatch) -> None:
    monkeypatch.setattr(calibrate.socket, "gethostname", lambda: "Lab_Orin.01.local")
    assert calibrate.default_name() == "measured-lab-orin-01-local"
    monkeypatch.setattr(calibrate.socket, "gethostname", lambda: "__")
    assert calibrate.default_name() == "measured-machine"
    assert calibrate.check_name("orin-15w") == "orin-15w"
    for bad in ("", "Orin", "orin 15w", "-orin"):
        with pytest.raises(EdgefedError, match="lowercase"):
            calibrate.check_name(bad)


def test_rejects_devices_it_cannot_measure() -> None:
    with pytest.raises(EdgefedError, match="cpu or cuda"):
        measure_machine(device="meta", quick=True, echo=lambda _: None)
    if not torch.cuda.is_available():
        with pytest.raises(EdgefedError, match="no CUDA device"):
            measure_machine(device="cuda", quick=True, echo=lambda _: None)


def test_cgroup_memory_limit_reads_only_files_that_exist(tmp_path) -> None:
    assert calibrate.cgroup_memory_limit(tmp_path) is None  # no files: no limit, no error
    (tmp_path / "memory.max").write_text("max\n")
    assert calibrate.cgroup_memory_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text("4000000000\n")
    assert calibrate.cgroup_memory_limit(tmp_path) == (4_000_000_000, 0)  # no memory.current: usage 0
    (tmp_path / "memory.current").write_text("1000000000\n")
    assert calibrate.cgroup_memory_limit(tmp_path) == (4_000_000_000, 1_000_000_000)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert calibrate.cgroup_memory_limit(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("500000000\n")
    assert calibrate.cgroup_memory_limit(v1) == (2_000_000_000, 500_000_000)


def test_host_memory_is_capped_by_a_container_limit(monkeypatch) -> None:
    monkeypatch.setattr(calibrate, "cgroup_memory_limit", lambda: None)
    assert calibrate.host_memory(16_000, 9_000) == (16_000, 9_000)
    monkeypatch.setattr(calibrate, "cgroup_memory_limit", lambda: (4_000, 1_000))
    assert calibrate.host_memory(16_000, 9_000) == (4_000, 3_000)
    monkeypatch.setattr(calibrate, "cgroup_memory_limit", lambda: (32_000, 1_000))  # limit above RAM
    assert calibrate.host_memory(16_000, 9_000) == (16_000, 9_000)


def test_clean_text_makes_one_printable_line() -> None:
    # A device-tree model (a Jetson's board name) ends in NUL.
    assert calibrate.clean_text("NVIDIA Jetson AGX Orin\x00") == "NVIDIA Jetson AGX Orin"
    assert calibrate.clean_text(" a\n\tb  c ") == "a b c"
    assert calibrate.cpu_model()  # never empty, whatever /proc holds
