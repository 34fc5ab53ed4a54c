"""The sending side of the wire: states serialised as StatePayloads and cut into chunks (the receiving
side, which checks them in place, is framing.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edgefed.types import EncodedTensor
from edgefed.wire.framing import CHUNK_BYTES, LENGTH_DELIMITED, STATE_TENSORS, tensor_message
from edgefed.wire.v1 import federation_pb2 as pb


def serialize_state(tensors: Iterable[EncodedTensor]) -> bytes:
    return pb.StatePayload(tensors=[tensor_message(t) for t in tensors]).SerializeToString()


def state_payload_of(tensor_messages: Iterable[bytes]) -> bytes:
    """A serialised StatePayload of already serialised Tensor messages, without parsing them: each is
    field 1, length-delimited (`PayloadReader` checks them as it checks any payload)."""
    key = bytes([STATE_TENSORS << 3 | LENGTH_DELIMITED])
    return b"".join(key + _varint_bytes(len(message)) + message for message in tensor_messages)


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
    """The payload in order. Chunk 0 carries the payload's size and the `first_chunk` fields
    (num_examples, train_loss, steps, train_s, score)."""
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
            **({"payload_bytes": len(payload), **first_chunk} if index == 0 else {}),
        )


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
