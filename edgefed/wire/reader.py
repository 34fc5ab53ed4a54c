"""Reading a StatePayload as it arrives: every tensor checked (CRC32C, name, shape, dtype, codec, finite
values, the norm bound) with its bytes left where they arrived (framing.py reads the fields).

A tensor's data is checked while it streams in, chunk by chunk, while the bytes gRPC just wrote are
still in the CPU's cache: its CRC32C and, for lossless float values, its sum of squares. Only what
that could not cover (the header, the small scales and indices, a value split by a chunk edge) is
read when the tensor's last byte is in. Checked later, the same bytes come back from main memory at
up to twice the cost (benchmarks/results/comm.md measures the receive path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import crc32c
from google.protobuf.message import DecodeError

from edgefed.types import EncodedTensor, Pieces
from edgefed.values import NUMPY_FLOATS, square_sum, whole_values
from edgefed.wire.framing import (
    EMPTY,
    HEADER_BYTES,
    LENGTH_DELIMITED,
    STATE_TENSORS,
    TENSOR_BYTES,
    TENSOR_PADDING,
    CheckingCodec,
    Expected,
    Received,
    WireError,
    field_at,
    parse_field,
    split_fields,
)
from edgefed.wire.v1 import federation_pb2 as pb

TENSOR_DATA = min(TENSOR_BYTES)  # pb.Tensor.data: the field that streams


@dataclass
class Arriving:
    """What has been checked of the tensor whose bytes are arriving."""

    start: int  # its Tensor message's first byte in the payload
    end: int  # and the byte after its last
    next_field: int  # the first of its fields not yet walked
    header: list[bytes] = field(default_factory=list)  # its fields before data (name, shape, ...)
    data: tuple[int, int] | None = None  # where its data's bytes lie, once that field is reached
    unusual: bool = False  # fields out of edgefed's order: the tensor is read whole when complete
    floats: str | None = None  # the dtype whose squares are summed as they come (lossless floats)
    itemsize: int = 1  # of `floats`: data is checked in whole values
    done: int = 0  # data's bytes before this one are in `crc` (and `squares`)
    crc: int = 0
    squares: float = 0.0


def parse_state(
    payload: bytes | memoryview | Received, codec: CheckingCodec, expected: Expected
) -> dict[str, Any]:
    """Decode and check every tensor; returns them as the codec decodes them (torch tensors on the CPU in
    their own dtypes, or numpy arrays)."""
    encoded, decoded = parse_encoded(payload, codec, expected)
    return {item.name: decoded[item.name] if item.name in decoded else codec.decode(item) for item in encoded}


def parse_encoded(
    payload: bytes | memoryview | Received, codec: CheckingCodec, expected: Expected
) -> tuple[list[EncodedTensor], dict[str, Any]]:
    """Check every tensor (names, shapes, dtypes, codec, CRC32C, finite values, the norm bound) and
    return them still encoded: a server aggregates quantised deltas without decoding them. The second
    value holds the tensors the checks had to decode (those without a quantised form), by name."""
    return PayloadReader(codec, expected).finish(payload)


class PayloadReader:
    """Reads and checks a serialised StatePayload, as its bytes arrive or whole: each tensor is parsed
    (its bytes fields left as views into the payload) and checked — CRC32C, name, shape, dtype, codec,
    finite values — its data as it streams in and the rest as soon as its last byte is in, while later
    chunks are still on the wire; `finish` checks the whole (every expected name once, none missing,
    the norm bound)."""

    def __init__(self, codec: CheckingCodec, expected: Expected) -> None:
        self.codec, self.expected = codec, expected
        self.position = 0  # where the next unread top-level field starts
        self.arriving: Arriving | None = None
        self.tensors: list[EncodedTensor] = []
        self.decoded: dict[str, Any] = {}  # tensors the checks had to decode, by name
        self.unknown: list[str] = []
        self.names: set[str] = set()
        self.squares = 0.0

    def feed(self, buffer: Received, filled: int) -> None:
        """Read every tensor that lies within the first `filled` bytes and has not been read, and what
        has arrived of the next one's data."""
        while (found := self._next(buffer, filled)) is not None:
            _, _, value, end = found
            arriving = self.arriving if self.arriving is not None and self.arriving.start == value else None
            if arriving is not None and (arriving.unusual or arriving.data is None or arriving.data[1] > end):
                arriving = None  # read it whole
            self._check(*self._tensor(buffer, value, end, arriving), buffer, arriving)
            self.position, self.arriving = end, None
        if self.position < filled:
            self._stream(buffer, filled)

    def finish(self, payload: bytes | memoryview | Received) -> tuple[list[EncodedTensor], dict[str, Any]]:
        """The checked tensors, still encoded, and those the checks decoded; WireError when any is wrong."""
        if not isinstance(payload, Received):
            payload = Received((memoryview(payload),))
        self.feed(payload, len(payload))
        if self.position != len(payload):
            raise WireError("payload is not a StatePayload message (cut short)")
        if self.expected.shapes is not None and self.names != set(self.expected.shapes):
            missing = sorted(set(self.expected.shapes) - self.names)
            raise WireError(
                f"tensors do not match the model: unknown {sorted(self.unknown)[:3]}, missing {missing[:3]}"
            )
        norm, bound = math.sqrt(self.squares), self.expected.max_norm
        if bound is not None and not norm <= bound:  # a NaN bound holds nothing back: refuse
            raise WireError(f"update norm {norm:.4g} over the bound {bound:.4g}")
        return self.tensors, self.decoded

    def _next(self, buffer: Received, filled: int) -> tuple[int, int, int, int] | None:
        try:
            found = field_at(buffer, self.position, filled)
        except WireError as error:
            raise WireError(f"payload is not a StatePayload message ({error})") from None
        if found is not None and (found[0] != STATE_TENSORS or found[1] != LENGTH_DELIMITED):
            raise WireError(f"payload is not a StatePayload message (field {found[0]} at the top level)")
        return found

    def _stream(self, buffer: Received, filled: int) -> None:
        """Check what has arrived of the data of the tensor that is arriving. Anything odd stops it
        here: the tensor's checks, when it is complete, find and name the problem."""
        try:
            arriving = self.arriving or self._arriving(buffer, filled)
            if arriving is None or arriving.unusual:
                return
            if arriving.data is None and not self._walk(arriving, buffer, filled):
                return
        except (WireError, DecodeError):
            return
        for piece in buffer.pieces(arriving.done, min(arriving.data[1], filled)):
            whole = len(piece) - len(piece) % arriving.itemsize
            if whole:
                arriving.crc = crc32c.crc32c(piece[:whole], arriving.crc)
                if arriving.floats:
                    arriving.squares += square_sum(piece[:whole], arriving.floats)
                arriving.done += whole
            if whole < len(piece):  # a value split by a chunk edge: checked with the whole tensor
                return

    def _arriving(self, buffer: Received, filled: int) -> Arriving | None:
        entry = parse_field(
            buffer.read(self.position, min(self.position + HEADER_BYTES, filled)), self.position
        )
        if entry is None or entry[:2] != (STATE_TENSORS, LENGTH_DELIMITED):
            return None
        self.arriving = Arriving(entry[2], entry[3], entry[2])
        return self.arriving

    def _walk(self, arriving: Arriving, buffer: Received, filled: int) -> bool:
        """Walk the tensor's fields that have arrived up to its data; True once data is reached."""
        while arriving.next_field < min(arriving.end, filled):
            head = buffer.read(arriving.next_field, min(arriving.next_field + HEADER_BYTES, filled))
            found = parse_field(head, arriving.next_field)
            if found is None:
                return False
            number, wire, value, stop = found
            if number == TENSOR_DATA and wire == LENGTH_DELIMITED:
                arriving.data, arriving.done = (value, stop), value
                header = pb.Tensor.FromString(b"".join(arriving.header))
                lossless = getattr(self.codec, "lossless", False) and header.codec == self.codec.spec
                if lossless and header.dtype in NUMPY_FLOATS:
                    arriving.floats, arriving.itemsize = header.dtype, NUMPY_FLOATS[header.dtype]().itemsize
                return True
            if stop > filled:
                return False
            if number in TENSOR_BYTES:  # scales or indices before data: not edgefed's order
                arriving.unusual = True
                return False
            if number not in TENSOR_PADDING:
                arriving.header.append(bytes(buffer.read(arriving.next_field, stop)))
            arriving.next_field = stop
        return False

    @staticmethod
    def _tensor(
        buffer: Received, start: int, end: int, arriving: Arriving | None
    ) -> tuple[EncodedTensor, int]:
        """The tensor in [start, end), its bytes fields views into `buffer`, and its CRC32C field;
        with what streamed in (`arriving`), only the fields after its data are left to walk."""
        try:
            if arriving is None:
                rest, found = split_fields(buffer, start, end, TENSOR_BYTES, TENSOR_PADDING)
            else:
                after, found = split_fields(buffer, arriving.data[1], end, TENSOR_BYTES, TENSOR_PADDING)
                if TENSOR_DATA in found:
                    raise WireError(f"field {TENSOR_DATA} is malformed or repeated")
                rest, found[TENSOR_DATA] = b"".join([*arriving.header, after]), buffer.field(*arriving.data)
            header = pb.Tensor.FromString(rest)
        except (WireError, DecodeError) as error:
            raise WireError(f"payload is not a StatePayload message ({error or 'undecodable'})") from None
        data, scales, indices = (found.get(number, EMPTY) for number in sorted(TENSOR_BYTES))
        encoded = EncodedTensor(
            header.name, tuple(header.shape), header.dtype, header.codec, data, scales, indices
        )
        return encoded, header.crc32c

    def _check(self, encoded: EncodedTensor, crc: int, buffer: Received, arriving: Arriving | None) -> None:
        streamed = arriving is not None and len(encoded.data) > 0  # its data, checked as it came
        rest = Pieces(buffer.pieces(arriving.done, arriving.data[1])) if streamed else encoded.data
        checksum = arriving.crc if streamed else 0
        for part in (*Pieces.of(rest), *Pieces.of(encoded.scales), *Pieces.of(encoded.indices)):
            checksum = crc32c.crc32c(part, checksum)
        if checksum != crc:
            raise WireError(f"tensor {encoded.name}: CRC32C mismatch")
        if encoded.name in self.names:
            raise WireError("a tensor name appears twice")
        self.names.add(encoded.name)
        shapes = self.expected.shapes
        if shapes is not None and encoded.name not in shapes:
            self.unknown.append(encoded.name)  # reported with the missing ones, in `finish`
            return
        shape, dtype = shapes[encoded.name] if shapes is not None else (encoded.shape, encoded.dtype)
        if encoded.shape != tuple(shape) or encoded.dtype != dtype:
            raise WireError(
                f"tensor {encoded.name}: {encoded.dtype}{list(encoded.shape)} where "
                f"{dtype}{list(shape)} is expected"
            )
        if encoded.codec != self.codec.spec:
            raise WireError(
                f"tensor {encoded.name}: codec '{encoded.codec}', this run uses '{self.codec.spec}'"
            )
        try:
            if streamed and arriving.floats:  # lossless floats: their squares, mostly summed already
                itemsize = arriving.itemsize
                if len(encoded.data) != encoded.numel * itemsize:
                    raise ValueError(
                        f"tensor {encoded.name}: data holds {len(encoded.data)} bytes, "
                        f"{encoded.numel * itemsize} expected"
                    )
                parts = whole_values(rest, itemsize)
                squares, value = arriving.squares + sum(square_sum(p, arriving.floats) for p in parts), None
            else:
                squares, value = self.codec.square_sum(encoded)
        except ValueError as error:
            raise WireError(str(error)) from None
        if not math.isfinite(squares):
            raise WireError(f"tensor {encoded.name}: NaN or Inf values")
        self.squares += squares
        self.tensors.append(encoded)
        if value is not None:
            self.decoded[encoded.name] = value
