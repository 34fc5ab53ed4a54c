"""The Federation service: the RPCs a client calls, each checked before it can touch the run.

Clients poll `Heartbeat` (also from a background thread while they train). When a round opens for
them they `FetchGlobal`, train, and `PushUpdate`; a device whose runtime needs files of its own
fetches them once (`FetchRuntime`; they are made in a child process, never in a server worker).
Every pushed stream is reassembled and checked (edgefed/wire) before it can touch the round; a bad
one is refused with a status and a message for the sender, and the server carries on. Who the
clients are lives in the roster (clients.py), what the round waits for in the round book
(rounds.py); both raise `Refusal`, which becomes the caller's status here.

One client cannot stall, steer or flood the server: it holds at most two streams at a time and a
stream that moves nothing for `stream_idle_s` is cancelled (edgefed/wire/streams.py); its example
count, its FedAvg weight, is declared once at Join and capped; Join and Heartbeat requests are small,
state streams come in chunks, and the Split service (FedBERT's 64 MiB micro-batches) has a port of
its own; a call without a token is refused before its request is read; bytes count for a client only
once its update is accepted; what it sends is escaped and cut short before it is logged.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from edgefed.codecs import make_codec
from edgefed.components import method_of
from edgefed.config import RunConfig, ServerSettings, client_config, config_text
from edgefed.devices.fleet import FleetPlans
from edgefed.devices.planner import plan_text
from edgefed.runtimes import RUNTIMES
from edgefed.scope import Scope
from edgefed.setup import RunSetup
from edgefed.transport.auth import TokenBook
from edgefed.transport.base import Roster, receive_update, state_payload, update_bound
from edgefed.transport.clients import MISSED_HEARTBEATS, ClientBook, Code, Refusal
from edgefed.transport.refusals import RefusalLog
from edgefed.transport.rounds import RoundBook
from edgefed.transport.runtime_files import FilesRecipe, RuntimeFiles, make_files
from edgefed.types import RoundResult, State
from edgefed.wire.framing import ChunkView, Expected, WireError, wire_size
from edgefed.wire.sending import chunk_stream
from edgefed.wire.streams import StreamGuard
from edgefed.wire.text import printable
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

DEFAULT_RUNTIME = "torch"  # what a Join that names no runtime trains with (a client from before runtimes)
# A Join or Heartbeat request holds ids and a profile name; anything larger is refused.
SMALL_MESSAGE_BYTES = 4 << 10
# Refusal messages (which quote what the client sent) are cut to this length in the log and the status.
REFUSAL_CHARS = 400
# Calls without a token that a handler answers (a session server's first Joins) at once: their own
# small budget. Any other call without a token is refused before its request is read.
TOKENLESS_CALLS = 4
JOIN_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Federation'].full_name}/Join"


@dataclass(frozen=True)
class RuntimeOffer:
    """What the server offers the devices of one client runtime (edgefed/runtimes.py): the files they
    fetch at setup, as a payload made when the first one asks (None: they fetch nothing), or why the
    runtime cannot train this run."""

    files: Callable[[], bytes] | None = None
    refusal: str = ""


@dataclass(frozen=True)
class RunDescription:
    """What a joining client learns about the run."""

    run_id: str
    config: RunConfig
    num_labels: int
    head_modules: tuple[str, ...]
    model_fingerprint: str
    setup_payload: bytes
    # The runtimes its devices may train with, by name.
    runtimes: Mapping[str, RuntimeOffer] = field(default_factory=lambda: {DEFAULT_RUNTIME: RuntimeOffer()})


def peer_host(peer: str) -> str:
    """A gRPC peer ("ipv4:10.0.0.7:51234", "ipv6:[::1]:51234") without its port."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def run_description(setup: RunSetup, run_id: str, run_dir: Path) -> RunDescription:
    """What clients over gRPC learn of the run, with an offer for each runtime a device can train with:
    its setup files (made in <run>/<runtime>, in a child process, when the first device asks), or why
    it cannot."""
    offers = {}
    for name in RUNTIMES.device_names():
        runtime = RUNTIMES.create(name)
        refusal = runtime.refusal(setup.config, setup.method.task)
        files = None
        if runtime.fetches_files:
            recipe = FilesRecipe(
                setup.config, setup.num_labels, setup.spec.head_modules, setup.setup, name, run_dir / name
            )
            files = functools.partial(make_files, recipe)
        offers[name] = RuntimeOffer(refusal=refusal) if refusal else RuntimeOffer(files)
    return RunDescription(
        run_id,
        setup.config,
        setup.num_labels,
        setup.spec.head_modules,
        setup.fingerprint,
        state_payload(setup.setup),
        offers,
    )


def refusing(method):
    """An RPC whose roster and round book checks raise `Refusal`: the caller gets its status."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Refusal as refusal:
                self.refuse(context, refusal.code, refusal.message)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Refusal as refusal:
            self.refuse(context, refusal.code, refusal.message)

    return unary


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        run: RunDescription,
        tokens: TokenBook | None = None,
        roster: Roster | None = None,
        heartbeat_s: float = ServerSettings.heartbeat_s,
        device: torch.device | None = None,
        log: Callable[[str], None] = print,
        fleet: FleetPlans | None = None,
        stream_idle_s: float = ServerSettings.stream_idle_s,
    ) -> None:
        """`fleet`: plans each client's work from its profile (--profiles, or the one it announces).
        `roster`: a resumed run's clients (their slots and declared example counts).
        `stream_idle_s`: a stream that moves no message for this long is cancelled."""
        self.run = run
        self.codec = make_codec(run.config.codec)
        self.device = device or torch.device("cpu")
        self._log, self._log_lock = log, threading.Lock()
        self.condition = threading.Condition()
        config = run.config
        self.clients = ClientBook(
            config.clients,
            tokens,
            roster,
            fleet,
            config.max_client_examples,
            heartbeat_s,
            self.condition,
            self.log,
        )
        self.rounds = RoundBook(method_of(config).trains_in_turns, self.condition, self.log)
        self.streams = StreamGuard(idle_s=stream_idle_s, log=self.log)
        self.refusals = RefusalLog(self.log)
        self._tokenless = threading.BoundedSemaphore(TOKENLESS_CALLS)
        self.split_port = 0  # the Split service's port (FedBERT), set by the transport serving it
        self.runtime_files = {
            name: RuntimeFiles(name, offer.files, self.log)
            for name, offer in run.runtimes.items()
            if offer.files is not None
        }
        self.finished = False

    # -- RPCs ------------------------------------------------------------------------------------

    @refusing
    def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        if self.clients.owner(context.invocation_metadata()) is not None:
            return self._join(request, context)
        if not self._tokenless.acquire(blocking=False):
            raise Refusal(Code.RESOURCE_EXHAUSTED, "too many calls without a token at once; try again")
        try:
            return self._join(request, context)
        finally:
            self._tokenless.release()

    def _join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        self._small(request, "Join")
        self.clients.check_joining(request.client_id, context.invocation_metadata())
        if not request.client_id:
            context.abort(Code.INVALID_ARGUMENT, "a client id is required")
        runtime = request.runtime or DEFAULT_RUNTIME
        offer = self.run.runtimes.get(runtime)
        if offer is None:
            known = ", ".join(sorted(self.run.runtimes))
            raise Refusal(Code.INVALID_ARGUMENT, f"unknown runtime '{runtime}'; this run takes {known}")
        if offer.refusal:
            raise Refusal(Code.FAILED_PRECONDITION, f"runtime {runtime}: {offer.refusal}")
        slot, plan, rejoined, session_token = self.clients.join(request.client_id, request.profile, runtime)
        if request.num_examples:
            self.clients.declare(slot, request.num_examples)
        elif not rejoined:
            profile = f", profile {printable(request.profile)}" if request.profile else ""
            planned = (
                f"; plan: {plan.profile}, layers {plan.frozen_layers}-{plan.exit_layer - 1}" if plan else ""
            )
            named = f", runtime {runtime}" if runtime != DEFAULT_RUNTIME else ""
            self.log(
                f"edgefed: {printable(request.client_id)} joined as client {slot}{profile}{named}{planned}"
            )
        return pb.JoinReply(
            run_id=self.run.run_id,
            config_toml=config_text(client_config(self.run.config)),
            client_index=slot,
            num_labels=self.run.num_labels,
            head_modules=list(self.run.head_modules),
            heartbeat_s=self.clients.heartbeat_s,
            model_fingerprint=self.run.model_fingerprint,
            plan_toml=plan_text(plan) if plan else "",
            split_port=self.split_port,
            session_token=session_token,
        )

    @refusing
    def FetchSetup(self, request: pb.FetchRequest, context) -> Iterator[pb.Chunk]:
        slot = self._slot(request.client_id, request.run_id, context)
        with self.streams.admit(self.caller(context), "FetchSetup", context) as stream:
            yield from stream.follow(self._stream_down(self.run.setup_payload, 0, slot, request.client_id))

    @refusing
    def FetchRuntime(self, request: pb.FetchRequest, context) -> Iterator[pb.Chunk]:
        """The files of the runtime the client joined with, once made (see `RuntimeFiles`)."""
        slot = self._slot(request.client_id, request.run_id, context)
        runtime = self.clients.runtime_of.get(slot, DEFAULT_RUNTIME)
        if runtime not in self.runtime_files:
            raise Refusal(Code.FAILED_PRECONDITION, f"runtime {runtime}: its devices fetch no files")
        with (
            self.runtime_files[runtime].download() as payload,
            self.streams.admit(self.caller(context), "FetchRuntime", context) as stream,
        ):
            yield from stream.follow(self._stream_down(payload, 0, slot, request.client_id))

    @refusing
    def FetchGlobal(self, request: pb.FetchRequest, context) -> Iterator[pb.Chunk]:
        slot = self._slot(request.client_id, request.run_id, context)
        with self.condition:
            current = self.rounds.round_for(slot, request.round)
            payload = current.states.payload(self._scope(slot))
        with self.streams.admit(self.caller(context), "FetchGlobal", context) as stream:
            yield from stream.follow(self._stream_down(payload, request.round, slot, request.client_id))

    @refusing
    def PushUpdate(self, request_iterator: Iterator[bytes], context) -> pb.PushReply:
        """The chunks arrive as their serialised bytes (see `serve_federation`) and are read as views."""
        # The sender is known by its token before it sends a byte: is its update due?
        owner = self.clients.owner(context.invocation_metadata())
        if owner is None:
            raise Refusal(Code.UNAUTHENTICATED, "missing or unknown bearer token")
        with self.condition:
            self.rounds.expecting(self.clients.slot_of(owner))
        with self.streams.admit(self.caller(context), "PushUpdate", context) as stream:
            return self._receive_update(map(ChunkView, stream.follow(request_iterator)), context)

    def _receive_update(self, chunks: Iterator[ChunkView], context) -> pb.PushReply:
        received = [0]  # gRPC message bytes of the stream, credited to its client once accepted
        try:
            first = next(chunks, None)
        except grpc.RpcError:  # the client went away (or the stream idled) before its first chunk
            return pb.PushReply()
        except WireError as error:
            raise Refusal(Code.INVALID_ARGUMENT, str(error)) from None
        if first is None:
            context.abort(Code.INVALID_ARGUMENT, "empty update stream")
        slot = self._slot(first.client_id, first.run_id, context)
        with self.condition:
            current = self.rounds.round_for(slot, first.round)
            declared = self.clients.examples.get(slot)
            shapes = current.states.up_shapes(self._scope(slot))
            expected = Expected(
                self.run.run_id,
                current.number,
                shapes,
                client_id=first.client_id,
                max_bytes=current.max_bytes,
                max_norm=update_bound(self.run.config.max_update_norm, shapes),
            )
        if declared is None:
            raise Refusal(
                Code.FAILED_PRECONDITION,
                f"client {slot} has not declared its training examples: join with num_examples first",
            )
        try:
            update = receive_update(
                self._sized(itertools.chain([first], chunks), received),
                expected,
                self.codec,
                slot,
                self.device,
                declared,
            )
        except WireError as error:
            raise Refusal(Code.INVALID_ARGUMENT, f"{printable(first.client_id)}: {error}") from None
        except grpc.RpcError:  # the client went away mid-stream: nothing was applied
            return pb.PushReply()
        with self.condition:
            self.rounds.accept(current, slot, update, received[0], first.round)
            self.clients.seen(slot)
        return pb.PushReply(message=f"round {first.round} update accepted")

    @refusing
    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        self._small(request, "Heartbeat")
        slot = self._slot(request.client_id, request.run_id, context)
        with self.condition:
            self.clients.seen(slot)
            if self.finished:
                self.clients.told_done.add(slot)
                self.condition.notify_all()
                return pb.HeartbeatReply(action=pb.HeartbeatReply.DONE)
            current = self.rounds.current
            if current is not None and current.may_train(slot):
                left = current.deadline - time.monotonic()
                return pb.HeartbeatReply(
                    action=pb.HeartbeatReply.TRAIN, round=current.number, deadline_s=left
                )
        return pb.HeartbeatReply(action=pb.HeartbeatReply.WAIT)

    # -- the server's side -------------------------------------------------------------------------

    def connected(self) -> list[int]:
        """Slots heard from within the last MISSED_HEARTBEATS intervals (call under the condition)."""
        return self.clients.connected()

    def open_round(self, number: int, sampled: list[int], global_state: State, deadline_s: float) -> None:
        self.rounds.open(number, sampled, global_state, deadline_s)

    def close_round(self) -> RoundResult:
        return self.rounds.close()

    def drop_missing(self) -> bool:
        """Drop sampled clients that died or missed the deadline; True when nobody is left to wait for
        (call under the condition)."""
        silence = f"{MISSED_HEARTBEATS * self.clients.heartbeat_s:.1f} s"
        return self.rounds.drop_missing(set(self.connected()), silence)

    def authorize_split(self, client_id: str, context) -> None:
        """A Split stream's sender: its token, and a client that joined this run."""
        try:
            self.clients.check_token(client_id, context.invocation_metadata())
            if client_id not in self.clients.slots:
                raise Refusal(Code.FAILED_PRECONDITION, f"'{client_id}' has not joined this run")
        except Refusal as refusal:
            self.refuse(context, refusal.code, refusal.message)

    # -- checks ------------------------------------------------------------------------------------

    def caller(self, context) -> str:
        """Who makes a call, for the per-client limits: its token's client, else the host it calls
        from (not its connection: a client has as many of those as it likes)."""
        return self.clients.owner(context.invocation_metadata()) or peer_host(context.peer())

    def _slot(self, client_id: str, run_id: str, context) -> int:
        return self.clients.slot(client_id, run_id, self.run.run_id, context.invocation_metadata())

    @staticmethod
    def _small(request, method: str) -> None:
        size = request.ByteSize()
        if size > SMALL_MESSAGE_BYTES:
            raise Refusal(
                Code.INVALID_ARGUMENT,
                f"a {method} request of {size:,} bytes; the limit is {SMALL_MESSAGE_BYTES:,}",
            )

    def refuse(self, context, code: grpc.StatusCode, message: str):
        message = printable(message, REFUSAL_CHARS)
        self.refusals.refused(printable(self.caller(context)), message)
        context.abort(code, message)

    def log(self, message: str) -> None:
        with self._log_lock:  # RPC threads log too; keep lines whole
            self._log(message)

    def _scope(self, slot: int) -> Scope:
        """What the client in this slot runs on and sends (call under the condition)."""
        fleet, plan = self.clients.fleet, self.clients.plans.get(slot)
        if fleet is None or plan is None:
            return self.rounds.current.states.full_scope()
        return fleet.scope(plan)

    def _stream_down(
        self, payload: bytes, round_number: int, slot: int, client_id: str
    ) -> Iterator[pb.Chunk]:
        """`payload` in chunks addressed to the client in `slot`, each counted as it is sent."""
        chunks = chunk_stream(payload, self.run.run_id, round_number, client_id, self.run.config.chunk_bytes)
        for chunk in chunks:
            with self.condition:
                self.rounds.credit(slot, round_number, wire_size(chunk), 0)
            yield chunk

    @staticmethod
    def _sized(chunks: Iterator[ChunkView], received: list[int]) -> Iterator[ChunkView]:
        """The chunks (gRPC itself refuses one over chunk-bytes); `received[0]` sums their message bytes."""
        for chunk in chunks:
            received[0] += wire_size(chunk)
            yield chunk


def serve_federation(servicer: FederationServicer, server: grpc.Server) -> None:
    """Add the Federation service to `server` as the generated code does, except that PushUpdate
    receives each chunk as its serialised bytes, which `ChunkView` reads without copying the data."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString
        ),
        "FetchSetup": grpc.unary_stream_rpc_method_handler(
            servicer.FetchSetup, pb.FetchRequest.FromString, pb.Chunk.SerializeToString
        ),
        "FetchRuntime": grpc.unary_stream_rpc_method_handler(
            servicer.FetchRuntime, pb.FetchRequest.FromString, pb.Chunk.SerializeToString
        ),
        "FetchGlobal": grpc.unary_stream_rpc_method_handler(
            servicer.FetchGlobal, pb.FetchRequest.FromString, pb.Chunk.SerializeToString
        ),
        "PushUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.PushUpdate,
            None,  # no deserialiser: each chunk arrives as the bytes that came
            pb.PushReply.SerializeToString,
        ),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat, pb.HeartbeatRequest.FromString, pb.HeartbeatReply.SerializeToString
        ),
    }
    service = grpc.method_handlers_generic_handler("edgefed.v1.Federation", handlers)
    server.add_generic_rpc_handlers((service,))
