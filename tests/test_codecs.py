"""One contract, every codec; then each codec's own error bound and error feedback."""

import dataclasses
import json

import pytest
import torch

from edgefed.codecs import CODECS, ErrorFeedback, decode_state, encode_state, make_codec
from edgefed.errors import EdgefedError
from tests.tolerance import assert_within, gamma

SPECS = ["none", "fp16", "bf16", "int8", "int4", "topk:0.25"]


def delta_state(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {
        "lora_A": (0.01 * torch.randn(8, 384, generator=generator)).to(dtype),
        "lora_B": (0.01 * torch.randn(384, 8, generator=generator)).to(dtype),
        "classifier.bias": torch.randn(2, generator=generator).to(dtype),
        "odd": torch.randn(3, 5, 7, generator=generator).to(dtype),  # not a multiple of any block
    }


def test_every_registered_codec_is_covered():
    assert sorted(CODECS.names()) == sorted(spec.split(":")[0] for spec in SPECS)


@pytest.fixture(params=SPECS)
def codec(request):
    return make_codec(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_names_shapes_and_dtypes(codec, dtype):
    state = delta_state(dtype=dtype)
    decoded = decode_state(codec, encode_state(codec, state))
    assert decoded.keys() == state.keys()
    for name, tensor in state.items():
        assert decoded[name].shape == tensor.shape and decoded[name].dtype == tensor.dtype, name


def test_round_trip_error_is_within_the_codec_bound(codec):
    state = delta_state()
    for item, (name, tensor) in zip(encode_state(codec, state), state.items(), strict=True):
        error = (codec.decode(item) - tensor).abs()
        scale = tensor.abs().max()
        bound = {
            "none": 0.0,
            "fp16": 1e-3 * scale,
            "bf16": 4e-3 * scale,  # 8 significant bits: half an ulp is 2^-8 of the value
            "int8": scale / 127 / 2,
            "int4": scale / 7 / 2,
        }
        if codec.name == "topk":
            kept = (codec.decode(item) != 0).sum()
            assert kept == codec.kept(tensor.numel())
            # Every dropped value is no larger than the smallest kept one.
            dropped = error[codec.decode(item) == 0]
            assert dropped.max() <= tensor.abs().flatten().topk(int(kept)).values.min() + 1e-6
        else:
            assert error.max() <= bound[codec.name] + 1e-7, name


def test_bytes_on_the_wire_follow_the_format(codec):
    item = codec.encode("w", torch.randn(1000))
    expected = {
        "none": 4000,
        "fp16": 2000,
        "bf16": 2000,
        "int8": 1024 + 16 * 4,
        "int4": 512 + 16 * 4,
        "topk": 250 * (2 + 4),
    }
    assert item.nbytes == expected[codec.name]


def test_malformed_fields_are_refused(codec):
    item = codec.encode("w", torch.randn(100))
    truncated = dataclasses.replace(item, data=item.data[:-1])
    with pytest.raises(ValueError, match="tensor w: data holds"):
        codec.decode(truncated)
    with pytest.raises(ValueError, match="unsupported dtype"):
        codec.decode(dataclasses.replace(item, dtype="complex64"))


def test_top_k_positions_out_of_range_are_refused():
    codec = make_codec("topk:0.5")
    item = codec.encode("w", torch.randn(10))
    bad = torch.tensor([0, 1, 2, 3, 99], dtype=torch.int32).numpy().tobytes()
    with pytest.raises(ValueError, match="outside its 10 values"):
        codec.decode(dataclasses.replace(item, indices=bad))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zip", "unknown codec 'zip'; choose one of: bf16, fp16, int4, int8, none, topk"),
        ("topk", "needs an argument"),
        ("topk:2", "fraction must be in (0, 1]"),
        ("int8:4", "takes no argument"),
    ],
)
def test_bad_codec_specs(spec, message):
    with pytest.raises(
        EdgefedError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
    ):
        make_codec(spec)


@pytest.mark.parametrize("spec", ["int4", "topk:0.1"])
def test_error_feedback_sends_what_was_dropped_later(spec):
    """With feedback, Σ sent = Σ deltas − residual, and the residual stays bounded."""
    codec = make_codec(spec)
    feedback = ErrorFeedback(codec)
    total_delta = torch.zeros(4096, dtype=torch.float64)
    total_sent = torch.zeros(4096, dtype=torch.float64)
    # Each round rounds twice in float32: delta + residual, then that minus what was sent. Exact sums
    # (float64 here) differ from the residual's bookkeeping by at most γ₂ of those values per round.
    bound = torch.zeros(4096, dtype=torch.float64)
    for round_number in range(30):
        delta = {"w": torch.randn(4096, generator=torch.Generator().manual_seed(round_number)) * 0.01}
        before = feedback.residual.get("w", torch.zeros(4096)).double().abs()
        sent = decode_state(codec, feedback.compress(delta, round_number))["w"]
        total_delta += delta["w"].double()
        total_sent += sent.double()
        bound += gamma(2) * (delta["w"].double().abs() + before + feedback.residual["w"].double().abs())
    assert_within(total_sent + feedback.residual["w"].double(), total_delta, bound)
    assert feedback.residual_norm() < 0.5 * total_delta.norm()


def test_lossless_codec_keeps_no_residual():
    feedback = ErrorFeedback(make_codec("none"))
    feedback.compress(delta_state(), 1)
    assert feedback.residual == {}


def test_error_feedback_encodes_a_repeated_round_as_before():
    """A round run again (discarded, or replayed after a server restart) must not count its residual twice."""
    codec = make_codec("int4")
    feedback = ErrorFeedback(codec)
    deltas = [{"w": torch.randn(4096, generator=torch.Generator().manual_seed(r)) * 0.01} for r in range(3)]
    feedback.compress(deltas[0], 1)
    first = feedback.compress(deltas[1], 2)
    residual = {name: tensor.clone() for name, tensor in feedback.residual.items()}
    again = feedback.compress(deltas[1], 2)
    assert [item.data for item in again] == [item.data for item in first]
    torch.testing.assert_close(feedback.residual["w"], residual["w"], atol=0, rtol=0)
    assert [item.data for item in feedback.compress(deltas[2], 3)] != [item.data for item in first]


def test_a_run_with_int8_sends_about_a_quarter_of_the_bytes(tmp_path, tiny_model_dir, small_data_dir):
    from edgefed.cli import main

    totals = {}
    for spec in ("none", "int8"):
        out = tmp_path / spec
        argv = [
            "run",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_data_dir),
            "--clients",
            "2",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--batch-size",
            "8",
            "--max-seq-len",
            "16",
            "--rank",
            "16",
            "--codec",
            spec,
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        totals[spec] = rows[1]["bytes_up"]
        assert json.loads((out / "summary.json").read_text())["codec"] == spec
    # A quarter of the values' bytes, plus scales and each tensor's name, shape and CRC32C (~100 bytes,
    # heavy on this tiny model's 512-value tensors; benchmarks/comm.py has MiniLM's ratios).
    assert 0.25 <= totals["int8"] / totals["none"] < 0.4
