"""States on the wire: encoded tensors → one StatePayload → a stream of ≤ 1 MiB Chunks, and back.

Everything that arrives is checked before it can touch a server's state: chunk order and
completeness, the run, round and client it claims, the size limit, each tensor's CRC32C (which
covers every byte of tensor data; the rest of the payload is checked field by field), its name,
shape and dtype against what is expected, finiteness, and the update's norm. A failed check raises
`WireError`, whose text is meant for the sender.

The checksum guards against accidental corruption only (the sender computes it; the bearer token
and TLS are what authenticate), so it is CRC32C, which hardware computes at memory speed, not a
cryptographic hash. The receive path copies no tensor bytes: each chunk's data is a view into the
bytes gRPC handed over (`ChunkView`), the payload is the sequence of those views (`Received`), and a
tensor's bytes fields are views into it, `Pieces` of several where a field spans chunks
(`split_fields`), read without protobuf, which copies every bytes field it parses. The checks read
the pieces in place; a tensor is joined into one buffer (the one copy it costs) when it is first read.

Framing 2 (`FRAMING`) puts the values where the checks read them fastest: in a payload every bytes
field of a tensor of 4 KiB or more starts at a multiple of `ALIGN` bytes (padding fields before them,
written by wire/sending.py), every chunk but the last carries a multiple of `ALIGN` bytes, and a chunk's data
starts at a multiple of `ALIGN` bytes into its message, so the values lie aligned in the very bytes
gRPC received (memory from malloc, at least 16-byte aligned). A chunk of any other framing is
refused with a clear error: framing 1 left values wherever the headers put them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c
from google.protobuf.message import DecodeError

from edgefed.types import EncodedTensor, Pieces
from edgefed.wire.v1 import federation_pb2 as pb

CHUNK_BYTES = 1 << 20
FRAMING = 2  # Chunk.framing: values aligned to ALIGN bytes (see above)
ALIGN = 64  # a cache line, and a multiple of every dtype's size and of SIMD loads' alignment
MAX_PAYLOAD_BYTES = 256 << 20
# gRPC frames every message with a 1-byte compression flag and a 4-byte length.
GRPC_PREFIX_BYTES = 5


class WireError(Exception):
    """A message that breaks the protocol; nothing from it has been applied."""


class CheckingCodec(Protocol):
    """What reading a payload needs of a codec (edgefed.codecs.Codec on torch; the torch-free device
    runtime's numpy codecs, edgefed/ort/arrays.py): this module imports neither."""

    @property
    def spec(self) -> str: ...

    def decode(self, encoded: EncodedTensor) -> Any: ...

    def square_sum(self, encoded: EncodedTensor) -> tuple[float, Any]:
        """Σ x² over the tensor's values (NaN or Inf when one is not finite), and the decoded tensor when
        the sum needed it (else None); ValueError when its fields do not fit its shape."""


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


def tensor_checksum(tensor: EncodedTensor) -> int:
    """CRC32C of a tensor's data, scales and indices, in that order (piece by piece: no concatenation)."""
    value = 0
    for field in (tensor.data, tensor.scales, tensor.indices):
        for part in Pieces.of(field):
            value = crc32c.crc32c(part, value)
    return value


def tensor_message(tensor: EncodedTensor) -> pb.Tensor:
    """The wire form of an encoded tensor, with the CRC32C of its bytes."""
    return pb.Tensor(
        name=tensor.name,
        shape=list(tensor.shape),
        dtype=tensor.dtype,
        codec=tensor.codec,
        data=tensor.data,
        scales=tensor.scales,
        indices=tensor.indices,
        crc32c=tensor_checksum(tensor),
    )


def encoded_from_message(message: pb.Tensor) -> EncodedTensor:
    """The encoded tensor a parsed message carries; WireError when its bytes do not match their CRC32C."""
    return checked_tensor(message, message.data, message.scales, message.indices)


def checked_tensor(header: pb.Tensor, data, scales, indices) -> EncodedTensor:
    encoded = EncodedTensor(
        header.name, tuple(header.shape), header.dtype, header.codec, data, scales, indices
    )
    if tensor_checksum(encoded) != header.crc32c:
        raise WireError(f"tensor {header.name}: CRC32C mismatch")
    return encoded


# -- reading protobuf's wire format without copying bytes fields -----------------------------------------
# Wire types (protobuf encoding): a varint, 8 bytes, a length and that many bytes, 4 bytes.
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


def _varint(buffer: memoryview, position: int, limit: int) -> tuple[int, int] | None:
    """The varint at `position` and the position after it; None when it runs past `limit`."""
    value = shift = 0
    while position < limit:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise WireError("a varint longer than 10 bytes")
    return None


class Received:
    """A payload as the views of the chunks it arrived in, in order (nothing copied)."""

    __slots__ = ("parts", "size", "starts")

    def __init__(self, parts: Iterable[memoryview] = ()) -> None:
        self.parts: list[memoryview] = []
        self.starts: list[int] = []
        self.size = 0
        for part in parts:
            self.append(part)

    def append(self, part: memoryview) -> None:
        if len(part):
            self.starts.append(self.size)
            self.parts.append(part)
            self.size += len(part)

    def __len__(self) -> int:
        return self.size

    def pieces(self, start: int, end: int) -> tuple[memoryview, ...]:
        """The bytes [start, end) as views, one per chunk they lie in."""
        index = bisect.bisect_right(self.starts, start) - 1
        base = self.starts[index] if index >= 0 else 0
        if index >= 0 and end <= base + len(self.parts[index]):  # within one chunk: most fields
            return (self.parts[index][start - base : end - base],) if start < end else ()
        out = []
        while start < end:
            part, base = self.parts[index], self.starts[index]
            stop = min(end, base + len(part))
            out.append(part[start - base : stop - base])
            start, index = stop, index + 1
        return tuple(out)

    def part_at(self, position: int) -> tuple[memoryview, int]:
        """The chunk that holds byte `position`, and where it starts."""
        index = bisect.bisect_right(self.starts, position) - 1
        return self.parts[index], self.starts[index]

    def read(self, start: int, end: int) -> memoryview:
        """The bytes [start, end): a view where they lie in one chunk, else a copy (for small fields)."""
        pieces = self.pieces(start, min(end, self.size))
        return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))

    def field(self, start: int, end: int) -> memoryview | Pieces:
        pieces = self.pieces(start, end)
        return EMPTY if not pieces else pieces[0] if len(pieces) == 1 else Pieces(pieces)


# The longest field header edgefed reads: a key and a length, 10-byte varints at most.
HEADER_BYTES = 20


def field_at(buffer: Received, position: int, limit: int) -> tuple[int, int, int, int] | None:
    """The field that starts at `position` — (number, wire type, value start, end) — or None when it
    does not end by `limit` (its bytes have not all arrived)."""
    return parse_field(buffer.read(position, min(position + HEADER_BYTES, limit)), position, limit)


def parse_field(head: memoryview, position: int, limit: float = math.inf) -> tuple[int, int, int, int] | None:
    """`field_at` of the field at `position` whose first bytes are `head` (its header, or all there is
    up to `limit`): None when its header or its end lies past them."""
    if head and head[0] < 0x80:  # a one-byte key: every field edgefed writes but a Chunk's data
        key = (head[0], 1)
    elif (key := _varint(head, 0, len(head))) is None:
        return None
    (number, wire), value = divmod(key[0], 8), key[1]
    if number == 0:
        raise WireError("a field numbered 0")
    if wire in (VARINT, LENGTH_DELIMITED):
        parsed = _varint(head, value, len(head))
        if parsed is None:
            return None
        end = parsed[1] if wire == VARINT else parsed[1] + parsed[0]
        value = value if wire == VARINT else parsed[1]
    elif wire in (FIXED64, FIXED32):
        end = value + (8 if wire == FIXED64 else 4)
    else:
        raise WireError(f"a field of wire type {wire}, which edgefed never sends")
    return (number, wire, position + value, position + end) if position + end <= limit else None


def split_fields(
    buffer: Received, start: int, end: int, wanted: frozenset[int], padding: frozenset[int] = frozenset()
) -> tuple[bytes, dict[int, memoryview | Pieces]]:
    """The `wanted` bytes fields of the message at [start, end) as views into `buffer`, and the rest of
    its fields serialised (small: parse it with protobuf), the `padding` fields left out. A wanted
    field that appears twice is refused."""
    part, base = buffer.part_at(start) if start < end else (EMPTY, 0)
    if end <= base + len(part):  # within one chunk: most messages, every Chunk
        return split_view(part, start - base, end - base, wanted, padding)
    rest, found = [], {}  # a message across chunks (a large tensor): a few fields, read one by one
    while start < end:
        field = field_at(buffer, start, end)
        if field is None:
            raise WireError("a message cut short")
        number, wire, value, stop = field
        if number in wanted:
            if wire != LENGTH_DELIMITED or number in found:
                raise WireError(f"field {number} is malformed or repeated")
            found[number] = buffer.field(value, stop)
        elif number not in padding:
            rest.append(buffer.read(start, stop))
        start = stop
    return b"".join(rest), found


def split_view(
    view: memoryview, start: int, end: int, wanted: frozenset[int], padding: frozenset[int] = frozenset()
) -> tuple[bytes, dict[int, memoryview | Pieces]]:
    """`split_fields` of a message that lies in one view, in one loop: what a server does for every
    chunk and most tensors, so it calls nothing per field but for long varints."""
    runs, found = [], {}
    run = -1  # where the current run of fields for protobuf began (-1: none open)
    position = start
    while position < end:
        field_start = position
        if view[position] < 0x80:
            key, position = view[position], position + 1
        elif (parsed := _varint(view, position, end)) is not None:
            key, position = parsed
        else:
            raise WireError("a message cut short")
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("a field numbered 0")
        if wire in (VARINT, LENGTH_DELIMITED):
            if position < end and view[position] < 0x80:
                length, position = view[position], position + 1
            elif (parsed := _varint(view, position, end)) is not None:
                length, position = parsed
            else:
                raise WireError("a message cut short")
            value = position
            position += length if wire == LENGTH_DELIMITED else 0
        elif wire in (FIXED64, FIXED32):
            value, position = position, position + (8 if wire == FIXED64 else 4)
        else:
            raise WireError(f"a field of wire type {wire}, which edgefed never sends")
        if position > end:
            raise WireError("a message cut short")
        if number in wanted or number in padding:
            if run >= 0:
                runs.append(view[run:field_start])
                run = -1
            if number in wanted:
                if wire != LENGTH_DELIMITED or number in found:
                    raise WireError(f"field {number} is malformed or repeated")
                found[number] = view[value:position]
        elif run < 0:
            run = field_start
    if run >= 0:
        runs.append(view[run:end])
    return b"".join(runs), found


CHUNK_DATA = 17  # pb.Chunk.data
CHUNK_PADDING = frozenset({16})  # pb.Chunk.data_align
CHUNK_FIELDS = frozenset({CHUNK_DATA})
TENSOR_BYTES = frozenset({11, 13, 15})  # pb.Tensor.data, .scales, .indices
TENSOR_PADDING = frozenset({10, 12, 14})  # the *_align fields before them
STATE_TENSORS = 1  # pb.StatePayload.tensors
EMPTY = memoryview(b"")


class ChunkView:
    """A Chunk received as its serialised bytes (the server's PushUpdate deserialiser is the identity):
    its data is a view into those bytes, its other fields a parsed pb.Chunk (`ChunkView(raw).round`)."""

    __slots__ = ("data", "header", "size")

    def __init__(self, raw: bytes) -> None:
        try:
            rest, found = split_view(memoryview(raw), 0, len(raw), CHUNK_FIELDS, CHUNK_PADDING)
            self.header = pb.Chunk.FromString(rest)
        except (WireError, DecodeError) as error:
            raise WireError(f"a message that is not a Chunk ({error or 'undecodable'})") from None
        self.data = found.get(CHUNK_DATA, EMPTY)
        self.size = len(raw)

    def __getattr__(self, name: str):
        return getattr(self.header, name)

    def ByteSize(self) -> int:  # protobuf's name, so that wire_size takes either
        return self.size


def reassemble(
    chunks: Iterable[pb.Chunk | ChunkView],
    expected: Expected,
    on_data: Callable[[Received, int], None] = lambda buffer, filled: None,
) -> tuple[Received, pb.Chunk | ChunkView]:
    """The payload (the chunks' data, in order, not copied) and its first chunk (which carries its
    size, n_k and the training loss). `on_data(payload, filled)` after each chunk: the first `filled`
    bytes are in (a PayloadReader checks what it can while the rest is on the wire)."""
    payload, first, total, count = Received(), None, 0, 0
    for chunk in chunks:
        if chunk.framing != FRAMING:
            raise WireError(
                f"a chunk of framing {chunk.framing or 1}; this edgefed reads framing {FRAMING} (values "
                f"aligned to {ALIGN} bytes): run the same edgefed version on both ends"
            )
        if chunk.index != count:
            raise WireError(f"chunk {chunk.index} arrived where chunk {count} was due")
        if chunk.run_id != expected.run_id:
            raise WireError(f"wrong run id '{chunk.run_id}'")
        if chunk.round != expected.round:
            raise WireError(f"round {chunk.round} is not the current round {expected.round}")
        if expected.client_id is not None and chunk.client_id != expected.client_id:
            raise WireError(f"chunk from '{chunk.client_id}' in the stream of '{expected.client_id}'")
        if first is None:
            first, total = chunk, chunk.payload_bytes
            if not 0 <= total <= expected.max_bytes:
                raise WireError(f"a payload of {total} bytes; the limit is {expected.max_bytes}")
        data = chunk.data  # a view for a ChunkView; a copy for a parsed Chunk
        if len(payload) + len(data) > total:
            raise WireError(f"chunks carry more than the {total} bytes the first one announced")
        payload.append(memoryview(data))
        count += 1
        on_data(payload, len(payload))
        if chunk.last:
            if len(payload) != total:
                raise WireError(f"stream ended after {len(payload)} of the {total} bytes it announced")
            return payload, first
    raise WireError(f"stream ended after {count} chunks without its last one (truncated)")
