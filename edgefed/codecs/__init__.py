"""Codecs for client deltas, one module per family, registered by name in `CODECS`."""

from edgefed.codecs.base import CODECS, Codec, bytes_per_value, decode_state, encode_state, make_codec
from edgefed.codecs.delta import EncodedDelta
from edgefed.codecs.feedback import ErrorFeedback
from edgefed.registry import import_submodules
from edgefed.types import EncodedTensor

import_submodules(__name__, __path__)

__all__ = [
    "CODECS",
    "Codec",
    "EncodedDelta",
    "EncodedTensor",
    "ErrorFeedback",
    "bytes_per_value",
    "decode_state",
    "encode_state",
    "make_codec",
]
