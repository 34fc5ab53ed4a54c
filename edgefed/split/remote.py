"""The client's side of split learning: a `RemoteBody` module whose forward and backward are exchanges
with a split server."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import torch
from torch import nn

from edgefed.split.inprocess import InProcessSplitStub
from edgefed.split.wire import (
    MASK_CODEC,
    MAX_MESSAGE_BYTES,
    Code,
    Kind,
    SplitError,
    decode_tensor,
    kind_name,
    split_codec,
)
from edgefed.types import EncodedTensor
from edgefed.wire.channels import ClientTls, open_channel
from edgefed.wire.framing import WireError, tensor_message, wire_size
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

# Opening a stream while the server still counts this client's previous one (a client may hold two):
# tries after the first, waiting OPEN_BACKOFF_S, then twice as long each time (about 3 s in all).
OPEN_RETRIES, OPEN_BACKOFF_S = 6, 0.05


def split_channel(
    address: str, tls: ClientTls | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> grpc.Channel:
    """A channel to a split server whose message limits fit a micro-batch."""
    return open_channel(address, tls, max_message_bytes)


class ExchangeStream:
    """One Split.Exchange call: requests go through a queue, replies are read one per request."""

    def __init__(self, stub: pb_grpc.SplitStub, metadata: Sequence[tuple[str, str]]) -> None:
        self.requests: queue.SimpleQueue[pb.SplitMessage | None] = queue.SimpleQueue()
        self.replies = stub.Exchange(self._drain(), metadata=metadata)

    def _drain(self) -> Iterator[pb.SplitMessage]:
        while (message := self.requests.get()) is not None:
            yield message

    def close(self) -> None:
        self.requests.put(None)  # half-close: the server ends the call and frees its pending forward


class RemoteBody(nn.Module):
    """The body of a model, run by a split server: call it where the body would be called.

    forward(hidden_states, attention_mask=None) sends the activations and returns the body's output;
    autograd's backward through it sends the output's gradient (the server steps the body) and returns
    the input's. Every message carries `round` (set it as rounds change). `bytes_sent` and
    `bytes_received` count the gRPC messages both ways. Close it when done.
    """

    def __init__(
        self,
        channel: grpc.Channel | InProcessSplitStub,
        run_id: str,
        codec: str = "fp16",
        client_id: str = "",
        round_number: int = 0,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        """`channel`: a gRPC channel to a split server, or an InProcessSplitStub of a servicer here."""
        super().__init__()
        self.stub = channel if isinstance(channel, InProcessSplitStub) else pb_grpc.SplitStub(channel)
        self.run_id = run_id
        self.codec = split_codec(codec)
        self.client_id = client_id
        self.round = round_number
        self.metadata = tuple(metadata)
        self.max_message_bytes = max_message_bytes
        self.step = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._stream: ExchangeStream | None = None
        # Autograd records the exchange only when an input requires grad. This one always does, so the
        # body trains even when every layer before the cut is frozen.
        self._anchor = torch.empty(0, requires_grad=True)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if torch.is_grad_enabled():
            return ExchangeFunction.apply(hidden_states, self._anchor, self, attention_mask)
        return self.send_activations(hidden_states, attention_mask)

    def send_activations(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The body's output for a micro-batch; the server keeps its graph for `send_gradient`."""
        self.step += 1
        message = self._message(Kind.ACTIVATIONS, self.codec.encode("activations", hidden_states.detach()))
        if attention_mask is not None:
            mask = MASK_CODEC.encode("attention_mask", attention_mask.detach().to(torch.uint8))
            message.attention_mask.CopyFrom(tensor_message(mask))
        reply = self._exchange(message, Kind.BODY_OUTPUT)
        output = decode_tensor(reply.tensor, self.codec)
        if output.dtype != hidden_states.dtype:
            raise WireError(f"step {self.step}: body output in {output.dtype}, sent {hidden_states.dtype}")
        return output.to(hidden_states.device)

    def send_gradient(
        self, step: int, gradient: torch.Tensor, input_shape: tuple[int, ...], input_dtype: torch.dtype
    ) -> torch.Tensor:
        """The gradient at the body's input of `step`, given the one at its output (the body steps)."""
        if step != self.step:
            raise SplitError(
                f"backward of step {step} after the forward of step {self.step}: a RemoteBody holds one "
                "micro-batch at a time (backward each one before the next forward)"
            )
        reply = self._exchange(
            self._message(Kind.OUTPUT_GRADIENT, self.codec.encode("output_gradient", gradient.detach())),
            Kind.INPUT_GRADIENT,
        )
        dtype = str(input_dtype).removeprefix("torch.")
        return decode_tensor(reply.tensor, self.codec, input_shape, dtype).to(gradient.device)

    def start_round(self, round_number: int) -> None:
        """A new round: a new stream whose steps count from 1, so a round's exchanges (and the body's
        dropout, seeded by round and step) are the same whether or not the client restarted."""
        self.close()
        self.round, self.step = round_number, 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> RemoteBody:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _message(self, kind: int, tensor: EncodedTensor) -> pb.SplitMessage:
        return pb.SplitMessage(
            run_id=self.run_id,
            round=self.round,
            client_id=self.client_id,
            step=self.step,
            kind=kind,
            tensor=tensor_message(tensor),
        )

    def _exchange(self, message: pb.SplitMessage, answer: int) -> pb.SplitMessage:
        what = f"{kind_name(message.kind)} of step {message.step}"
        size, limit = message.ByteSize() / 1e6, self.max_message_bytes / 1e6
        if size > limit:
            raise SplitError(
                f"{what} is {size:.1f} MB, over the {limit:.1f} MB message limit; send smaller micro-batches"
            )
        opening = self._stream is None
        for attempt in range(OPEN_RETRIES + 1):
            if self._stream is None:
                self._stream = ExchangeStream(self.stub, self.metadata)
            self._stream.requests.put(message)
            self.bytes_sent += wire_size(message)
            try:
                reply = next(self._stream.replies)
                break
            except grpc.RpcError as error:
                self.close()  # the call is over (the next forward opens another); this frees its sender
                # A new stream refused for too many open ones: the server has yet to see this client's
                # previous stream end (a client holds at most two). Wait a moment and open it again.
                if opening and error.code() == Code.RESOURCE_EXHAUSTED and attempt < OPEN_RETRIES:
                    time.sleep(OPEN_BACKOFF_S * 2**attempt)
                    continue
                how = "is unreachable at" if error.code() == Code.UNAVAILABLE else "refused"
                raise SplitError(f"split server {how} {what}: {error.details()}", error.code()) from None
            except StopIteration:
                self.close()
                raise SplitError(f"split server closed the stream without answering {what}") from None
        self.bytes_received += wire_size(reply)
        if reply.kind != answer or reply.step != message.step or not reply.HasField("tensor"):
            self.close()
            raise WireError(
                f"{what} answered with {kind_name(reply.kind)} of step {reply.step}; "
                f"{kind_name(answer)} of step {message.step} was due"
            )
        return reply


class ExchangeFunction(torch.autograd.Function):
    """Autograd's view of a RemoteBody: forward and backward are each one exchange with the server."""

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        anchor: torch.Tensor,
        remote: RemoteBody,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        output = remote.send_activations(hidden_states, attention_mask)
        ctx.remote, ctx.step = remote, remote.step
        ctx.input_shape, ctx.input_dtype = tuple(hidden_states.shape), hidden_states.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        grad_input = ctx.remote.send_gradient(ctx.step, grad_output, ctx.input_shape, ctx.input_dtype)
        return (grad_input if ctx.needs_input_grad[0] else None), None, None, None
