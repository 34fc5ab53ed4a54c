"""The gRPC transport: a Federation server (servicer.py) that clients in other processes, or on other
devices, join; this module serves it and runs its rounds for the round loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefed.config import ServerSettings
from edgefed.devices.planner import Plan
from edgefed.setup import RunSetup
from edgefed.split import SplitBodyServicer, serve_split_body
from edgefed.transport.auth import BearerTokenInterceptor, TokenBook
from edgefed.transport.base import Roster, RunContext, Transport
from edgefed.transport.clients import MISSED_HEARTBEATS
from edgefed.transport.servicer import JOIN_METHOD, FederationServicer, run_description, serve_federation
from edgefed.types import RoundResult, State
from edgefed.wire.channels import MESSAGE_HEADROOM, ServerTls, start_server
from edgefed.wire.memory import keep_freed_messages


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
        workers = 2 * servicer.clients.num_clients + 8
        clients = servicer.clients
        # Without a token file, a Join is how a client gets its token (edgefed/transport/auth.py).
        open_methods = () if clients.tokens is not None else (JOIN_METHOD,)
        interceptors = [BearerTokenInterceptor(clients.book, open_methods)]
        message_bytes = servicer.run.config.chunk_bytes + MESSAGE_HEADROOM
        keep_freed_messages(message_bytes)  # updates are read in place, in their chunk messages
        self.server, port = start_server(
            [lambda server: serve_federation(servicer, server)],
            address,
            max_message_bytes=message_bytes,
            workers=workers,
            # No server-wide cap on calls: one would let callers without a token (refused, but in
            # flight) crowd out the clients' heartbeats. Streams are capped per client (StreamGuard).
            max_concurrent_rpcs=None,
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
                max_streams=2 * servicer.clients.num_clients + 2,
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
                servicer.condition.wait(timeout=min(0.5, servicer.clients.heartbeat_s))
                self.watchdog()
        return servicer.close_round()

    def finish(self) -> None:
        """Tell connected clients the run is DONE (on their next heartbeat), then stop serving."""
        servicer = self.servicer
        give_up = time.monotonic() + MISSED_HEARTBEATS * servicer.clients.heartbeat_s
        with servicer.condition:
            servicer.finished = True
            while not set(servicer.connected()) <= servicer.clients.told_done and time.monotonic() < give_up:
                servicer.condition.wait(timeout=0.1)
        time.sleep(min(1.0, servicer.clients.heartbeat_s))  # answer DONE to calls already on their way
        self.close()

    def close(self) -> None:
        self.servicer.streams.close()
        stopping = [server.stop(grace=1.0) for server in (self.server, self.split_server) if server]
        for stopped in stopping:
            stopped.wait()

    def roster(self) -> Roster:
        servicer = self.servicer
        with servicer.condition:
            return servicer.clients.roster()

    def plans(self) -> dict[int, Plan]:
        with self.servicer.condition:
            return {slot: plan for slot, plan in self.servicer.clients.plans.items() if plan is not None}


@dataclass(frozen=True)
class Served:
    """The run served on `address` to `edgefed client`s on devices (`edgefed server`)."""

    address: str
    tokens: TokenBook | None = None
    tls: ServerTls | None = None
    settings: ServerSettings = field(default_factory=ServerSettings)

    def open(self, setup: RunSetup, run: RunContext) -> GrpcTransport:
        config = setup.config
        servicer = FederationServicer(
            run_description(setup, run.run_id, run.run_dir),
            self.tokens,
            run.roster,
            self.settings.heartbeat_s,
            setup.device,
            run.log,
            setup.fleet,
            self.settings.stream_idle_s,
        )
        transport = GrpcTransport(
            servicer,
            self.address,
            config.min_clients or config.clients,
            config.round_deadline_s,
            self.tls,
            split=run.split.servicer if run.split else None,
            split_port=self.settings.split_port,
        )
        run.log(f"edgefed: serving run {run.run_id} on {transport.address}")
        return transport
