"""States and files on the wire as numpy arrays, for a device without torch.

The wire format is edgefed's (edgefed/wire/framing.py), read and checked by the same `PayloadReader`
(edgefed/wire/reader.py); only the codec differs: `ArrayCodec` is the lossless `none` codec over
numpy, with the finiteness and norm checks the torch codec makes. Files (the runtime's artifacts, its
tokenizer and manifest) travel as uint8 tensors named by file, so they are checked (CRC32C, names,
sizes) as any state is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgefed.types import EncodedTensor, Pieces
from edgefed.wire.framing import Expected, Received
from edgefed.wire.reader import parse_state
from edgefed.wire.sending import serialize_state

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}


class ArrayCodec:
    """The `none` codec over numpy arrays: a tensor's bytes are its little-endian values."""

    spec = "none"

    def encode(self, name: str, array: np.ndarray) -> EncodedTensor:
        dtype = next((key for key, value in DTYPES.items() if value == array.dtype), None)
        if dtype is None:
            raise ValueError(f"{name}: dtype {array.dtype} does not travel (one of {', '.join(DTYPES)})")
        data = np.ascontiguousarray(array, dtype=DTYPES[dtype]).tobytes()
        return EncodedTensor(name, tuple(array.shape), dtype, self.spec, data)

    def decode(self, encoded: EncodedTensor) -> np.ndarray:
        """A writable array (received bytes are read-only views into their chunks: this is their copy)."""
        dtype = self._dtype(encoded)
        data = Pieces(Pieces.of(encoded.data)).join()
        if len(data) != encoded.numel * dtype.itemsize:
            raise ValueError(f"tensor {encoded.name}: data holds {len(data)} bytes for shape {encoded.shape}")
        return np.frombuffer(data, dtype=dtype).reshape(encoded.shape)

    def square_sum(self, encoded: EncodedTensor) -> tuple[float, np.ndarray]:
        """Σ x² in float64 (NaN and Inf propagate into it); 0 for bytes (files), finite by construction
        and not part of any norm."""
        value = self.decode(encoded)
        if value.dtype == np.uint8:
            return 0.0, value
        flat = value.reshape(-1).astype(np.float64)
        return float(np.dot(flat, flat)), value

    @staticmethod
    def _dtype(encoded: EncodedTensor) -> np.dtype:
        if encoded.dtype not in DTYPES:
            raise ValueError(f"tensor {encoded.name}: dtype '{encoded.dtype}' is not one this device reads")
        return DTYPES[encoded.dtype]


ARRAYS = ArrayCodec()


def arrays_payload(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A serialised StatePayload of `arrays`, codec none."""
    return serialize_state(ARRAYS.encode(name, array) for name, array in arrays.items())


def parse_arrays(payload: Received | bytes, expected: Expected) -> dict[str, np.ndarray]:
    """The checked arrays of a payload (WireError when anything is wrong)."""
    return parse_state(payload, ARRAYS, expected)


def files_payload(files: Mapping[str, bytes]) -> bytes:
    """Files as a StatePayload: one uint8 tensor per file, named by it."""
    return arrays_payload({name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()})


def files_of(payload: Received | bytes, expected: Expected) -> dict[str, memoryview]:
    """The files a payload carries, as views of the arrays decoding made (no second copy: the runtime
    files hold every weight of the model)."""
    return {name: memoryview(array) for name, array in parse_arrays(payload, expected).items()}
