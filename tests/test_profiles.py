"""Device profiles (edgefed/devices/profiles.py, device_profiles/): shipped files, parsing, round trips."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import pytest

from edgefed.devices.profiles import (
    PACKAGE,
    SCHEMA,
    DeviceProfile,
    load_profile,
    parse_profile,
    profile_names,
    profile_toml,
)
from edgefed.errors import EdgefedError

AGX_MODES = ["maxn", "50w", "30w", "15w"]  # highest power first

EXPECTED = {
    "h100-sxm-80gb",
    "jetson-agx-orin-64gb-15w",
    "jetson-agx-orin-64gb-30w",
    "jetson-agx-orin-64gb-50w",
    "jetson-agx-orin-64gb-maxn",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "laptop-x86-cpu",
    "raspberry-pi-5-8gb",
}

VALID = """\
name = "test-device"
description = "a device for tests"
accelerator = "gpu"
power_mode = "MAXN"

[compute]
fp32_tflops = 5.3
fp16_tflops = 42.5
efficiency = 0.6
launch_us = 10.0

[memory]
total_gb = 64.0
usable_gb = 56.0
bandwidth_gbs = 204.8
efficiency = 0.75
runtime_gb = 1.5

[link]
uplink_mbps = 50.0
downlink_mbps = 100.0
latency_ms = 20.0
"""


def agx(mode: str) -> DeviceProfile:
    return load_profile(f"jetson-agx-orin-64gb-{mode}")


def replace_line(text: str, key: str, line: str) -> str:
    """`text` with the one line that assigns `key` replaced by `line` (or removed when `line` is empty)."""
    pattern = re.compile(rf"^{re.escape(key)} = .*\n", re.MULTILINE)
    assert len(pattern.findall(text)) == 1, key
    return pattern.sub(f"{line}\n" if line else "", text)


def parse_error(text: str) -> str:
    with pytest.raises(EdgefedError) as caught:
        parse_profile(text, "bad.toml")
    message = str(caught.value)
    assert message.startswith("bad.toml: "), message
    return message


def test_valid_text_parses() -> None:
    profile = parse_profile(VALID, "good.toml")
    assert profile.name == "test-device"
    assert profile.fp32_tflops == 5.3
    assert profile.compute_efficiency == 0.6
    assert profile.bandwidth_efficiency == 0.75
    assert profile.source == "good.toml"
    assert profile.calibration == {}


# --- shipped profiles ---------------------------------------------------------------------------


def test_expected_profiles_ship() -> None:
    assert set(profile_names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.accelerator in ("gpu", "cpu")
    assert 0 < profile.compute_efficiency <= 1 and 0 < profile.bandwidth_efficiency <= 1
    assert 0 < profile.usable_gb <= profile.total_gb
    assert profile.runtime_gb < profile.usable_gb
    assert profile.flops_per_s > 0 and profile.bytes_per_s > 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_profile_figures_carry_a_comment(name: str) -> None:
    """Every number in a shipped file has a comment giving its source, derivation or assumption: on its line,
    or directly above it or above the run of assignments it belongs to."""
    lines = (resources.files(PACKAGE) / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    assignment = re.compile(r"^\w+ = ")
    for index, line in enumerate(lines):
        if not re.match(r"^\w+ = [0-9]", line) or "#" in line:
            continue
        above = index - 1
        while above >= 0 and assignment.match(lines[above]):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"{name}: no comment for '{line}'"


def test_readme_lists_every_shipped_profile() -> None:
    readme = (resources.files(PACKAGE) / "README.md").read_text(encoding="utf-8")
    for name in profile_names():
        assert f"| `{name}` |" in readme, name


def test_agx_orin_compute_decreases_with_power() -> None:
    compute = [agx(mode).fp32_tflops for mode in AGX_MODES]
    assert compute == sorted(compute, reverse=True)
    assert len(set(compute)) == len(compute)
    half = [agx(mode).fp16_tflops for mode in AGX_MODES]
    assert half == sorted(half, reverse=True) and len(set(half)) == len(half)


def test_agx_orin_compute_and_bandwidth_scale_separately() -> None:
    maxn = agx("maxn")
    for mode in AGX_MODES[1:]:
        profile = agx(mode)
        compute_share = profile.fp32_tflops / maxn.fp32_tflops
        bandwidth_share = profile.bandwidth_gbs / maxn.bandwidth_gbs
        assert bandwidth_share > compute_share, mode
    low = agx("15w")
    # device_profiles/README.md: compute scales as (SMs/16)·(MHz/1300), bandwidth as EMC MHz/3200. The
    # TOML files carry 3 significant digits (each within 0.5 %), so a ratio of two is within 1 %.
    digits = 0.01
    assert low.fp32_tflops / maxn.fp32_tflops == pytest.approx((6 / 16) * (408 / 1300), rel=digits)
    assert low.bandwidth_gbs / maxn.bandwidth_gbs == pytest.approx(2133 / 3200, rel=digits)
    assert agx("30w").fp32_tflops / maxn.fp32_tflops == pytest.approx((8 / 16) * (612 / 1300), rel=digits)
    assert agx("50w").fp32_tflops / maxn.fp32_tflops == pytest.approx(816 / 1300, rel=digits)


def test_agx_orin_modes_share_the_hardware() -> None:
    maxn = agx("maxn")
    for mode in AGX_MODES[1:]:
        profile = agx(mode)
        assert profile.total_gb == maxn.total_gb and profile.usable_gb == maxn.usable_gb
        assert profile.power_mode != maxn.power_mode


# --- load_profile -------------------------------------------------------------------------------


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(EdgefedError) as caught:
        load_profile("no-such-device")
    message = str(caught.value)
    assert "no-such-device" in message
    for name in profile_names():
        assert name in message


def test_load_profile_from_a_path(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(VALID, encoding="utf-8")
    profile = load_profile(str(path))
    assert profile.name == "test-device"  # a file's name need not match its stem
    assert profile.source == str(path)
    assert profile == parse_profile(VALID, str(path))


def test_load_profile_missing_toml_path(tmp_path) -> None:
    with pytest.raises(EdgefedError, match=r"absent\.toml"):
        load_profile(str(tmp_path / "absent.toml"))


def test_load_profile_bad_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(replace_line(VALID, "fp32_tflops", 'fp32_tflops = "fast"'), encoding="utf-8")
    with pytest.raises(EdgefedError, match=r"broken\.toml.*fp32_tflops"):
        load_profile(str(path))


# --- parse_profile errors -----------------------------------------------------------------------


@pytest.mark.parametrize(("table", "key", "name"), SCHEMA)
def test_missing_number_is_named(table: str, key: str, name: str) -> None:
    text = drop_efficiency(table) if key == "efficiency" else replace_line(VALID, key, "")
    assert f"missing [{table}] {key}" in parse_error(text)


def drop_efficiency(table: str) -> str:
    """VALID without `efficiency` in `table` (the key appears in both [compute] and [memory])."""
    head, _, tail = VALID.partition(f"[{table}]\n")
    section, sep, rest = tail.partition("\n\n")
    section = "\n".join(line for line in section.splitlines() if not line.startswith("efficiency ="))
    return f"{head}[{table}]\n{section}{sep}{rest}"


@pytest.mark.parametrize("key", ["name", "description", "accelerator", "power_mode"])
def test_missing_string_is_named(key: str) -> None:
    assert f"'{key}'" in parse_error(replace_line(VALID, key, ""))


def test_empty_string_is_rejected() -> None:
    assert "'power_mode'" in parse_error(replace_line(VALID, "power_mode", 'power_mode = ""'))


def test_unknown_accelerator() -> None:
    assert "accelerator" in parse_error(replace_line(VALID, "accelerator", 'accelerator = "tpu"'))


def test_missing_table_is_named() -> None:
    text = VALID.split("[link]")[0]
    assert "missing [link] uplink_mbps" in parse_error(text)


@pytest.mark.parametrize("key", ["fp32_tflops", "bandwidth_gbs", "usable_gb", "uplink_mbps", "latency_ms"])
def test_negative_number_is_rejected(key: str) -> None:
    message = parse_error(replace_line(VALID, key, f"{key} = -1.0"))
    assert key in message and "positive" in message


@pytest.mark.parametrize("key", ["fp32_tflops", "total_gb", "downlink_mbps"])
def test_zero_is_rejected_where_it_makes_no_sense(key: str) -> None:
    assert key in parse_error(replace_line(VALID, key, f"{key} = 0"))


@pytest.mark.parametrize("key", ["launch_us", "latency_ms", "runtime_gb"])
def test_zero_is_accepted_for_overheads(key: str) -> None:
    profile = parse_profile(replace_line(VALID, key, f"{key} = 0"), "zero.toml")
    assert getattr(profile, key) == 0.0


@pytest.mark.parametrize("value", ['"fast"', "true", "[1.0]", "{ a = 1 }"])
def test_non_number_is_rejected(value: str) -> None:
    message = parse_error(replace_line(VALID, "fp32_tflops", f"fp32_tflops = {value}"))
    assert "[compute] fp32_tflops must be a number" in message


def test_integer_is_accepted_as_a_number() -> None:
    profile = parse_profile(replace_line(VALID, "total_gb", "total_gb = 64"), "int.toml")
    assert profile.total_gb == 64.0 and isinstance(profile.total_gb, float)


@pytest.mark.parametrize(
    ("table", "label"), [("compute", "compute efficiency"), ("memory", "bandwidth efficiency")]
)
def test_efficiency_above_one_is_rejected(table: str, label: str) -> None:
    head, _, tail = VALID.partition(f"[{table}]\n")
    text = head + f"[{table}]\n" + re.sub(r"^efficiency = .*$", "efficiency = 1.2", tail, count=1, flags=re.M)
    message = parse_error(text)
    assert label in message and "at most 1" in message


def test_efficiency_of_one_is_accepted() -> None:
    text = re.sub(r"^efficiency = .*$", "efficiency = 1.0", VALID, flags=re.M)
    profile = parse_profile(text, "one.toml")
    assert profile.compute_efficiency == 1.0 and profile.bandwidth_efficiency == 1.0


def test_usable_above_total_is_rejected() -> None:
    message = parse_error(replace_line(VALID, "usable_gb", "usable_gb = 65.0"))
    assert "usable_gb" in message and "total_gb" in message


def test_invalid_toml() -> None:
    assert "invalid TOML" in parse_error(VALID + "this is not = = toml\n")
    assert "invalid TOML" in parse_error('name = "unterminated\n')


def test_calibration_must_be_a_table() -> None:
    assert "[calibration]" in parse_error("calibration = 3\n" + VALID)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_number_is_rejected(value: str) -> None:
    assert "finite" in parse_error(replace_line(VALID, "fp32_tflops", f"fp32_tflops = {value}"))


def test_awkward_calibration_keys_and_strings_round_trip() -> None:
    profile = parse_profile(VALID, "valid")
    odd = dataclasses.replace(
        profile,
        description='line one\nline "two" \\ three',
        calibration={"step time": 1.5, "a.b": "x", "nested": {"k": 1}},
    )
    back = roundtrip(odd)
    assert back == odd and back.calibration == odd.calibration


# --- profile_toml round trips -------------------------------------------------------------------


def roundtrip(profile: DeviceProfile) -> DeviceProfile:
    return parse_profile(
        profile_toml(profile, header="written by a test\n\nsecond paragraph"), profile.source
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_profile_round_trips(name: str) -> None:
    profile = load_profile(name)
    again = roundtrip(profile)
    assert again == profile
    assert again.calibration == profile.calibration == {}


def test_round_trip_with_calibration() -> None:
    calibration = {
        "torch": "2.13.0+cpu",
        "threads": 2,
        "tf32_matmul": False,
        "usable_gb_source": 'memory "available" when measured\\now',
        "sizes": [128, 256],
        "gemm": [
            {"d": 128, "tokens": 512, "seconds": 0.00125, "tflops": 0.0201},
            {"d": 256, "tokens": 512, "seconds": 0.0031, "tflops": 0.0325},
        ],
        "stream": [{"mib": 256, "gbs": 11.5}],
    }
    profile = dataclasses.replace(parse_profile(VALID, "measured.toml"), calibration=calibration)
    text = profile_toml(profile, header="measured")
    assert text.startswith("# measured\n")
    assert "[[calibration.gemm]]" in text
    again = parse_profile(text, "measured.toml")
    assert again == profile
    # `calibration` is excluded from dataclass equality, so compare it on its own
    assert again.calibration == calibration


def test_round_trip_keeps_odd_floats() -> None:
    profile = dataclasses.replace(
        parse_profile(VALID, "odd.toml"), fp32_tflops=1e-05, bandwidth_gbs=12345678.5, latency_ms=0.0
    )
    assert roundtrip(profile) == profile


def test_written_profile_loads_from_a_path(tmp_path) -> None:
    profile = dataclasses.replace(load_profile("raspberry-pi-5-8gb"), calibration={"rows": [{"n": 1}]})
    path = tmp_path / "pi.toml"
    path.write_text(profile_toml(profile), encoding="utf-8")
    loaded = load_profile(str(path))
    assert dataclasses.replace(loaded, source=profile.source) == profile
    assert loaded.calibration == {"rows": [{"n": 1}]}


# --- DeviceProfile arithmetic -------------------------------------------------------------------


def make_profile(**changes: float) -> DeviceProfile:
    return dataclasses.replace(parse_profile(VALID, "made.toml"), **changes)


def test_transfer_seconds() -> None:
    profile = make_profile(uplink_mbps=8.0, downlink_mbps=80.0, latency_ms=20.0)
    # 10 MB down at 80 Mbit/s = 1 s; 1 MB up at 8 Mbit/s = 1 s; one round trip of 2 × 20 ms
    assert profile.transfer_s(bytes_down=10_000_000, bytes_up=1_000_000) == pytest.approx(2.04)
    assert profile.transfer_s(bytes_down=10_000_000, bytes_up=0) == pytest.approx(1.04)
    assert profile.transfer_s(bytes_down=0, bytes_up=1_000_000) == pytest.approx(1.04)
    assert profile.transfer_s(0, 0) == 0.0


def test_transfer_without_latency() -> None:
    profile = make_profile(uplink_mbps=100.0, downlink_mbps=100.0, latency_ms=0.0)
    assert profile.transfer_s(12_500_000, 12_500_000) == pytest.approx(2.0)


def test_effective_rates() -> None:
    profile = make_profile(
        fp32_tflops=2.0, compute_efficiency=0.5, bandwidth_gbs=100.0, bandwidth_efficiency=0.8
    )
    assert profile.flops_per_s == pytest.approx(1e12)
    assert profile.bytes_per_s == pytest.approx(80e9)
