"""`edgefed client`: join a Federation server, build the model it names, train the rounds it asks for.

The client keeps the connection (joins, heartbeats, retries, fetches and pushes); what builds and
trains the model is its runtime's device side (edgefed/runtimes.py, edgefed/wire/device.py): torch,
or ONNX Runtime on a device without torch. This module imports neither.

The client's data never leaves it. It survives a server restart: while the server is unreachable it
retries (up to `retry_s`, which may be infinite), and a server resumed from its checkpoint keeps the
run id and the client's slot, so the client carries on from the round the server asks for. `stop`
(SIGTERM, from `edgefed client`) ends it between rounds, or after the push it is making.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

import grpc

from edgefed.devices.power import EnergyMeter, open_meter
from edgefed.errors import EdgefedError
from edgefed.runtimes import RUNTIMES
from edgefed.transport.auth import bearer_metadata
from edgefed.wire.channels import MESSAGE_HEADROOM, ClientTls, is_loopback, open_channel
from edgefed.wire.device import DeviceRuntime
from edgefed.wire.framing import MAX_PAYLOAD_BYTES, Expected, Received, reassemble
from edgefed.wire.text import printable
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

Code = grpc.StatusCode
# The largest message a client takes or sends: a chunk of the largest chunk-bytes a run may set.
CHANNEL_MESSAGE_BYTES = (4 << 20) + MESSAGE_HEADROOM
# Refusals of one round's fetch or push: the client reports them and waits for the next round.
ROUND_REFUSALS = (
    Code.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS,
    Code.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED,
)
# A server that is restarting, or too busy to answer now: a call is tried again, with backoff.
TRANSIENT = (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED)
UNARY_TIMEOUT_S = 10.0  # a Join or Heartbeat unanswered this long is tried again
BACKOFF_S = (0.2, 5.0)  # first and longest wait between tries (doubling, with jitter)


class GrpcClient:
    def __init__(
        self,
        server: str,
        data: str,
        client_id: str,
        token: str | None = None,
        profile: str = "",
        model: str | None = None,
        tls: ClientTls | None = None,
        retry_s: float = 120.0,
        echo: Callable[[str], None] = print,
        runtime: str = "torch",
        threads: int | None = None,
    ) -> None:
        """`retry_s`: how long to keep trying a server that is unreachable or refuses for being busy.
        `runtime`: what trains on the device (a client runtime with a device side, edgefed/runtimes.py);
        `threads`: its CPU threads (None: its default)."""
        self.server = server
        self.data = data
        self.client_id = client_id
        self.metadata = bearer_metadata(token)
        self.profile = profile
        self.model = model
        self.retry_s = retry_s
        self.echo = echo
        self.tls = tls
        self.runtime_name = runtime
        self.runtime: DeviceRuntime = RUNTIMES.create(runtime).device_class()(self, threads)
        if token and tls is None and not is_loopback(server):
            echo(f"edgefed: warning: the bearer token travels to {server} in plaintext; pass --tls-ca")
        self.stub = pb_grpc.FederationStub(open_channel(server, tls, CHANNEL_MESSAGE_BYTES))
        self.meter: EnergyMeter | None = None  # the device's power sensors, found when it starts
        self.run_id = ""
        self.finished = threading.Event()  # a heartbeat said DONE
        self.jitter = random.Random()
        self.trained = 0
        self.pushing: int | None = None  # the round whose update is on the wire
        self.stopping: str | None = None  # why the client was asked to stop

    def stop(self, reason: str) -> None:
        """End the client (from a signal handler, on the main thread): a push on the wire is finished
        first; anything else (training, fetching, waiting) is abandoned at once."""
        self.stopping = reason
        if self.pushing is None:
            raise Stopped

    def run(self) -> int:
        """Train every round the server asks for until it says DONE or the client is stopped; returns the
        rounds trained."""
        self.meter = open_meter(self.echo)  # energy per local round, or one warning why not
        try:
            self._serve()
        except Stopped:
            self.echo(f"edgefed: {self.client_id}: stopped by {self.stopping}; work in progress abandoned")
        return self.trained

    def _serve(self) -> None:
        joined = self._call(self.stub.Join, self._join_request())
        if joined.session_token:  # a server without a token file knows this client by it from now on
            self.metadata = bearer_metadata(joined.session_token)
        self.run_id = joined.run_id
        # Live from Join: the server hears from it while it reads its data and builds its model.
        threading.Thread(target=self._keep_alive, args=(joined.heartbeat_s,), daemon=True).start()
        self.runtime.build(joined)
        poll_s = min(0.2, joined.heartbeat_s / 2)
        request = pb.HeartbeatRequest(run_id=self.run_id, client_id=self.client_id)
        while not self.finished.is_set():
            try:
                beat = self._call(self.stub.Heartbeat, request)
            except RunFinished:
                break
            if beat.action == pb.HeartbeatReply.DONE:
                break
            if beat.action == pb.HeartbeatReply.TRAIN:
                self.trained += self._train(beat.round)
                if self.stopping:
                    self.echo(f"edgefed: {self.client_id}: stopped by {self.stopping} after its push")
                    return
            else:
                time.sleep(poll_s)
        self.echo(f"edgefed: {self.client_id}: the run is finished ({self.trained} rounds trained)")

    def _join_request(self, num_examples: int = 0) -> pb.JoinRequest:
        return pb.JoinRequest(
            client_id=self.client_id,
            profile=self.profile,
            num_examples=num_examples,
            runtime=self.runtime_name,
        )

    def declare(self, num_examples: int) -> None:
        self._call(self.stub.Join, self._join_request(num_examples))  # its weight, declared once for the run

    def fetch(self, method: str, max_bytes: int = MAX_PAYLOAD_BYTES) -> Received:
        request = pb.FetchRequest(run_id=self.run_id, round=0, client_id=self.client_id)
        stream = getattr(self.stub, method)
        chunks = self._call(lambda r, **kw: list(stream(r, **kw)), request)
        return reassemble(chunks, Expected(self.run_id, 0, None, self.client_id, max_bytes))[0]

    def _train(self, round_number: int) -> int:
        request = pb.FetchRequest(run_id=self.run_id, round=round_number, client_id=self.client_id)
        try:
            chunks = self._call(lambda r, **kw: list(self.stub.FetchGlobal(r, **kw)), request)
            payload = reassemble(chunks, Expected(self.run_id, round_number, None, self.client_id))[0]
            if self.meter is not None:
                self.meter.start()
            update = self.runtime.fit(round_number, payload)
            if self.meter is not None:
                update.energy_j = self.meter.stop()
            self.pushing = round_number
            try:
                self.stub.PushUpdate(
                    update.chunks(self.run_id, round_number, self.client_id, self.runtime.chunk_bytes),
                    metadata=self.metadata,
                )
            finally:
                self.pushing = None
        except grpc.RpcError as error:
            if error.code() not in (*ROUND_REFUSALS, Code.UNAVAILABLE):
                raise
            self.echo(f"edgefed: {self.client_id}: round {round_number}: {error.details()}")
            return 0
        self.echo(
            f"edgefed: {self.client_id}: round {round_number}: {update.steps} steps, loss "
            f"{update.train_loss:.4f}, {update.train_s:.1f} s, sent {len(update.payload) / 1e6:.2f} MB"
            + ("" if update.energy_j is None else f", {update.energy_j:.1f} J ({self.meter.source})")
        )
        return 1

    def _call(self, method, request):
        """An RPC, tried again with backoff while the server is unreachable or busy (TRANSIENT, up to
        retry_s); a refusal becomes a clear error."""
        unary = isinstance(request, pb.JoinRequest | pb.HeartbeatRequest)
        failing_since, attempt = None, 0
        while True:
            try:
                if unary:
                    reply = method(request, metadata=self.metadata, timeout=UNARY_TIMEOUT_S)
                else:
                    reply = method(request, metadata=self.metadata)
                if failing_since is not None:
                    self.echo(f"edgefed: {self.client_id}: server {self.server} answers again")
                return reply
            except grpc.RpcError as error:
                if error.code() in TRANSIENT and (unary or error.code() == Code.UNAVAILABLE):
                    if error.code() == Code.UNAVAILABLE and self.finished.is_set():
                        raise RunFinished from None  # the server stopped after saying DONE
                    if failing_since is None:
                        how_long = "forever" if math.isinf(self.retry_s) else f"for up to {self.retry_s:g} s"
                        self.echo(
                            f"edgefed: {self.client_id}: server {self.server} {error.code().name} "
                            f"({printable(error.details() or '')}); trying again with backoff {how_long}"
                        )
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.retry_s:
                        raise EdgefedError(
                            f"server {self.server} unreachable or busy for {self.retry_s:g} s "
                            f"({error.code().name}: {error.details()})"
                        ) from None
                    time.sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                if error.code() in ROUND_REFUSALS and not unary:
                    raise
                raise EdgefedError(
                    f"server {self.server} refused {self.client_id}: {error.details()}"
                ) from None

    def _backoff(self, attempt: int) -> float:
        """Seconds before try `attempt + 1`: doubling from BACKOFF_S[0] up to BACKOFF_S[1], jittered so
        that clients refused together do not all come back together."""
        first, longest = BACKOFF_S
        return min(longest, first * 2**attempt) * self.jitter.uniform(0.5, 1.0)

    def _keep_alive(self, interval_s: float) -> None:
        """Heartbeats while the main thread trains, so the server does not take it for dead."""
        request = pb.HeartbeatRequest(run_id=self.run_id, client_id=self.client_id)
        while True:
            time.sleep(interval_s)
            try:
                beat = self.stub.Heartbeat(request, metadata=self.metadata, timeout=interval_s * 2)
            except grpc.RpcError:
                continue  # the main thread reports an unreachable server
            if beat.action == pb.HeartbeatReply.DONE:
                self.finished.set()
                return


class RunFinished(Exception):
    """The server said DONE and stopped serving."""


class Stopped(Exception):
    """The client was asked to stop (`GrpcClient.stop`)."""
