"""The gRPC transport: a Federation server that clients in other processes (or on other devices) join.

Clients poll `Heartbeat` (also from a background thread while they train). When a round opens for
them they `FetchGlobal`, train, and `PushUpdate`; the round ends when every sampled client has
pushed, died (no heartbeat for `MISSED_HEARTBEATS` intervals) or missed the round's deadline. Every
pushed stream is reassembled and checked (edgefed/wire) before it can touch the round; a bad one is
refused with a status and a message for the sender, and the server carries on.

One client cannot stall, steer or flood the server: it holds at most two streams at a time and a
stream that moves nothing for `stream_idle_s` is cancelled (edgefed/wire/streams.py); its example
count, its FedAvg weight, is declared once at Join and capped; Join and Heartbeat requests are small,
state streams come in chunks, and the Split service (FedBERT's 64 MiB micro-batches) has a port of
its own; a call without a token is refused before its request is read; bytes count for a client only
once its update is accepted; what it sends is escaped and cut short before it is logged.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from edgefed.client import worker_for
from edgefed.codecs import make_codec
from edgefed.config import RunConfig, client_config, config_text
from edgefed.devices.fleet import FleetPlans
from edgefed.devices.planner import Plan, plan_text
from edgefed.errors import EdgefedError
from edgefed.methods import METHODS
from edgefed.runtimes import RUNTIMES, Runtime
from edgefed.scope import Scope
from edgefed.setup import RunSetup
from edgefed.split import SplitBodyServicer, serve_split_body
from edgefed.transport.auth import BearerTokenInterceptor, TokenBook
from edgefed.transport.base import (
    Roster,
    RunContext,
    ScopedStates,
    Transport,
    max_update_bytes,
    receive_update,
    state_payload,
)
from edgefed.types import ClientUpdate, RoundResult, State
from edgefed.wire.channels import MESSAGE_HEADROOM, ServerTls, start_server
from edgefed.wire.framing import ChunkView, Expected, WireError, chunk_stream, wire_size
from edgefed.wire.memory import keep_freed_messages
from edgefed.wire.streams import STREAM_IDLE_S, StreamGuard
from edgefed.wire.text import printable
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

MISSED_HEARTBEATS = 3
DEFAULT_RUNTIME = "torch"  # what a Join that names no runtime trains with (a client from before runtimes)
# A Join or Heartbeat request holds ids and a profile name; anything larger is refused.
SMALL_MESSAGE_BYTES = 4 << 10
# Refusal messages (which quote what the client sent) are cut to this length in the log and the status.
REFUSAL_CHARS = 400
Code = grpc.StatusCode


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


def run_description(setup: RunSetup, run_id: str, run_dir: Path) -> RunDescription:
    """What clients over gRPC learn of the run, with an offer for each runtime a device can train with:
    its setup files (made in <run>/<runtime> when the first device asks), or why it cannot."""
    offers = {}
    for name in RUNTIMES.device_names():
        runtime = RUNTIMES.create(name)
        refusal = runtime.refusal(setup.config, setup.method.task)
        files = (
            functools.partial(runtime_files, setup, runtime, run_dir / name)
            if runtime.fetches_files
            else None
        )
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


def runtime_files(setup: RunSetup, runtime: Runtime, folder: Path) -> bytes:
    """A runtime's setup files, made from a worker built as a client builds it."""
    worker = worker_for(setup, torch.device("cpu"))
    return runtime.setup_files(worker.runtime_build(setup.tokenizer, folder))


@dataclass
class OpenRound:
    number: int
    sampled: set[int]
    states: ScopedStates  # the global state as each client's scope sees it
    max_bytes: int
    deadline: float  # time.monotonic()
    turns: bool = False  # clients train one after another, in slot order (FedBERT's sequential body)
    updates: dict[int, ClientUpdate] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # slot -> why
    client_bytes: dict[int, list[int]] = field(default_factory=dict)  # slot -> [down, up]

    def waiting_for(self, slot: int) -> bool:
        return slot in self.sampled and slot not in self.updates and slot not in self.dropped

    def may_train(self, slot: int) -> bool:
        """Waiting for `slot`, and (taking turns) no client before it is still waiting."""
        if not self.waiting_for(slot):
            return False
        return not self.turns or all(not self.waiting_for(other) for other in self.sampled if other < slot)


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        run: RunDescription,
        tokens: TokenBook | None = None,
        roster: Roster | None = None,
        heartbeat_s: float = 1.0,
        device: torch.device | None = None,
        log: Callable[[str], None] = print,
        fleet: FleetPlans | None = None,
        stream_idle_s: float = STREAM_IDLE_S,
    ) -> None:
        """`fleet`: plans each client's work from its profile (--profiles, or the one it announces).
        `roster`: a resumed run's clients (their slots and declared example counts).
        `stream_idle_s`: a stream that moves no message for this long is cancelled."""
        self.run = run
        self.fleet = fleet
        self.plans: dict[int, Plan | None] = {}  # slot -> the plan sent at its Join
        self.tokens = tokens
        self.codec = make_codec(run.config.codec)
        self.num_clients = run.config.clients
        self.heartbeat_s = heartbeat_s
        self.device = device or torch.device("cpu")
        self._log, self._log_lock = log, threading.Lock()
        self.condition = threading.Condition()
        roster = roster or Roster()
        self.slots = dict(roster.slots)  # client id -> slot
        # slot -> the training examples its client declared at Join (its weight)
        self.examples = {self.slots[c]: n for c, n in roster.examples.items() if c in self.slots}
        self.streams = StreamGuard(idle_s=stream_idle_s, log=self.log)
        self.split_port = 0  # the Split service's port (FedBERT), set by the transport serving it
        self.runtime_of: dict[int, str] = {}  # slot -> the runtime its client joined with
        self._files_lock, self._runtime_files = threading.Lock(), {}  # runtime -> its devices' files
        self.last_seen: dict[int, float] = {}
        self.told_done: set[int] = set()
        self.round: OpenRound | None = None
        self.finished = False
        self.bytes_up = 0
        self.bytes_down = 0
        # Setup bytes a client fetched between rounds: its share of the next round's transfer.
        self.setup_down: dict[int, int] = {}
        # FedBERT's sequential strategy: one body, so the sampled clients train one after another.
        splits = METHODS.create(run.config.method).splits_model
        self.turns = splits and run.config.split_strategy == "sequential"

    # -- RPCs ------------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        self._small(request, "Join", context)
        self._check_token(request.client_id, context)
        if not request.client_id:
            context.abort(Code.INVALID_ARGUMENT, "a client id is required")
        runtime = request.runtime or DEFAULT_RUNTIME
        offer = self.run.runtimes.get(runtime)
        if offer is None:
            known = ", ".join(sorted(self.run.runtimes))
            self._refuse(
                context, Code.INVALID_ARGUMENT, f"unknown runtime '{runtime}'; this run takes {known}"
            )
        if offer.refusal:
            self._refuse(context, Code.FAILED_PRECONDITION, f"runtime {runtime}: {offer.refusal}")
        with self.condition:
            slot = self.slots.get(request.client_id)
            if slot is None:
                slot = self._free_slot(request.client_id, request.profile, context)
                self.slots[request.client_id] = slot
            self._seen(slot)  # live from now: its heartbeats start before it builds its model
        plan = None
        if self.fleet is not None:
            try:
                self.fleet.check_announced(slot, request.profile)
                plan = self.fleet.plan(slot, request.profile)
            except EdgefedError as error:  # an unknown profile, another device's slot, or no plan fits
                with self.condition:
                    if self.slots.get(request.client_id) == slot and slot not in self.plans:
                        del self.slots[request.client_id]  # it never joined: its slot stays free
                self._refuse(context, Code.INVALID_ARGUMENT, f"{printable(request.client_id)}: {error}")
        with self.condition:
            rejoined = slot in self.plans
            self.plans[slot] = plan
            self.runtime_of[slot] = runtime
        if request.num_examples:
            self._declare(slot, request.num_examples, context)
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
            heartbeat_s=self.heartbeat_s,
            model_fingerprint=self.run.model_fingerprint,
            plan_toml=plan_text(plan) if plan else "",
            split_port=self.split_port,
        )

    def FetchSetup(self, request: pb.FetchRequest, context) -> Iterator[pb.Chunk]:
        slot = self._slot(request.client_id, request.run_id, context)
        with self.streams.admit(self.caller(context), "FetchSetup", context) as stream:
            yield from stream.follow(self._stream_down(self.run.setup_payload, 0, slot, request.client_id))

    def FetchRuntime(self, request: pb.FetchRequest, context) -> Iterator[pb.Chunk]:
        """The files of the runtime the client joined with, made once, by the first device that asks."""
        slot = self._slot(request.client_id, request.run_id, context)
        runtime = self.runtime_of.get(slot, DEFAULT_RUNTIME)
        offer = self.run.runtimes[runtime]
        if offer.files is None:
            self._refuse(context, Code.FAILED_PRECONDITION, f"runtime {runtime}: its devices fetch no files")
        with self._files_lock:  # the others wait for the first
            if runtime not in self._runtime_files:
                self.log(f"edgefed: making the {runtime} runtime's files for its devices")
                try:
                    self._runtime_files[runtime] = offer.files()
                except EdgefedError as error:
                    self._refuse(context, Code.FAILED_PRECONDITION, f"runtime {runtime}: {error}")
        payload = self._runtime_files[runtime]
        with self.streams.admit(self.caller(context), "FetchRuntime", context) as stream:
            yield from stream.follow(self._stream_down(payload, 0, slot, request.client_id))

    def FetchGlobal(self, request: pb.FetchRequest, context) -> Iterator[pb.Chunk]:
        slot = self._slot(request.client_id, request.run_id, context)
        with self.condition:
            current = self._round_for(slot, request.round, context)
            payload = current.states.payload(self._scope(slot))
        with self.streams.admit(self.caller(context), "FetchGlobal", context) as stream:
            yield from stream.follow(self._stream_down(payload, request.round, slot, request.client_id))

    def PushUpdate(self, request_iterator: Iterator[bytes], context) -> pb.PushReply:
        """The chunks arrive as their serialised bytes (see `serve_federation`) and are read as views."""
        if self.tokens is not None:  # the sender is known before it sends a byte: is its update due?
            owner = self.tokens.caller(context.invocation_metadata())
            if owner is None:
                self._refuse(context, Code.UNAUTHENTICATED, "missing or unknown bearer token")
            with self.condition:
                self._expects_update(self.tokens.slots[owner], context)
        with self.streams.admit(self.caller(context), "PushUpdate", context) as stream:
            return self._receive_update(map(ChunkView, stream.follow(request_iterator)), context)

    def _receive_update(self, chunks: Iterator[ChunkView], context) -> pb.PushReply:
        received = [0]  # gRPC message bytes of the stream, credited to its client once accepted
        try:
            first = next(chunks, None)
        except grpc.RpcError:  # the client went away (or the stream idled) before its first chunk
            return pb.PushReply()
        except WireError as error:
            self._refuse(context, Code.INVALID_ARGUMENT, str(error))
        if first is None:
            context.abort(Code.INVALID_ARGUMENT, "empty update stream")
        slot = self._slot(first.client_id, first.run_id, context)
        with self.condition:
            current = self._round_for(slot, first.round, context)
            declared = self.examples.get(slot)
            expected = Expected(
                self.run.run_id,
                current.number,
                current.states.up_shapes(self._scope(slot)),
                client_id=first.client_id,
                max_bytes=current.max_bytes,
                max_norm=self.run.config.max_update_norm,
            )
        if declared is None:
            self._refuse(
                context,
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
            self._refuse(context, Code.INVALID_ARGUMENT, f"{printable(first.client_id)}: {error}")
        except grpc.RpcError:  # the client went away mid-stream: nothing was applied
            return pb.PushReply()
        with self.condition:
            if self.round is not current or not current.waiting_for(slot):
                self._refuse(
                    context, Code.FAILED_PRECONDITION, f"round {first.round} closed before the update"
                )
            current.updates[slot] = update
            self._credit(slot, current.number, 0, received[0])
            self._seen(slot)
        return pb.PushReply(message=f"round {first.round} update accepted")

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        self._small(request, "Heartbeat", context)
        slot = self._slot(request.client_id, request.run_id, context)
        with self.condition:
            self._seen(slot)
            if self.finished:
                self.told_done.add(slot)
                self.condition.notify_all()
                return pb.HeartbeatReply(action=pb.HeartbeatReply.DONE)
            current = self.round
            if current is not None and current.may_train(slot):
                left = current.deadline - time.monotonic()
                return pb.HeartbeatReply(
                    action=pb.HeartbeatReply.TRAIN, round=current.number, deadline_s=left
                )
        return pb.HeartbeatReply(action=pb.HeartbeatReply.WAIT)

    # -- the server's side -------------------------------------------------------------------------

    def connected(self) -> list[int]:
        """Slots heard from within the last MISSED_HEARTBEATS intervals (call under the condition)."""
        horizon = time.monotonic() - MISSED_HEARTBEATS * self.heartbeat_s
        return sorted(slot for slot, seen in self.last_seen.items() if seen >= horizon)

    def open_round(self, number: int, sampled: list[int], global_state: State, deadline_s: float) -> None:
        states = ScopedStates(global_state)
        with self.condition:
            self.round = OpenRound(
                number,
                set(sampled),
                states,
                max_update_bytes(global_state),
                time.monotonic() + deadline_s,
                self.turns,
            )
            for slot, down in self.setup_down.items():
                self.round.client_bytes[slot] = [down, 0]
            self.setup_down = {}
            self.condition.notify_all()

    def close_round(self) -> RoundResult:
        with self.condition:
            current, self.round = self.round, None
            result = RoundResult(
                [current.updates[slot] for slot in sorted(current.updates)],
                sorted(current.dropped),
                self.bytes_up,
                self.bytes_down,
                {slot: (down, up) for slot, (down, up) in current.client_bytes.items()},
            )
            self.bytes_up = self.bytes_down = 0
        return result

    def drop_missing(self) -> bool:
        """Drop sampled clients that died or missed the deadline; True when nobody is left to wait for."""
        now = time.monotonic()
        alive = set(self.connected())
        current = self.round
        for slot in sorted(current.sampled):
            if not current.waiting_for(slot):
                continue
            if now > current.deadline:
                current.dropped[slot] = "missed the round's deadline"
            elif slot not in alive:
                current.dropped[slot] = f"no heartbeat for {MISSED_HEARTBEATS * self.heartbeat_s:.1f} s"
            if slot in current.dropped:
                self.log(f"edgefed: round {current.number}: dropped client {slot} ({current.dropped[slot]})")
        return not any(current.waiting_for(slot) for slot in current.sampled)

    def authorize_split(self, client_id: str, context) -> None:
        """A Split stream's sender: its token, and a client that joined this run."""
        self._check_token(client_id, context)
        if client_id not in self.slots:
            self._refuse(context, Code.FAILED_PRECONDITION, f"'{client_id}' has not joined this run")

    # -- checks ------------------------------------------------------------------------------------

    def caller(self, context) -> str:
        """Who makes a call, for the per-client stream limit: its token's client, or its connection."""
        owner = self.tokens.caller(context.invocation_metadata()) if self.tokens is not None else None
        return owner or context.peer()

    def _check_token(self, client_id: str, context) -> None:
        if self.tokens is None:
            return
        owner = self.tokens.caller(context.invocation_metadata())
        if owner is None:
            self._refuse(context, Code.UNAUTHENTICATED, "missing or unknown bearer token")
        if owner != client_id:
            self._refuse(
                context,
                Code.PERMISSION_DENIED,
                f"the token belongs to '{printable(owner)}', not '{printable(client_id)}'",
            )

    def _small(self, request, method: str, context) -> None:
        size = request.ByteSize()
        if size > SMALL_MESSAGE_BYTES:
            self._refuse(
                context,
                Code.INVALID_ARGUMENT,
                f"a {method} request of {size:,} bytes; the limit is {SMALL_MESSAGE_BYTES:,}",
            )

    def _declare(self, slot: int, count: int, context) -> None:
        """Fix the client's example count, its aggregation weight, for the run."""
        cap = self.run.config.max_client_examples
        if not 0 < count <= cap:
            self._refuse(
                context,
                Code.INVALID_ARGUMENT,
                f"client {slot} declared {count:,} training examples; a client may declare 1 to {cap:,} "
                "(max-client-examples)",
            )
        with self.condition:
            known = self.examples.setdefault(slot, count)
        if known != count:
            self._refuse(
                context,
                Code.FAILED_PRECONDITION,
                f"client {slot} declared {known:,} training examples; the count is fixed for the run",
            )
        self.log(f"edgefed: client {slot} declared {count:,} training examples")

    def _slot(self, client_id: str, run_id: str, context) -> int:
        self._check_token(client_id, context)
        if run_id != self.run.run_id:
            self._refuse(context, Code.FAILED_PRECONDITION, f"wrong run id '{run_id}'; join again")
        slot = self.slots.get(client_id)
        if slot is None:
            self._refuse(context, Code.FAILED_PRECONDITION, f"'{client_id}' has not joined this run")
        return slot

    def _free_slot(self, client_id: str, profile: str, context) -> int:
        """A token's own slot, or the first free one (of the announced device's, in a fleet)."""
        if self.tokens is not None:
            return self.tokens.slots[client_id]
        taken = set(self.slots.values())
        free = [slot for slot in range(self.num_clients) if slot not in taken]
        if not free:
            self._refuse(
                context, Code.RESOURCE_EXHAUSTED, f"the run has its {self.num_clients} clients already"
            )
        if self.fleet is not None:
            try:
                return (self.fleet.matching(free, profile) or free)[0]  # a mismatch is refused in Join
            except EdgefedError as error:  # an unknown profile
                self._refuse(context, Code.INVALID_ARGUMENT, f"{client_id}: {error}")
        return free[0]

    def _round_for(self, slot: int, number: int, context) -> OpenRound:
        current = self.round
        if current is None or current.number != number:
            open_now = "no round is open" if current is None else f"round {current.number} is open"
            self._refuse(context, Code.FAILED_PRECONDITION, f"round {number} is not open ({open_now})")
        return self._expects_update(slot, context)

    def _expects_update(self, slot: int, context) -> OpenRound:
        """The open round, when it waits for this client's update (call under the condition)."""
        current = self.round
        if current is None:
            self._refuse(context, Code.FAILED_PRECONDITION, "no round is open")
        number = current.number
        if slot in current.updates:
            self._refuse(context, Code.ALREADY_EXISTS, f"client {slot} already pushed round {number}")
        if slot in current.dropped:
            self._refuse(
                context,
                Code.FAILED_PRECONDITION,
                f"client {slot} was dropped from round {number}: "
                f"{current.dropped[slot]}; wait for the next round",
            )
        if slot not in current.sampled:
            self._refuse(context, Code.FAILED_PRECONDITION, f"client {slot} is not sampled in round {number}")
        return current

    def _refuse(self, context, code: grpc.StatusCode, message: str):
        message = printable(message, REFUSAL_CHARS)
        self.log(f"edgefed: refused: {message}")
        context.abort(code, message)

    def log(self, message: str) -> None:
        with self._log_lock:  # RPC threads log too; keep lines whole
            self._log(message)

    def _seen(self, slot: int) -> None:
        self.last_seen[slot] = time.monotonic()
        self.condition.notify_all()

    def _scope(self, slot: int) -> Scope:
        """What the client in this slot runs on and sends (call under the condition)."""
        if self.fleet is None or self.plans.get(slot) is None:
            return self.round.states.full_scope()
        return self.fleet.scope(self.plans[slot])

    def _stream_down(
        self, payload: bytes, round_number: int, slot: int, client_id: str
    ) -> Iterator[pb.Chunk]:
        """`payload` in chunks addressed to the client in `slot`, each counted as it is sent."""
        chunks = chunk_stream(payload, self.run.run_id, round_number, client_id, self.run.config.chunk_bytes)
        for chunk in chunks:
            with self.condition:
                self._credit(slot, round_number, wire_size(chunk), 0)
            yield chunk

    @staticmethod
    def _sized(chunks: Iterator[ChunkView], received: list[int]) -> Iterator[ChunkView]:
        """The chunks (gRPC itself refuses one over chunk-bytes); `received[0]` sums their message bytes."""
        for chunk in chunks:
            received[0] += wire_size(chunk)
            yield chunk

    def _credit(self, slot: int, round_number: int, down: int, up: int) -> None:
        """Count bytes for the client in `slot` (call under the condition)."""
        self.bytes_down += down
        self.bytes_up += up
        current = self.round
        setup = round_number == 0  # FetchSetup: counted with the round it is fetched for
        if current is not None and (current.number == round_number or setup):
            counts = current.client_bytes.setdefault(slot, [0, 0])
            counts[0] += down
            counts[1] += up
        elif setup:
            self.setup_down[slot] = self.setup_down.get(slot, 0) + down


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


class GrpcTransport(Transport):
    """Serves a FederationServicer on an address and runs its rounds for a FederatedServer."""

    def __init__(
        self,
        servicer: FederationServicer,
        address: str,
        min_clients: int,
        deadline_s: float,
        tls: ServerTls | None = None,
        watchdog: Callable[[], None] = lambda: None,
        split: SplitBodyServicer | None = None,
        split_port: int = 0,
    ) -> None:
        """`split`: FedBERT's Split servicer, served on the same host at `split_port` (0: any free port),
        a server of its own whose message limit fits a micro-batch; the federation's stays chunk-sized."""
        self.servicer = servicer
        self.min_clients = min_clients
        self.deadline_s = deadline_s
        self.watchdog = watchdog
        workers = 2 * servicer.num_clients + 8
        interceptors = [BearerTokenInterceptor(servicer.tokens)] if servicer.tokens else []
        message_bytes = servicer.run.config.chunk_bytes + MESSAGE_HEADROOM
        keep_freed_messages(message_bytes)  # updates are read in place, in their chunk messages
        self.server, port = start_server(
            [lambda server: serve_federation(servicer, server)],
            address,
            max_message_bytes=message_bytes,
            workers=workers,
            max_concurrent_rpcs=4 * workers,
            tls=tls,
            interceptors=interceptors,
        )
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        self.split_server = None
        if split is not None:
            split.authorize = servicer.authorize_split
            split.guard.close()  # a client's streams count across both services
            split.guard, split.caller = servicer.streams, servicer.caller
            self.split_server, servicer.split_port = serve_split_body(
                split,
                f"{host}:{split_port}",
                tls=tls,
                interceptors=interceptors,
                max_streams=2 * servicer.num_clients + 2,
            )

    def wait_for_clients(self) -> list[int]:
        servicer, announced = self.servicer, None
        with servicer.condition:
            while len(connected := servicer.connected()) < self.min_clients:
                if announced != len(connected):
                    servicer.log(
                        f"edgefed: waiting for clients on {self.address}: {len(connected)} connected, "
                        f"{self.min_clients} needed"
                    )
                    announced = len(connected)
                servicer.condition.wait(timeout=0.5)
                self.watchdog()
        return connected

    def fit_round(self, round_number: int, clients: list[int], global_state: State) -> RoundResult:
        servicer = self.servicer
        servicer.open_round(round_number, clients, global_state, self.deadline_s)
        with servicer.condition:
            while not servicer.drop_missing():
                servicer.condition.wait(timeout=min(0.5, servicer.heartbeat_s))
                self.watchdog()
        return servicer.close_round()

    def finish(self) -> None:
        """Tell connected clients the run is DONE (on their next heartbeat), then stop serving."""
        servicer = self.servicer
        give_up = time.monotonic() + MISSED_HEARTBEATS * servicer.heartbeat_s
        with servicer.condition:
            servicer.finished = True
            while not set(servicer.connected()) <= servicer.told_done and time.monotonic() < give_up:
                servicer.condition.wait(timeout=0.1)
        time.sleep(min(1.0, servicer.heartbeat_s))  # answer DONE to calls already on their way
        self.close()

    def close(self) -> None:
        self.servicer.streams.close()
        stopping = [server.stop(grace=1.0) for server in (self.server, self.split_server) if server]
        for stopped in stopping:
            stopped.wait()

    def roster(self) -> Roster:
        servicer = self.servicer
        with servicer.condition:
            names = {slot: client for client, slot in servicer.slots.items()}
            examples = {names[slot]: count for slot, count in servicer.examples.items() if slot in names}
            return Roster(dict(servicer.slots), examples)

    def plans(self) -> dict[int, Plan]:
        with self.servicer.condition:
            return {slot: plan for slot, plan in self.servicer.plans.items() if plan is not None}


@dataclass(frozen=True)
class Served:
    """The run served on `address` to `edgefed client`s on devices (`edgefed server`)."""

    address: str
    tokens: TokenBook | None = None
    tls: ServerTls | None = None
    heartbeat_s: float = 1.0
    stream_idle_s: float = STREAM_IDLE_S
    split_port: int = 0

    def open(self, setup: RunSetup, run: RunContext) -> GrpcTransport:
        config = setup.config
        servicer = FederationServicer(
            run_description(setup, run.run_id, run.run_dir),
            self.tokens,
            run.roster,
            self.heartbeat_s,
            setup.device,
            run.log,
            setup.fleet,
            self.stream_idle_s,
        )
        transport = GrpcTransport(
            servicer,
            self.address,
            config.min_clients or config.clients,
            config.round_deadline_s,
            self.tls,
            split=run.split.servicer if run.split else None,
            split_port=self.split_port,
        )
        run.log(f"edgefed: serving run {run.run_id} on {transport.address}")
        return transport
