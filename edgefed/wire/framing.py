"""States on the wire: encoded tensors → one StatePayload → a stream of ≤ 1 MiB Chunks, and back.

Everything that arrives is checked before it can touch a server's state: chunk order and
completeness, the run, round and client it claims, the size limit, each tensor's sha256 (which
covers every byte of tensor data; the rest of the payload is checked field by field), its name,
shape and dtype against what is expected, finiteness, and the update's norm. A failed check raises
`WireError`, whose text is meant for the sender.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from edgefed.codecs import Codec
from edgefed.kernels import dequantize_blockwise
from edgefed.types import EncodedTensor
from edgefed.wire.v1 import federation_pb2 as pb

CHUNK_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 256 << 20
# gRPC frames every message with a 1-byte compression flag and a 4-byte length.
GRPC_PREFIX_BYTES = 5


class WireError(Exception):
    """A message that breaks the protocol; nothing from it has been applied."""


@dataclass(frozen=True)
class Expected:
    """Where a stream must come from, and what its tensors must look like."""

    run_id: str
    round: int
    shapes: dict[str, tuple[tuple[int, ...], str]] | None  # name -> (shape, dtype); None: any (setup)
    client_id: str | None = None
    max_bytes: int = MAX_PAYLOAD_BYTES
    max_norm: float | None = None  # L2 bound over the whole update


def wire_size(message) -> int:
    """Bytes a protobuf message costs as a gRPC message (HTTP/2 and TLS framing not included)."""
    return message.ByteSize() + GRPC_PREFIX_BYTES


def tensor_digest(tensor: EncodedTensor) -> bytes:
    digest = hashlib.sha256(tensor.data)  # field by field: concatenating would copy the tensor
    digest.update(tensor.scales)
    digest.update(tensor.indices)
    return digest.digest()


def tensor_message(tensor: EncodedTensor) -> pb.Tensor:
    """The wire form of an encoded tensor, with the sha256 of its bytes."""
    return pb.Tensor(
        name=tensor.name,
        shape=list(tensor.shape),
        dtype=tensor.dtype,
        codec=tensor.codec,
        data=tensor.data,
        scales=tensor.scales,
        indices=tensor.indices,
        sha256=tensor_digest(tensor),
    )


def encoded_from_message(message: pb.Tensor) -> EncodedTensor:
    """The encoded tensor a message carries; WireError when its bytes do not match its sha256."""
    encoded = EncodedTensor(
        message.name,
        tuple(message.shape),
        message.dtype,
        message.codec,
        message.data,
        message.scales,
        message.indices,
    )
    if tensor_digest(encoded) != message.sha256:
        raise WireError(f"tensor {message.name}: sha256 mismatch")
    return encoded


def serialize_state(tensors: Iterable[EncodedTensor]) -> bytes:
    return pb.StatePayload(tensors=[tensor_message(t) for t in tensors]).SerializeToString()


def chunk_stream(
    payload: bytes,
    run_id: str,
    round_number: int,
    client_id: str = "",
    chunk_bytes: int = CHUNK_BYTES,
    **first_chunk: float,
) -> Iterator[pb.Chunk]:
    """The payload in order; `first_chunk` fields (num_examples, train_loss, steps, train_s) go on chunk 0."""
    count = max(1, math.ceil(len(payload) / chunk_bytes))
    for index in range(count):
        last = index == count - 1
        yield pb.Chunk(
            run_id=run_id,
            round=round_number,
            client_id=client_id,
            index=index,
            last=last,
            data=payload[index * chunk_bytes : (index + 1) * chunk_bytes],
            **(first_chunk if index == 0 else {}),
        )


def reassemble(chunks: Iterable[pb.Chunk], expected: Expected) -> tuple[bytes, pb.Chunk]:
    """The payload and its first chunk (which carries n_k and the training loss)."""
    parts, first, size = [], None, 0
    for chunk in chunks:
        if chunk.index != len(parts):
            raise WireError(f"chunk {chunk.index} arrived where chunk {len(parts)} was due")
        if chunk.run_id != expected.run_id:
            raise WireError(f"wrong run id '{chunk.run_id}'")
        if chunk.round != expected.round:
            raise WireError(f"round {chunk.round} is not the current round {expected.round}")
        if expected.client_id is not None and chunk.client_id != expected.client_id:
            raise WireError(f"chunk from '{chunk.client_id}' in the stream of '{expected.client_id}'")
        data = chunk.data  # each access to a bytes field copies it
        size += len(data)
        if size > expected.max_bytes:
            raise WireError(f"payload over the {expected.max_bytes}-byte limit")
        first = first or chunk
        parts.append(data)
        if chunk.last:
            return b"".join(parts), first
    raise WireError(f"stream ended after {len(parts)} chunks without its last one (truncated)")


def parse_state(payload: bytes, codec: Codec, expected: Expected) -> dict[str, torch.Tensor]:
    """Decode and check every tensor; returns tensors on the CPU in their own dtypes."""
    encoded, decoded = parse_encoded(payload, codec, expected)
    return {item.name: decoded[item.name] if item.name in decoded else codec.decode(item) for item in encoded}


def parse_encoded(
    payload: bytes, codec: Codec, expected: Expected
) -> tuple[list[EncodedTensor], dict[str, torch.Tensor]]:
    """Check every tensor (names, shapes, dtypes, codec, sha256, finite values, the norm bound) and
    return them still encoded: a server aggregates quantised deltas without decoding them. The second
    value holds the tensors the checks had to decode (those without a quantised form), by name."""
    message = pb.StatePayload()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise WireError("payload is not a StatePayload message") from None
    names = [tensor.name for tensor in message.tensors]
    if len(set(names)) != len(names):
        raise WireError("a tensor name appears twice")
    if expected.shapes is not None and set(names) != set(expected.shapes):
        unknown, missing = (
            sorted(set(names) - set(expected.shapes)),
            sorted(set(expected.shapes) - set(names)),
        )
        raise WireError(f"tensors do not match the model: unknown {unknown[:3]}, missing {missing[:3]}")
    checked, decoded, squares = [], {}, 0.0
    for tensor in message.tensors:
        encoded = encoded_from_message(tensor)
        shape, dtype = (
            expected.shapes[tensor.name] if expected.shapes is not None else (encoded.shape, encoded.dtype)
        )
        if encoded.shape != tuple(shape) or encoded.dtype != dtype:
            raise WireError(
                f"tensor {tensor.name}: {encoded.dtype}{list(encoded.shape)} where "
                f"{dtype}{list(shape)} is expected"
            )
        if encoded.codec != codec.spec:
            raise WireError(f"tensor {tensor.name}: codec '{encoded.codec}', this run uses '{codec.spec}'")
        try:
            square_sum, value = squares_of(codec, encoded)
        except ValueError as error:
            raise WireError(str(error)) from None
        if not math.isfinite(square_sum):
            raise WireError(f"tensor {tensor.name}: NaN or Inf values")
        squares += square_sum
        checked.append(encoded)
        if value is not None:
            decoded[encoded.name] = value
    if expected.max_norm is not None and math.sqrt(squares) > expected.max_norm:
        raise WireError(f"update norm {math.sqrt(squares):.4g} over the bound {expected.max_norm:.4g}")
    return checked, decoded


def squares_of(codec: Codec, encoded: EncodedTensor) -> tuple[float, torch.Tensor | None]:
    """Σ x² over a tensor's values (NaN or Inf when a value is not finite), and the decoded tensor when
    decoding was needed for it. A quantised tensor's sum comes from its q and scales, Σ_b scale_b²·Σ q²,
    in float64 and without decoding: its q are finite by construction, so its values are when its
    scales are. ValueError when the fields do not fit the shape."""
    quantized = codec.quantized(encoded)
    if quantized is not None:
        q, scales = quantized
        per_block = dequantize_blockwise(q, torch.ones_like(scales)).double().view(scales.numel(), -1)
        return float((per_block.square().sum(dim=1) * scales.double().square()).sum()), None
    value = codec.decode(encoded)
    flat = value.reshape(-1).float()
    square_sum = float(torch.dot(flat, flat))  # one BLAS pass; NaN and Inf propagate into it
    if math.isinf(square_sum) and bool(torch.isfinite(flat).all()):
        square_sum = float(flat.double().square().sum())  # finite, but squares beyond float32
    return square_sum, value
