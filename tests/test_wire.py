"""The wire format: generated modules are current, states survive chunking, and bad streams are refused."""

import dataclasses
import filecmp

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefed.codecs import encode_state, make_codec
from edgefed.codecs.base import to_bytes
from edgefed.types import Pieces
from edgefed.wire.framing import ALIGN, FRAMING, ChunkView, Expected, WireError, reassemble, tensor_message
from edgefed.wire.generate import ROOT, generate
from edgefed.wire.reader import PayloadReader, parse_encoded, parse_state
from edgefed.wire.sending import ALIGNED_FROM, chunk_stream, serialize_state
from edgefed.wire.v1 import federation_pb2 as pb


def test_generated_modules_match_the_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run python -m edgefed.wire.generate"
        assert filecmp.cmp(fresh, committed, shallow=False), (
            f"{committed} is stale: run python -m edgefed.wire.generate"
        )


def state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "lora_A": 0.01 * torch.randn(8, 300, generator=generator),
        "head": torch.randn(2, 30, generator=generator),
    }


def expected_for(values, **overrides):
    shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in values.items()}
    return Expected(**{"run_id": "run-1", "round": 3, "shapes": shapes, "client_id": "c0", **overrides})


def stream(values, codec, chunk_bytes=1000, **fields):
    payload = serialize_state(encode_state(codec, values))
    chunks = list(
        chunk_stream(payload, "run-1", 3, "c0", chunk_bytes=chunk_bytes, num_examples=42, train_loss=0.5)
    )
    for name, value in fields.items():
        setattr(chunks[0], name, value)
    return chunks


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "int4", "topk:0.1"])
def test_a_state_survives_chunking_with_every_codec(spec):
    codec, values = make_codec(spec), state()
    chunks = stream(values, codec)
    assert len(chunks) > 1 and all(len(chunk.SerializeToString()) <= 1000 + 200 for chunk in chunks)
    payload, first = reassemble(iter(chunks), expected_for(values))
    assert (first.num_examples, first.train_loss) == (42, 0.5)
    decoded = parse_state(payload, codec, expected_for(values))
    reference = {
        name: codec.decode(item) for name, item in zip(values, encode_state(codec, values), strict=True)
    }
    for name in values:
        assert torch.equal(decoded[name], reference[name])


def cut_anywhere(payload: bytes, chunk_bytes: int) -> list[pb.Chunk]:
    """Chunks of `chunk_bytes` each, cut wherever that falls (edgefed's sender cuts at multiples of
    ALIGN; a receiver must not rely on it)."""
    count = -(-len(payload) // chunk_bytes)
    return [
        pb.Chunk(
            run_id="run-1", round=3, client_id="c0", index=index, last=index == count - 1, framing=FRAMING,
            data=payload[index * chunk_bytes : (index + 1) * chunk_bytes],
            **({"payload_bytes": len(payload), "num_examples": 42} if index == 0 else {}),
        )
        for index in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("chunk_bytes", [997, 1001, 1003])
def test_received_tensors_stay_in_their_chunks_and_are_checked_across_chunk_edges(chunk_bytes):
    codec, values = make_codec("none"), state()
    payload = serialize_state(encode_state(codec, values))
    raws = [chunk.SerializeToString() for chunk in cut_anywhere(payload, chunk_bytes)]
    received, _ = reassemble(map(ChunkView, raws), expected_for(values))
    encoded, _ = parse_encoded(received, codec, expected_for(values))
    lora = next(tensor for tensor in encoded if tensor.name == "lora_A")
    assert isinstance(lora.data, Pieces) and len(lora.data.parts) > 1
    assert all(any(part.obj is raw for raw in raws) for part in lora.data.parts)  # views, not copies
    assert torch.equal(parse_state(received, codec, expected_for(values))["lora_A"], values["lora_A"])

    # A NaN in the value that a chunk edge splits in two is found.
    start = payload.find(to_bytes(values["lora_A"]))
    edge = next(k * chunk_bytes for k in range(1, 20) if (k * chunk_bytes - start) % 4)
    poisoned = {**values, "lora_A": values["lora_A"].clone()}
    poisoned["lora_A"].view(-1)[(edge - start) // 4] = float("nan")
    poisoned_payload = serialize_state(encode_state(codec, poisoned))
    refused(cut_anywhere(poisoned_payload, chunk_bytes), expected_for(values), "NaN or Inf")


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "int4", "topk:0.1"])
@pytest.mark.parametrize("chunk_bytes", [1024, 1100, 4096])
def test_values_lie_aligned_in_the_received_messages(spec, chunk_bytes):
    """Framing 2: every bytes field of ALIGNED_FROM bytes or more starts a multiple of ALIGN bytes into
    the payload, and into the very message gRPC hands the receiver, whatever the names, shapes and
    chunk size; smaller fields travel unpadded."""
    codec = make_codec(spec)
    values = {f"{'x' * k}.w": torch.randn(k * 3037 + 1) for k in range(1, 8)}  # odd names and lengths
    payload = serialize_state(encode_state(codec, values))
    raws = [chunk.SerializeToString() for chunk in chunk_stream(payload, "run-1", 3, "c0", chunk_bytes)]
    views = [ChunkView(raw) for raw in raws]
    received, _ = reassemble(views, expected_for(values, client_id="c0"))
    encoded, _ = parse_encoded(received, codec, expected_for(values))
    fields = [f for tensor in encoded for f in (tensor.data, tensor.scales, tensor.indices)]
    long = [part for f in fields if len(f) >= ALIGNED_FROM for part in Pieces.of(f)]
    assert long and all(offset_in(part, part.obj) % ALIGN == 0 for part in long)
    assert all(offset_in(view.data, raw) % ALIGN == 0 for view, raw in zip(views, raws, strict=True))
    assert parse_state(received, codec, expected_for(values)).keys() == values.keys()


def test_small_fields_travel_unpadded():
    small = encode_state(make_codec("int8"), {f"layer{k}.lora_A": torch.randn(4, 64) for k in range(6)})
    payload = serialize_state(small)
    assert len(payload) == pb.StatePayload(tensors=[tensor_message(t) for t in small]).ByteSize()


def offset_in(view: memoryview, whole: bytes) -> int:
    """Where `view` starts inside the bytes object it views."""
    return np.frombuffer(view, np.uint8).ctypes.data - np.frombuffer(whole, np.uint8).ctypes.data


def test_a_chunk_of_another_framing_is_refused():
    values = state()
    chunks = stream(values, make_codec("none"))
    for framing in (0, 1, 3):
        chunks[0].framing = framing
        refused(
            chunks, expected_for(values), f"a chunk of framing {framing or 1}; this edgefed reads framing 2"
        )


def test_default_chunks_are_at_most_one_mebibyte():
    codec = make_codec("none")
    big = {"w": torch.randn(3 * 2**18)}  # 3 MiB of float32
    chunks = list(chunk_stream(serialize_state(encode_state(codec, big)), "r", 1))
    assert len(chunks) == 4 and max(len(chunk.data) for chunk in chunks) == 2**20


def refused(chunks, expected, message, codec=None):
    with pytest.raises(WireError, match=message):
        payload, _ = reassemble(iter(chunks), expected)
        parse_state(payload, codec or make_codec("none"), expected)


def test_truncated_reordered_and_tampered_streams_are_refused():
    values = state()
    chunks = stream(values, make_codec("none"))
    refused(chunks[:-1], expected_for(values), "without its last one")
    refused([chunks[1], chunks[0], *chunks[2:]], expected_for(values), "arrived where chunk 0 was due")
    tampered = [pb.Chunk.FromString(chunk.SerializeToString()) for chunk in chunks]
    tampered[1].data = bytes([tampered[1].data[0] ^ 1]) + tampered[1].data[1:]
    refused(tampered, expected_for(values), "tensor lora_A: CRC32C mismatch")


def test_wrong_run_round_client_and_size_are_refused():
    values = state()
    chunks = stream(values, make_codec("none"))
    refused(chunks, expected_for(values, run_id="run-2"), "wrong run id")
    refused(chunks, expected_for(values, round=4), "round 3 is not the current round 4")
    refused(chunks, expected_for(values, client_id="c1"), "chunk from 'c0' in the stream of 'c1'")
    refused(chunks, expected_for(values, max_bytes=5000), "the limit is 5000")


def test_garbage_and_mismatching_tensors_are_refused():
    values = state()
    garbage = list(chunk_stream(b"\xff\xfe not protobuf \x00" * 10, "run-1", 3, "c0"))
    refused(garbage, expected_for(values), "not a StatePayload")
    codec = make_codec("none")
    renamed = {"lora_B" if name == "lora_A" else name: t for name, t in values.items()}
    refused(stream(renamed, codec), expected_for(values), "unknown \\['lora_B'\\], missing \\['lora_A'\\]")
    reshaped = {**values, "head": values["head"].reshape(30, 2)}
    refused(
        stream(reshaped, codec), expected_for(values), r"tensor head: float32\[30, 2\] where float32\[2, 30\]"
    )
    halved = {**values, "head": values["head"].half()}
    refused(stream(halved, codec), expected_for(values), r"tensor head: float16\[2, 30\] where float32")
    refused(stream(values, make_codec("fp16")), expected_for(values), "codec 'fp16', this run uses 'none'")


def test_tampered_tensor_checksum_nan_and_norm_bound_are_refused():
    values, codec = state(), make_codec("none")
    payload = serialize_state(encode_state(codec, values))
    message = pb.StatePayload.FromString(payload)
    message.tensors[0].crc32c ^= 1
    refused(
        list(chunk_stream(message.SerializeToString(), "run-1", 3, "c0")),
        expected_for(values),
        "tensor lora_A: CRC32C mismatch",
    )
    poisoned = {**values, "head": values["head"].clone()}
    poisoned["head"][0, 0] = float("nan")
    refused(stream(poisoned, codec), expected_for(values), "tensor head: NaN or Inf")
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in values.values())))
    refused(stream(values, codec), expected_for(values, max_norm=norm * 0.99), "over the bound")
    payload, _ = reassemble(iter(stream(values, codec)), expected_for(values, max_norm=norm * 1.01))
    assert parse_state(payload, codec, expected_for(values, max_norm=norm * 1.01)).keys() == values.keys()


def test_finite_values_whose_squares_pass_float32s_range_keep_their_norm():
    values, codec = state(), make_codec("none")
    large = {**values, "head": values["head"].clone()}
    large["head"][0, :4] = 3e19  # finite, each square (9e38) beyond float32's range
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in large.values())))
    refused(stream(large, codec), expected_for(values, max_norm=norm * 0.99), "over the bound")
    payload, _ = reassemble(iter(stream(large, codec)), expected_for(values, max_norm=norm * 1.01))
    accepted = parse_state(payload, codec, expected_for(values, max_norm=norm * 1.01))
    assert torch.equal(accepted["head"], large["head"])
    infinite = {**values, "head": values["head"].clone()}
    infinite["head"][1, 5] = float("-inf")
    refused(stream(infinite, codec), expected_for(values), "tensor head: NaN or Inf")


def test_corrupt_codec_fields_are_a_wire_error():
    values, codec = state(), make_codec("int8")
    encoded = [dataclasses.replace(item, scales=item.scales[:-4]) for item in encode_state(codec, values)]
    chunks = list(chunk_stream(serialize_state(encoded), "run-1", 3, "c0"))
    refused(chunks, expected_for(values), "scales holds", codec=codec)


def read_streaming(raws: list[bytes], codec, expected: Expected):
    """As a server reads a push: each tensor's data checked chunk by chunk as it arrives."""
    reader = PayloadReader(codec, expected)
    payload, _ = reassemble(map(ChunkView, raws), expected, reader.feed)
    return reader.finish(payload)


def read_whole(raws: list[bytes], codec, expected: Expected):
    payload, _ = reassemble(map(ChunkView, raws), expected)
    return PayloadReader(codec, expected).finish(payload)


def verdict(read, raws, codec, expected):
    try:
        encoded, decoded = read(raws, codec, expected)
    except WireError:
        return "refused"

    def joined(field):
        return bytes(Pieces(Pieces.of(field)).join())

    return [(t.name, *map(joined, (t.data, t.scales, t.indices))) for t in encoded], sorted(decoded)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    spec=st.sampled_from(["none", "int8", "topk:0.1"]),
    chunk_bytes=st.sampled_from([1024, 1100, 997]),
    position=st.integers(0, 10**6),
    noise=st.binary(min_size=1, max_size=6),
    how=st.sampled_from(["flip", "cut", "insert", "none"]),
)
def test_checking_data_as_it_streams_in_agrees_with_checking_it_whole(
    spec, chunk_bytes, position, noise, how
):
    """The streaming checks only move work earlier: for any stream, mutated or not, they accept what
    reading the whole payload accepts, with the same tensors, and refuse what it refuses."""
    codec, values = (
        make_codec(spec),
        {"a.w": torch.randn(700), "b.w": torch.randn(3, 50), "c": torch.randn(1)},
    )
    payload = serialize_state(encode_state(codec, values))
    if chunk_bytes % ALIGN:
        chunks = cut_anywhere(payload, chunk_bytes)
    else:
        chunks = list(chunk_stream(payload, "run-1", 3, "c0", chunk_bytes, num_examples=42))
    raws = [chunk.SerializeToString() for chunk in chunks]
    which = position % len(raws)
    at = position % len(raws[which])
    raws[which] = {
        "flip": raws[which][:at] + bytes(b ^ 0x5A for b in noise) + raws[which][at + len(noise) :],
        "cut": raws[which][:at],
        "insert": raws[which][:at] + noise + raws[which][at:],
        "none": raws[which],
    }[how]
    expected = expected_for(values)
    whole = verdict(read_whole, raws, codec, expected)
    assert verdict(read_streaming, raws, codec, expected) == whole
    if how == "none":
        assert whole != "refused"


def test_a_nan_is_found_in_data_checked_as_it_streams_in():
    values = {"w": torch.randn(5000)}
    values["w"][4321] = float("nan")
    payload = serialize_state(encode_state(make_codec("none"), values))
    raws = [
        chunk.SerializeToString() for chunk in chunk_stream(payload, "run-1", 3, "c0", 1024, num_examples=1)
    ]
    reader = PayloadReader(make_codec("none"), expected_for(values))
    with pytest.raises(WireError, match="tensor w: NaN or Inf values"):
        reassemble(map(ChunkView, raws), expected_for(values), reader.feed)
    assert reader.arriving is not None and reader.arriving.done > reader.arriving.data[0]  # it streamed


def test_a_nan_norm_bound_holds_every_update_back():
    """NaN compares false with everything: a bound of NaN must refuse, not wave through."""
    values = state()
    chunks = stream(values, make_codec("none"))
    refused(chunks, expected_for(values, max_norm=float("nan")), "over the bound nan")
