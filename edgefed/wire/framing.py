"""States on the wire: encoded tensors → one StatePayload → a stream of ≤ 1 MiB Chunks, and back.

Everything that arrives is checked before it can touch a server's state: chunk order and
completeness, the run, round and client it claims, the size limit, the whole payload's sha256,
each tensor's sha256, its name, shape and dtype against what is expected, finiteness, and the
update's norm. A failed check raises `WireError`, whose text is meant for the sender.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from edgefed.codecs import Codec, EncodedTensor
from edgefed.wire.v1 import federation_pb2 as pb

CHUNK_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 256 << 20


class WireError(Exception):
    """A message that breaks the protocol; nothing from it has been applied."""


@dataclass(frozen=True)
class Expected:
    """Where a stream must come from, and what its tensors must look like."""

    run_id: str
    round: int
    shapes: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    client_id: str | None = None
    max_bytes: int = MAX_PAYLOAD_BYTES
    max_norm: float | None = None  # L2 bound over the whole update


def tensor_digest(tensor: EncodedTensor) -> bytes:
    return hashlib.sha256(tensor.data + tensor.scales + tensor.indices).digest()


def serialize_state(tensors: Iterable[EncodedTensor]) -> bytes:
    messages = [
        pb.Tensor(
            name=t.name,
            shape=list(t.shape),
            dtype=t.dtype,
            codec=t.codec,
            data=t.data,
            scales=t.scales,
            indices=t.indices,
            sha256=tensor_digest(t),
        )
        for t in tensors
    ]
    return pb.StatePayload(tensors=messages).SerializeToString()


def chunk_stream(
    payload: bytes,
    run_id: str,
    round_number: int,
    client_id: str = "",
    chunk_bytes: int = CHUNK_BYTES,
    num_examples: int = 0,
    train_loss: float = 0.0,
) -> Iterator[pb.Chunk]:
    count = max(1, math.ceil(len(payload) / chunk_bytes))
    digest = hashlib.sha256(payload).digest()
    for index in range(count):
        last = index == count - 1
        yield pb.Chunk(
            run_id=run_id,
            round=round_number,
            client_id=client_id,
            index=index,
            last=last,
            data=payload[index * chunk_bytes : (index + 1) * chunk_bytes],
            payload_sha256=digest if last else b"",
            num_examples=num_examples if index == 0 else 0,
            train_loss=train_loss if index == 0 else 0.0,
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
        size += len(chunk.data)
        if size > expected.max_bytes:
            raise WireError(f"payload over the {expected.max_bytes}-byte limit")
        first = first or chunk
        parts.append(chunk.data)
        if chunk.last:
            payload = b"".join(parts)
            if hashlib.sha256(payload).digest() != chunk.payload_sha256:
                raise WireError("payload sha256 mismatch")
            return payload, first
    raise WireError(f"stream ended after {len(parts)} chunks without its last one (truncated)")


def parse_state(payload: bytes, codec: Codec, expected: Expected) -> dict[str, torch.Tensor]:
    """Decode and check every tensor; returns float tensors on the CPU."""
    message = pb.StatePayload()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise WireError("payload is not a StatePayload message") from None
    names = [tensor.name for tensor in message.tensors]
    if len(set(names)) != len(names):
        raise WireError("a tensor name appears twice")
    if set(names) != set(expected.shapes):
        unknown, missing = (
            sorted(set(names) - set(expected.shapes)),
            sorted(set(expected.shapes) - set(names)),
        )
        raise WireError(f"tensors do not match the model: unknown {unknown[:3]}, missing {missing[:3]}")
    state, squares = {}, 0.0
    for tensor in message.tensors:
        encoded = EncodedTensor(
            tensor.name,
            tuple(tensor.shape),
            tensor.dtype,
            tensor.codec,
            tensor.data,
            tensor.scales,
            tensor.indices,
        )
        if tensor_digest(encoded) != tensor.sha256:
            raise WireError(f"tensor {tensor.name}: sha256 mismatch")
        shape, dtype = expected.shapes[tensor.name]
        if encoded.shape != tuple(shape) or encoded.dtype != dtype:
            raise WireError(
                f"tensor {tensor.name}: {encoded.dtype}{list(encoded.shape)} where "
                f"{dtype}{list(shape)} is expected"
            )
        if encoded.codec != codec.spec:
            raise WireError(f"tensor {tensor.name}: codec '{encoded.codec}', this run uses '{codec.spec}'")
        try:
            value = codec.decode(encoded)
        except ValueError as error:
            raise WireError(str(error)) from None
        if not torch.isfinite(value).all():
            raise WireError(f"tensor {tensor.name}: NaN or Inf values")
        squares += float(value.double().pow(2).sum())
        state[tensor.name] = value
    if expected.max_norm is not None and math.sqrt(squares) > expected.max_norm:
        raise WireError(f"update norm {math.sqrt(squares):.4g} over the bound {expected.max_norm:.4g}")
    return state
