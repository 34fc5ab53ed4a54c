"""A Federation server on loopback and the raw protocol calls that tests make to it."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
import torch

from edgefed.codecs import encode_state, make_codec
from edgefed.config import RunConfig
from edgefed.transport.auth import TokenBook, bearer_metadata
from edgefed.transport.base import RoundResult, state_payload
from edgefed.transport.grpc_server import GrpcTransport
from edgefed.transport.servicer import FederationServicer, RunDescription, RuntimeOffer
from edgefed.wire.sending import chunk_stream, serialize_state
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

RUN_ID = "run-under-test"
CLIENTS = ["client-0", "client-1", "client-2"]
TOKENS = TokenBook([(name, f"secret-token-of-{name}") for name in CLIENTS])
MAX_NORM = 50.0
HEARTBEAT_S = 0.2
EXAMPLES = 10  # each client's declared training examples, as its updates report them
Code = grpc.StatusCode


def global_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder.query.lora_A": torch.randn(4, 64, generator=generator),
        "encoder.query.lora_B": torch.zeros(64, 4),
        "classifier.weight": torch.randn(2, 64, generator=generator),
    }


def good_delta(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.01 * torch.randn(t.shape, generator=generator) for name, t in global_state().items()}


def update_chunks(delta, client="client-0", round_number=1, run_id=RUN_ID, chunk_bytes=1024, **first):
    payload = serialize_state(encode_state(make_codec("none"), delta))
    fields = {"num_examples": EXAMPLES, "train_loss": 0.5, "steps": 3, "train_s": 0.1, **first}
    return list(chunk_stream(payload, run_id, round_number, client, chunk_bytes, **fields))


@dataclass
class Federation:
    transport: GrpcTransport
    servicer: FederationServicer
    channel: grpc.Channel
    stub: pb_grpc.FederationStub
    log: list[str]
    sessions: dict[str, str] = dataclasses.field(default_factory=dict)  # without a token file

    def join(self, client: str, num_examples: int = EXAMPLES, runtime: str = "") -> pb.JoinReply:
        request = pb.JoinRequest(client_id=client, num_examples=num_examples, runtime=runtime)
        reply = self.stub.Join(request, metadata=self.auth(client))
        if reply.session_token:
            self.sessions[client] = reply.session_token
        return reply

    def auth(self, client: str) -> tuple[tuple[str, str], ...]:
        """The client's metadata: its line of TOKENS, or the session token its Join was given."""
        if self.servicer.clients.tokens is not None:
            return auth(client)
        return bearer_metadata(self.sessions.get(client))

    def beat(self, client: str) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(
            pb.HeartbeatRequest(run_id=RUN_ID, client_id=client), metadata=self.auth(client)
        )

    def push(self, chunks, client="client-0", metadata=None) -> pb.PushReply:
        metadata = self.auth(client) if metadata is None else metadata
        return self.stub.PushUpdate(iter(chunks), metadata=metadata)

    def open_round(self, number: int, sampled: list[int]) -> Future:
        """Run the transport's round in a thread, as the FederatedServer would; the future gets its result."""
        future: Future[RoundResult] = Future()
        thread = threading.Thread(
            target=lambda: future.set_result(self.transport.fit_round(number, sampled, global_state())),
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + 5
        while (
            self.servicer.rounds.current is None or self.servicer.rounds.current.number != number
        ) and time.monotonic() < deadline:
            time.sleep(0.005)
        return future


def auth(client: str):
    return bearer_metadata(TOKENS.token_for(client))


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@contextmanager
def serve_federation(
    tokens: TokenBook | None = TOKENS, runtimes: Mapping[str, RuntimeOffer] | None = None, **servicer_options
) -> Iterator[Federation]:
    """A Federation server for 3 clients on loopback, with a stub to call it. `runtimes`: what it
    offers the clients' runtimes (default: torch, which fetches no files)."""
    config = RunConfig(clients=3, codec="none", max_update_norm=MAX_NORM, chunk_bytes=1024, min_clients=1)
    setup = {"encoder.query.residual_sha256": torch.arange(32, dtype=torch.uint8)}
    description = RunDescription(RUN_ID, config, 2, ("classifier",), "f" * 64, state_payload(setup))
    if runtimes is not None:
        description = dataclasses.replace(description, runtimes=runtimes)
    log: list[str] = []
    servicer = FederationServicer(
        description, tokens, heartbeat_s=HEARTBEAT_S, log=log.append, **servicer_options
    )
    transport = GrpcTransport(servicer, "127.0.0.1:0", min_clients=1, deadline_s=30)
    channel = grpc.insecure_channel(transport.address)
    try:
        yield Federation(transport, servicer, channel, pb_grpc.FederationStub(channel), log)
    finally:
        channel.close()
        transport.close()


def keep_beating(federation: Federation, clients: list[str], stop: threading.Event) -> threading.Thread:
    def beat():
        while not stop.is_set():
            try:
                for client in clients:
                    federation.beat(client)
            except (grpc.RpcError, ValueError):  # the fixture closed the server (or the channel) first
                return
            time.sleep(HEARTBEAT_S / 2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A throwaway (key, certificate) pair in PEM for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefed test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)
