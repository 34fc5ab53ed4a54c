"""What crosses the Split stream: its codecs, its limits, and the checks on every tensor it carries."""

from __future__ import annotations

import grpc
import torch

from edgefed.codecs import Codec, make_codec
from edgefed.errors import EdgefedError
from edgefed.methods.settings import SPLIT_CODECS
from edgefed.wire.framing import WireError, encoded_from_message
from edgefed.wire.v1 import federation_pb2 as pb

# One message carries a whole micro-batch (the proto has no chunks for Split): BERT-base activations
# of 16 sequences of 512 tokens are 25 MB in fp32, 12.6 MB in fp16.
MAX_MESSAGE_BYTES = 64 << 20
Kind = pb.SplitMessage.Kind
Code = grpc.StatusCode
MASK_CODEC = make_codec("none")  # masks are 0/1 bytes, always exact


class SplitError(EdgefedError):
    """The split server refused a message (the text is the server's), or could not be reached."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def split_codec(spec: str) -> Codec:
    """The codec activations and gradients travel in: `none` (fp32, exact), `fp16`, `bf16` or `int8`."""
    if spec not in SPLIT_CODECS:
        raise EdgefedError(f"split codec '{spec}' is not one of: {', '.join(SPLIT_CODECS)}")
    return make_codec(spec)


def decode_tensor(
    message: pb.Tensor, codec: Codec, shape: tuple[int, ...] | None = None, dtype: str | None = None
) -> torch.Tensor:
    """A tensor of a SplitMessage, checked (CRC32C, codec, shape and dtype when given, finite values)."""
    encoded = encoded_from_message(message)
    if encoded.codec != codec.spec:
        raise WireError(f"tensor {encoded.name}: codec '{encoded.codec}', this run uses '{codec.spec}'")
    if shape is not None and (encoded.shape, encoded.dtype) != (shape, dtype):
        raise WireError(
            f"tensor {encoded.name}: {encoded.dtype}{list(encoded.shape)} where {dtype}{list(shape)} "
            "is expected"
        )
    try:
        value = codec.decode(encoded)
    except ValueError as error:
        raise WireError(str(error)) from None
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise WireError(f"tensor {encoded.name}: NaN or Inf values")
    return value


def kind_name(kind: int) -> str:
    return Kind.Name(kind) if kind in Kind.values() else f"kind {kind}"
