"""Split learning over gRPC (FedBERT's layout): the client keeps the model's ends, the server its body.

The client's model calls a `RemoteBody` where the body would be. Its forward sends a micro-batch's
activations (and attention mask) over one long-lived `Split.Exchange` stream and returns the body's
output; its backward sends the gradient at the body's output and returns the gradient at the body's
input. The server's `SplitBodyServicer` runs the body forward and, on the gradient, backward and one
step of the body's optimizer. Both sides train with ordinary torch optimizers, so the cut model trains
as the uncut one does, up to the wire codec: `none` (exact), `fp16`, `bf16` or `int8`.

Every message is checked before it touches the body: run, round, sender, order, kind, codec, shape,
dtype, CRC32C and finiteness. A bad one ends its stream with INVALID_ARGUMENT and a message for the
sender (`RemoteBody` raises it as a `SplitError`); the server and its other streams carry on. A stream
holds one micro-batch at a time: every gradient is one optimizer step of the body (no accumulation),
and a forward that is never backpropagated (evaluation) is dropped by the next one.
"""

from edgefed.split.body import BodyTrainer, SplitSide
from edgefed.split.inprocess import InProcessSplitStub
from edgefed.split.remote import RemoteBody, split_channel
from edgefed.split.servicer import BodySlot, SplitBodyServicer, serve_split_body
from edgefed.split.wire import MAX_MESSAGE_BYTES, SPLIT_CODECS, SplitError, split_codec

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SPLIT_CODECS",
    "BodySlot",
    "BodyTrainer",
    "InProcessSplitStub",
    "RemoteBody",
    "SplitBodyServicer",
    "SplitError",
    "SplitSide",
    "serve_split_body",
    "split_channel",
    "split_codec",
]
