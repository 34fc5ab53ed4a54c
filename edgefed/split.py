"""Split learning over gRPC (FedBERT's layout): the client keeps the model's ends, the server its body.

The client's model calls a `RemoteBody` where the body would be. Its forward sends a micro-batch's
activations (and attention mask) over one long-lived `Split.Exchange` stream and returns the body's
output; its backward sends the gradient at the body's output and returns the gradient at the body's
input. The server's `SplitBodyServicer` runs the body forward and, on the gradient, backward and one
step of the body's optimizer. Both sides train with ordinary torch optimizers, so the cut model trains
as the uncut one does, up to the wire codec: `none` (exact), `fp16`, `bf16` or `int8`.

Every message is checked before it touches the body: run, round, sender, order, kind, codec, shape,
dtype, sha256 and finiteness. A bad one ends its stream with INVALID_ARGUMENT and a message for the
sender (`RemoteBody` raises it as a `SplitError`); the server and its other streams carry on. A stream
holds one micro-batch at a time: every gradient is one optimizer step of the body (no accumulation),
and a forward that is never backpropagated (evaluation) is dropped by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import MaskedLMOutput

from edgefed.codecs import Codec, EncodedTensor, make_codec
from edgefed.codecs.base import DTYPES, dtype_name
from edgefed.errors import EdgefedError
from edgefed.wire.framing import WireError, encoded_from_message, tensor_message, wire_size
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

SPLIT_CODECS = ("none", "fp16", "bf16", "int8")
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
    """A tensor of a SplitMessage, checked (sha256, codec, shape and dtype when given, finite values)."""
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


# -- the server's side ---------------------------------------------------------------------------


class BertBody(nn.Module):
    """A BERT encoder stack as a body: (embedding output, attention mask [batch, seq] of 1s and 0s or
    None) → last hidden state. Its parameter names are the BertModel's (`encoder.layer.0...`)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.config = bert.config
        self.encoder = bert.encoder

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # As BertModel does in transformers 5: the 4-D mask for the configured attention implementation
        # (None under sdpa when nothing is padded); BertEncoder takes it as it is.
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        return self.encoder(hidden_states, attention_mask=mask).last_hidden_state


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

    def take_traffic(self) -> dict[str, tuple[int, int]]:
        """Bytes (received from, sent to) each client since the last call."""
        with self._traffic_lock:
            traffic, self.traffic = self.traffic, {}
        return {client: (received, sent) for client, (received, sent) in traffic.items()}

    def Exchange(self, request_iterator: Iterator[pb.SplitMessage], context) -> Iterator[pb.SplitMessage]:
        stream = StreamState()
        try:
            for message in request_iterator:
                self._count(message.client_id, wire_size(message), 0)
                try:
                    reply = self._answer(message, stream, context)
                except WireError as error:
                    self._refuse(context, Code.INVALID_ARGUMENT, str(error), message.client_id)
                self._count(message.client_id, 0, wire_size(reply))
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
        self.log(f"edgefed: split: refused {client_id or 'a client'}: {message}")
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
    tls: tuple[bytes, bytes] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_streams: int = 8,
) -> tuple[grpc.Server, int]:
    """Start serving the Split service on `address` (port 0: any free port); returns the server and its port.

    A stream holds a worker thread for its whole life, so `max_streams` clients train at once and one
    more is refused with RESOURCE_EXHAUSTED instead of waiting.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="edgefed-split"),
        interceptors=list(interceptors),
        options=options,
        maximum_concurrent_rpcs=max_streams,
    )
    pb_grpc.add_SplitServicer_to_server(servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    except RuntimeError:
        port = 0
    if port == 0:
        raise EdgefedError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    return server, port


# -- the client's side ---------------------------------------------------------------------------


def split_channel(
    address: str, tls_ca: bytes | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> grpc.Channel:
    """A channel to a split server whose message limits fit a micro-batch."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options
    )


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
        if self._stream is None:
            self._stream = ExchangeStream(self.stub, self.metadata)
        self._stream.requests.put(message)
        self.bytes_sent += wire_size(message)
        try:
            reply = next(self._stream.replies)
        except grpc.RpcError as error:
            self.close()  # the call is over (the next forward opens another); this frees its sender
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


class UnattachedBody(nn.Module):
    """Where a split client's body goes until its transport attaches a RemoteBody."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> NoReturn:
        raise EdgefedError("this split model's body runs on a server: attach a RemoteBody first")


class BertMaskedLMClient(nn.Module):
    """The client's side of FedBERT's layout: a BertForMaskedLM's embeddings and MLM head around a body
    (a RemoteBody, or a BertBody to run it whole). The MLM decoder's weight stays tied to the word
    embeddings, both on the client. Parameter names are the BertForMaskedLM's (`bert.embeddings.*`,
    `cls.*`), so the client part's state matches the whole model's."""

    def __init__(self, model: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.bert = nn.ModuleDict({"embeddings": model.bert.embeddings})
        self.body = body
        self.cls = model.cls
        self.config = model.config
        self.vocab_size = model.config.vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        embedded = self.bert["embeddings"](input_ids=input_ids, token_type_ids=token_type_ids)
        logits = self.cls(self.body(embedded, attention_mask))
        loss = None
        if labels is not None:  # BertForMaskedLM's loss: mean cross-entropy over labels other than -100
            loss = nn.functional.cross_entropy(logits.view(-1, self.vocab_size).float(), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits)


# -- both sides in one process -------------------------------------------------------------------


class InProcessAbort(Exception):
    """A servicer here refused a message (what `context.abort` raises under gRPC)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status, self.text = code, details


class InProcessRpcError(grpc.RpcError):
    """A refusal as a RemoteBody sees one from a real channel."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InProcessContext:
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise InProcessAbort(code, details)


class InProcessSplitStub:
    """A Split stub for a servicer in this process (simulated clients): every message is serialised and
    parsed as gRPC would carry it, so the servicer checks and counts exactly what a remote client sends."""

    def __init__(self, servicer: SplitBodyServicer) -> None:
        self.servicer = servicer

    def Exchange(
        self, request_iterator: Iterator[pb.SplitMessage], metadata: Sequence[tuple[str, str]] = ()
    ) -> Iterator[pb.SplitMessage]:
        requests = (pb.SplitMessage.FromString(m.SerializeToString()) for m in request_iterator)
        try:
            for reply in self.servicer.Exchange(requests, InProcessContext(metadata)):
                yield pb.SplitMessage.FromString(reply.SerializeToString())
        except InProcessAbort as refused:
            raise InProcessRpcError(refused.status, refused.text) from None
