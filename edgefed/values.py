"""Float values read in place from the bytes they arrived in: their sum of squares, with numpy (which
reads a received buffer without copying it, and is importable where torch is not: a device on the
ort runtime). The codecs' checks and the wire's streaming checks both use it."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from edgefed.types import Pieces

NUMPY_FLOATS = {"float32": np.float32, "float64": np.float64}


def square_sum(part: bytes | memoryview, dtype: str) -> float:
    """Σ x² over the `dtype` values (a key of NUMPY_FLOATS) that fill `part`; NaN or Inf when a value
    is not finite. One BLAS pass, in the dtype; finite values whose squares pass its range are summed
    again in float64."""
    values = np.frombuffer(part, NUMPY_FLOATS[dtype])
    with np.errstate(all="ignore"):  # overflow and NaN land in the sum, which the caller checks
        total = float(np.dot(values, values))
        if math.isinf(total) and bool(np.isfinite(values).all()):
            total = float(np.square(values, dtype=np.float64).sum())
    return total


def whole_values(data: bytes | memoryview | Pieces, itemsize: int) -> Iterator[bytes | memoryview]:
    """The bytes of `data` in parts of whole values, each piece's in place (read only); a value split
    between two pieces (framing 1 split them anywhere) is copied whole."""
    carry = b""
    for part in Pieces.of(data):
        if carry:
            split = itemsize - len(carry)
            carry, part = carry + bytes(part[:split]), part[split:]
            if len(carry) == itemsize:
                yield carry
                carry = b""
        whole = len(part) // itemsize * itemsize
        if whole:
            yield part[:whole]
        carry += bytes(part[whole:])
