"""The sending side of the wire: states serialised as StatePayloads and cut into chunks, both laid out
as framing 2 wants them (values at multiples of `ALIGN` bytes; the receiving side, which checks them
in place, is framing.py and reader.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edgefed.types import EncodedTensor, Pieces
from edgefed.wire.framing import (
    ALIGN,
    CHUNK_BYTES,
    FRAMING,
    LENGTH_DELIMITED,
    STATE_TENSORS,
    TENSOR_BYTES,
    tensor_checksum,
)
from edgefed.wire.v1 import federation_pb2 as pb

Part = bytes | memoryview
ALIGNED_FROM = 4096  # bytes: a field this long pays at most 1.6 % for its padding


def serialize_state(tensors: Iterable[EncodedTensor]) -> bytes:
    """A serialised StatePayload whose tensors' bytes fields of `ALIGNED_FROM` bytes or more each start
    at a multiple of `ALIGN` bytes (after a padding field), written field by field: protobuf cannot
    place them. Smaller fields are read as fast unaligned, and padding would cost them up to 65 bytes
    each: a LoRA state of a small model is mostly small fields. One copy of the tensors' bytes."""
    parts: list[Part] = []
    size = 0
    for tensor in tensors:
        for part in aligned_tensor(tensor, size):
            parts.append(part)
            size += len(part)
    return b"".join(parts)


def aligned_tensor(tensor: EncodedTensor, start: int) -> list[Part]:
    """The StatePayload entry (field 1) of `tensor` when it starts `start` bytes into the payload."""
    header = pb.Tensor(
        name=tensor.name,
        shape=list(tensor.shape),
        dtype=tensor.dtype,
        codec=tensor.codec,
        crc32c=tensor_checksum(tensor),
    ).SerializeToString()  # fields 1-4 and 9: before the bytes fields (protobuf writes by number)
    fields = [
        (number, value)
        for number, value in zip(
            sorted(TENSOR_BYTES), (tensor.data, tensor.scales, tensor.indices), strict=True
        )
        if len(value)
    ]
    size_bytes = 1  # of the entry's length; the padding depends on it, so settle it by trying
    while True:
        parts: list[Part] = [ENTRY_KEY, b"", header]
        position = start + len(ENTRY_KEY) + size_bytes + len(header)
        for number, value in fields:
            head = _varint_bytes(number << 3 | LENGTH_DELIMITED) + _varint_bytes(len(value))
            padding = (
                _padding(number - 1, -(position + len(head)) % ALIGN) if len(value) >= ALIGNED_FROM else b""
            )
            parts += [padding, head, *Pieces.of(value)]
            position += len(padding) + len(head) + len(value)
        length = _varint_bytes(position - (start + len(ENTRY_KEY) + size_bytes))
        if len(length) == size_bytes:
            parts[1] = length
            return parts
        size_bytes = len(length)


def _padding(number: int, size: int) -> bytes:
    """Bytes field `number` (< 16: a one-byte key) of exactly `size` bytes in all, or of `size` +
    ALIGN where `size` is 1 (a field costs at least its key and length)."""
    if size == 0:
        return b""
    size += ALIGN if size == 1 else 0
    return _varint_bytes(number << 3 | LENGTH_DELIMITED) + _varint_bytes(size - 2) + bytes(size - 2)


ENTRY_KEY = bytes([STATE_TENSORS << 3 | LENGTH_DELIMITED])


def state_payload_of(tensor_messages: Iterable[bytes]) -> bytes:
    """A serialised StatePayload of already serialised Tensor messages, without parsing them: each is
    field 1, length-delimited (`PayloadReader` checks them as it checks any payload; their values lie
    where they lie, which costs the checks speed, not correctness)."""
    return b"".join(ENTRY_KEY + _varint_bytes(len(message)) + message for message in tensor_messages)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_stream(
    payload: bytes,
    run_id: str,
    round_number: int,
    client_id: str = "",
    chunk_bytes: int = CHUNK_BYTES,
    **first_chunk: float,
) -> Iterator[pb.Chunk]:
    """The payload in order, in slices of `chunk_bytes` rounded down to a multiple of `ALIGN`. Chunk 0
    carries the payload's size and the `first_chunk` fields (num_examples, train_loss, steps, train_s,
    score). Each chunk's data starts at a multiple of `ALIGN` bytes into its serialised message."""
    step = chunk_bytes - chunk_bytes % ALIGN
    count = max(1, math.ceil(len(payload) / step))
    for index in range(count):
        chunk = pb.Chunk(
            run_id=run_id,
            round=round_number,
            client_id=client_id,
            index=index,
            last=index == count - 1,
            framing=FRAMING,
            **({"payload_bytes": len(payload), **first_chunk} if index == 0 else {}),
        )
        data = payload[index * step : (index + 1) * step]
        # data (field 17) follows everything else: a two-byte key, its length, then its bytes.
        head = chunk.ByteSize() + 2 + len(_varint_bytes(len(data)))
        chunk.data_align = _chunk_padding(-head % ALIGN)
        chunk.data = data
        yield chunk


def _chunk_padding(size: int) -> bytes:
    """The value of Chunk.data_align (field 16: a two-byte key) that makes the field `size` bytes in
    all, or `size` + ALIGN where a field cannot be that small."""
    if size == 0:
        return b""
    size += ALIGN if size < 4 else 0  # a present field costs its key, its length and a byte at least
    return bytes(size - 3)


@dataclass
class EncodedUpdate:
    payload: bytes  # a serialised StatePayload of the encoded delta
    num_examples: int
    train_loss: float
    steps: int
    train_s: float
    score: float | None = None
    energy_j: float | None = None  # measured by the device's power sensors over the local round

    def chunks(
        self, run_id: str, round_number: int, client_id: str, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[pb.Chunk]:
        return chunk_stream(
            self.payload,
            run_id,
            round_number,
            client_id,
            chunk_bytes,
            num_examples=self.num_examples,
            train_loss=self.train_loss,
            steps=self.steps,
            train_s=self.train_s,
            **({} if self.score is None else {"score": self.score}),
            **({} if self.energy_j is None else {"energy_j": self.energy_j}),
        )
