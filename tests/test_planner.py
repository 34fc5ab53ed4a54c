"""The cost model, the planner and `edgefed plan`: plans fit their limits, predictions match measurements."""

import dataclasses

import pytest
import torch

from edgefed.cli import main
from edgefed.devices.costmodel import Workload, peak_memory_bytes, step_seconds
from edgefed.devices.fleet import adapt_and_measure
from edgefed.devices.peakmem import measure_peak_memory
from edgefed.devices.planner import Request, plan_for, plan_from_text, plan_text
from edgefed.devices.profiles import load_profile
from edgefed.errors import EdgefedError
from edgefed.methods import METHODS, AdapterSpec
from edgefed.models import load_classifier
from tests.tiny import tiny_bert_config


@pytest.fixture(scope="module")
def shape(tiny_model_dir):
    torch.manual_seed(0)
    base, new_modules = load_classifier(str(tiny_model_dir), 2)
    spec = AdapterSpec(rank=8, alpha=8.0, head_modules=tuple(new_modules))
    return adapt_and_measure(METHODS.create("federa"), base, spec)[2]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A 4-layer, 128-wide BERT: big enough that activations dominate the resident memory."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("four-layers")
    torch.manual_seed(0)
    config = tiny_bert_config(
        vocab_size=2000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


REQUEST = Request(rank=8, batch_size=16, seq_len=64, local_steps=5)


def test_a_roomy_device_gets_what_the_run_asks(shape):
    plan = plan_for(shape, load_profile("h100-sxm-80gb"), REQUEST, early_exits=False)
    assert (plan.frozen_layers, plan.exit_layer, plan.rank, plan.batch_size, plan.seq_len) == (
        0,
        2,
        8,
        16,
        64,
    )
    assert plan.reasons[0].startswith("the run's settings fit")


def test_a_time_budget_freezes_layers_and_the_plan_meets_it(shape):
    profile = load_profile("raspberry-pi-5-8gb")
    asked = plan_for(shape, profile, REQUEST, early_exits=False)
    budget = REQUEST.local_steps * (asked.step_s * 0.8) + (asked.round_s - REQUEST.local_steps * asked.step_s)
    plan = plan_for(shape, profile, dataclasses.replace(REQUEST, budget_s=budget), early_exits=False)
    assert plan.round_s <= budget < asked.round_s
    assert plan.frozen_layers == 1 and plan.batch_size == 16 and plan.seq_len == 64
    assert any("frozen" in reason for reason in plan.reasons)


def test_a_memory_limit_cuts_the_batch_when_freezing_is_not_enough(shape):
    profile = dataclasses.replace(load_profile("raspberry-pi-5-8gb"), runtime_gb=0.0)
    frozen_work = Workload(1, 2, 8, 16, 64)
    limit_gb = peak_memory_bytes(shape, frozen_work, "cpu") / 1e9 * 0.9  # below even the frozen plan
    plan = plan_for(shape, profile, dataclasses.replace(REQUEST, memory_gb=limit_gb), early_exits=False)
    assert plan.batch_size < 16 and plan.seq_len == 64 and plan.peak_gb <= limit_gb
    assert any("batch 16 ->" in reason for reason in plan.reasons)


def test_early_exit_models_can_exit_early(shape):
    profile = load_profile("raspberry-pi-5-8gb")
    full = plan_for(shape, profile, REQUEST, early_exits=True)
    transfers = full.round_s - REQUEST.local_steps * full.step_s
    budget = transfers + REQUEST.local_steps * full.step_s * 0.6
    plan = plan_for(shape, profile, dataclasses.replace(REQUEST, budget_s=budget), early_exits=True)
    assert plan.exit_layer < full.exit_layer or plan.frozen_layers > 0
    assert plan.round_s <= budget


def test_when_nothing_fits_the_error_names_the_limits(shape):
    with pytest.raises(EdgefedError, match=r"no plan fits raspberry-pi-5-8gb.*limit 0\.01 GB"):
        plan_for(
            shape, load_profile("raspberry-pi-5-8gb"), dataclasses.replace(REQUEST, memory_gb=0.01), False
        )


def test_plans_travel_as_toml(shape):
    plan = plan_for(shape, load_profile("jetson-orin-nano-8gb"), REQUEST, early_exits=False)
    assert plan_from_text(plan_text(plan)) == plan
    with pytest.raises(EdgefedError, match="unreadable plan"):
        plan_from_text("profile = 3")


def test_slower_devices_and_more_work_take_longer(shape):
    # MiniLM-wide layers: compute-bound, where power modes order the step times (the tiny model is
    # launch-bound, and 50 W's slower CPU clock launches more slowly than 30 W's).
    shape = dataclasses.replace(shape, hidden=384, intermediate=1536, heads=12)
    work = Workload(0, 2, 8, 32, 128)
    modes = ["maxn", "50w", "30w", "15w"]
    times = [step_seconds(shape, work, load_profile(f"jetson-agx-orin-64gb-{mode}")) for mode in modes]
    assert times == sorted(times)
    orin = load_profile("jetson-agx-orin-64gb-maxn")
    assert step_seconds(shape, Workload(1, 2, 8, 32, 128), orin) < step_seconds(shape, work, orin)
    assert step_seconds(shape, Workload(0, 2, 8, 64, 128), orin) > step_seconds(shape, work, orin)


@pytest.mark.parametrize(
    ("method", "work"),
    [
        ("federa", Workload(0, 4, 8, 16, 128)),
        ("federa", Workload(2, 4, 8, 16, 128)),
        ("lora", Workload(0, 4, 4, 32, 64)),
        ("adapter", Workload(0, 4, 8, 16, 128)),
        ("bitfit", Workload(1, 4, 8, 16, 128)),
    ],
)
def test_predicted_peak_memory_is_within_25_percent_of_the_measured_one(four_layers, method, work):
    """Measured in a fresh process: peak RSS (psutil) over two real local steps, or CUDA's peak."""
    peak = measure_peak_memory(four_layers, method, work.rank, work)
    assert abs(peak.error) <= 0.25, (peak.predicted_bytes / 1e6, peak.measured_bytes / 1e6)


def test_plan_command_prints_the_plan_and_why(capsys):
    assert main(["plan", "--profile", "jetson-orin-nano-8gb", "--budget-s", "0.3"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "frozen layers",
        "adapter layers",
        "rank",
        "early exit",
        "batch size",
        "sequence length",
    ):
        assert expected in out
    assert "why:" in out and "s predicted" in out and "GB predicted" in out
    assert main(["plan", "--profile", "no-such-device"]) == 2
    assert "unknown device profile 'no-such-device'" in capsys.readouterr().err
    assert main(["plan", "--list"]) == 0
    assert "raspberry-pi-5-8gb" in capsys.readouterr().out


def test_profile_command_writes_a_profile_that_plans(tmp_path, capsys):
    path = tmp_path / "here.toml"
    assert main(["profile", "--quick", "--name", "this-machine", "--out", str(path)]) == 0
    assert load_profile(str(path)).name == "this-machine"
    assert main(["plan", "--profile", str(path), "--model", "all-MiniLM-L6-v2"]) == 0
    assert "plan for this-machine" in capsys.readouterr().out
