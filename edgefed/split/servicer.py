"""The server's side of split learning: a Split servicer that runs bodies forward and backward, one
Exchange stream per client, and steps their optimizers."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import torch
from torch import nn

from edgefed.codecs.base import DTYPES, dtype_name
from edgefed.split.wire import (
    MASK_CODEC,
    MAX_MESSAGE_BYTES,
    Code,
    Kind,
    decode_tensor,
    kind_name,
    split_codec,
)
from edgefed.wire.channels import ServerTls, start_server
from edgefed.wire.framing import WireError, tensor_message, wire_size
from edgefed.wire.streams import StreamGuard
from edgefed.wire.text import printable
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc


@dataclass
class BodySlot:
    """A body, its optimizer and its lock: what one client's stream trains (one for every stream, or a
    copy per client)."""

    body: nn.Module
    optimizer: torch.optim.Optimizer
    max_grad_norm: float | None = None  # clip the body's gradient (the client clips its own part)
    # Seed of the body's dropout: with it, each forward draws from a generator of (seed, round, client,
    # step) alone, so a run computes the same wherever its body runs; None: torch's global generator.
    seed: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0  # optimizer steps taken


@dataclass
class Forward:
    """A micro-batch the body has run forward and awaits the gradient of."""

    step: int
    slot: BodySlot
    inputs: torch.Tensor  # leaf that collects the gradient at the body's input
    outputs: torch.Tensor
    sent_dtype: str  # the activations' own dtype: the replies and the gradient keep it
    version: int  # the body's optimizer steps when it ran


@dataclass
class StreamState:
    client_id: str | None = None
    last_step: int | None = None
    pending: Forward | None = None


class SplitBodyServicer(pb_grpc.SplitServicer):
    """Serves bodies and their optimizers to split-learning clients, one Exchange stream per client.

    `bodies` is one BodySlot for every client, or a function from client id to its slot (raising
    WireError for a client that may not train now). `round` is the round messages must carry; the
    orchestrator updates it. Streams that share a slot share its body, so a gradient is refused
    (FAILED_PRECONDITION) when another stream stepped the body after its forward. `authorize(client_id,
    context)` may abort a stream whose sender is not who it says. `traffic` counts the gRPC message
    bytes received and sent per client.
    """

    def __init__(
        self,
        bodies: BodySlot | Callable[[str], BodySlot],
        run_id: str,
        codec: str = "fp16",
        round_number: int = 0,
        log: Callable[[str], None] = print,
        authorize: Callable[[str, Any], None] = lambda client_id, context: None,
    ) -> None:
        self.slot_for = bodies if callable(bodies) else (lambda client_id: bodies)
        self.run_id = run_id
        self.codec = split_codec(codec)
        self.round = round_number
        self.log = log
        self.authorize = authorize
        self.traffic: dict[str, list[int]] = {}  # client id -> [bytes received, bytes sent]
        self._traffic_lock = threading.Lock()
        # At most two streams per caller, none idle for long (a federation server shares its own).
        self.guard = StreamGuard(log=log)
        self.caller: Callable[[Any], str] = lambda context: context.peer()

    def take_traffic(self) -> dict[str, tuple[int, int]]:
        """Bytes (received from, sent to) each client since the last call."""
        with self._traffic_lock:
            traffic, self.traffic = self.traffic, {}
        return {client: (received, sent) for client, (received, sent) in traffic.items()}

    def Exchange(self, request_iterator: Iterator[pb.SplitMessage], context) -> Iterator[pb.SplitMessage]:
        stream = StreamState()
        with self.guard.admit(self.caller(context), "Exchange", context) as held:
            try:
                for message in held.follow(request_iterator):
                    try:
                        reply = self._answer(message, stream, context)
                    except WireError as error:
                        self._refuse(context, Code.INVALID_ARGUMENT, str(error), message.client_id)
                    # Counted once answered: the sender is the stream's authorised client by then.
                    self._count(stream.client_id, wire_size(message), wire_size(reply))
                    yield reply
            except grpc.RpcError:  # the client went away; its pending forward goes with the stream
                return

    def _count(self, client_id: str, received: int, sent: int) -> None:
        with self._traffic_lock:
            counts = self.traffic.setdefault(client_id, [0, 0])
            counts[0] += received
            counts[1] += sent

    def _answer(self, message: pb.SplitMessage, stream: StreamState, context) -> pb.SplitMessage:
        if message.run_id != self.run_id:
            raise WireError(f"wrong run id '{message.run_id}'")
        if message.round != self.round:
            raise WireError(f"round {message.round} is not the current round {self.round}")
        if stream.client_id is None:
            self.authorize(message.client_id, context)
            stream.client_id = message.client_id
        elif message.client_id != stream.client_id:
            raise WireError(f"message from '{message.client_id}' in the stream of '{stream.client_id}'")
        if message.kind == Kind.ACTIVATIONS:
            return self._forward(message, stream)
        if message.kind == Kind.OUTPUT_GRADIENT:
            return self._backward(message, stream, context)
        raise WireError(
            f"step {message.step}: a client sends ACTIVATIONS or OUTPUT_GRADIENT, not "
            f"{kind_name(message.kind)}"
        )

    def _forward(self, message: pb.SplitMessage, stream: StreamState) -> pb.SplitMessage:
        step = message.step
        if stream.last_step is not None and step <= stream.last_step:
            raise WireError(f"ACTIVATIONS of step {step} after step {stream.last_step}: steps must increase")
        if not message.HasField("tensor"):
            raise WireError(f"ACTIVATIONS of step {step} carry no tensor")
        slot = self.slot_for(message.client_id)
        parameter = next(slot.body.parameters())
        activations = decode_tensor(message.tensor, self.codec)
        if not activations.is_floating_point():
            raise WireError(
                f"ACTIVATIONS of step {step}: {dtype_name(activations)} values, not floating point"
            )
        mask = None
        if message.HasField("attention_mask"):
            batch = tuple(activations.shape[:2])
            mask = decode_tensor(message.attention_mask, MASK_CODEC, batch, "uint8")
            if (mask > 1).any():
                raise WireError(f"step {step}: the attention mask holds values other than 0 and 1")
            mask = mask.to(parameter.device, torch.long)
        stream.pending = None  # a forward nobody backpropagated (evaluation): free its graph first
        with slot.lock:
            inputs = activations.to(parameter.device, parameter.dtype).requires_grad_()
            try:
                with torch.enable_grad(), seeded_dropout(slot.seed, message):
                    outputs = slot.body(inputs, mask)
            except (RuntimeError, ValueError, IndexError) as error:
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise WireError(
                    f"step {step}: the body cannot take activations of shape {list(activations.shape)}: "
                    f"{first_line}"
                ) from None
            version = slot.version
        stream.last_step = step
        stream.pending = Forward(step, slot, inputs, outputs, dtype_name(activations), version)
        return self._reply(message, Kind.BODY_OUTPUT, "body_output", outputs.detach().to(activations.dtype))

    def _backward(self, message: pb.SplitMessage, stream: StreamState, context) -> pb.SplitMessage:
        step, pending = message.step, stream.pending
        if pending is None or pending.step != step:
            waiting = f"step {pending.step} is waiting" if pending else "no forward is waiting"
            raise WireError(f"OUTPUT_GRADIENT of step {step} without its ACTIVATIONS ({waiting})")
        if not message.HasField("tensor"):
            raise WireError(f"OUTPUT_GRADIENT of step {step} carries no tensor")
        gradient = decode_tensor(message.tensor, self.codec, tuple(pending.outputs.shape), pending.sent_dtype)
        stream.pending = None
        slot = pending.slot
        with slot.lock:
            if pending.version != slot.version:
                self._refuse(
                    context,
                    Code.FAILED_PRECONDITION,
                    f"step {step}: another client stepped the body since its forward; send the "
                    "activations again",
                    message.client_id,
                )
            slot.optimizer.zero_grad(set_to_none=True)
            pending.outputs.backward(gradient.to(pending.outputs.device, pending.outputs.dtype))
            if slot.max_grad_norm:
                nn.utils.clip_grad_norm_(slot.body.parameters(), slot.max_grad_norm)
            slot.optimizer.step()
            slot.version += 1
        input_gradient = pending.inputs.grad.to(DTYPES[pending.sent_dtype])
        return self._reply(message, Kind.INPUT_GRADIENT, "input_gradient", input_gradient)

    def _reply(self, request: pb.SplitMessage, kind: int, name: str, tensor: torch.Tensor) -> pb.SplitMessage:
        return pb.SplitMessage(
            run_id=self.run_id,
            round=request.round,
            client_id=request.client_id,
            step=request.step,
            kind=kind,
            tensor=tensor_message(self.codec.encode(name, tensor)),
        )

    def _refuse(self, context, code: grpc.StatusCode, message: str, client_id: str) -> NoReturn:
        message = printable(message, 400)
        self.log(f"edgefed: split: refused {printable(client_id) or 'a client'}: {message}")
        context.abort(code, message)


# Dropout draws from torch's one global generator, so seeded forwards of different streams (parallel
# bodies) take turns; unseeded ones only hold their slot's lock.
_SEEDED_FORWARD = threading.Lock()


@contextlib.contextmanager
def seeded_dropout(seed: int | None, message: pb.SplitMessage) -> Iterator[None]:
    """Run a body's forward with dropout drawn from (seed, round, client, step) alone (None: as is)."""
    if seed is None:
        yield
        return
    key = f"{seed}:{message.round}:{message.client_id}:{message.step}".encode()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with _SEEDED_FORWARD, torch.random.fork_rng(devices=devices):
        torch.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
        yield


def serve_split_body(
    servicer: SplitBodyServicer,
    address: str = "127.0.0.1:0",
    *,
    tls: ServerTls | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_streams: int = 8,
) -> tuple[grpc.Server, int]:
    """Start serving the Split service on `address` (port 0: any free port); returns the server and its port.

    A stream holds a worker thread for its whole life, so `max_streams` clients train at once and one
    more is refused with RESOURCE_EXHAUSTED instead of waiting.
    """
    return start_server(
        [lambda server: pb_grpc.add_SplitServicer_to_server(servicer, server)],
        address,
        max_message_bytes=max_message_bytes,
        workers=max_streams,
        max_concurrent_rpcs=max_streams,
        tls=tls,
        interceptors=interceptors,
        thread_prefix="edgefed-split",
    )
