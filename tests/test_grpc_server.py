"""The Federation server against raw protocol messages on loopback: auth, rounds, drops, bad input, fuzz.

Every refusal must reach the sender as a status with a clear message, leave the round's collected
updates as they were, and leave the server serving: each bad-input case ends with a good update
that is accepted and comes out of the round unchanged.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefed.codecs import encode_state, make_codec
from edgefed.transport.auth import bearer_metadata
from edgefed.transport.grpc_client import CHANNEL_MESSAGE_BYTES
from edgefed.transport.grpc_server import GrpcTransport
from edgefed.transport.servicer import FederationServicer
from edgefed.wire.channels import ClientTls, ServerTls, open_channel
from edgefed.wire.framing import tensor_checksum
from edgefed.wire.sending import chunk_stream
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import (
    CLIENTS,
    HEARTBEAT_S,
    RUN_ID,
    TOKENS,
    auth,
    good_delta,
    keep_beating,
    refusal,
    self_signed_certificate,
    update_chunks,
)

Code = grpc.StatusCode


def test_join_gives_token_file_slots_and_a_rejoin_keeps_them(federation):
    reply = federation.join("client-2")
    assert (reply.run_id, reply.client_index, reply.num_labels) == (RUN_ID, 2, 2)
    assert list(reply.head_modules) == ["classifier"] and reply.model_fingerprint == "f" * 64
    assert 'codec = "none"' in reply.config_toml
    assert federation.join("client-0").client_index == 0
    assert federation.join("client-2").client_index == 2
    chunks = list(
        federation.stub.FetchSetup(
            pb.FetchRequest(run_id=RUN_ID, client_id="client-2"), metadata=auth("client-2")
        )
    )
    assert chunks[-1].last and chunks[0].round == 0


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), Code.UNAUTHENTICATED, "missing bearer token"),
        (bearer_metadata("not-a-token-of-anyone"), Code.UNAUTHENTICATED, "unknown bearer token"),
        (auth("client-1"), Code.PERMISSION_DENIED, "belongs to 'client-1', not 'client-0'"),
    ],
)
def test_every_call_needs_the_clients_own_token(federation, metadata, code, message):
    join = refusal(lambda: federation.stub.Join(pb.JoinRequest(client_id="client-0"), metadata=metadata))
    assert join.code() == code and message in join.details()
    for client in CLIENTS[:2]:
        federation.join(client)
    federation.open_round(1, [0, 1])  # both updates due: the token's owner may push, but not as client-0
    push = refusal(lambda: federation.push(update_chunks(good_delta()), metadata=metadata))
    assert push.code() == code and message in push.details()


def test_a_round_collects_the_sampled_clients_updates_and_counts_their_bytes(federation):
    for client in CLIENTS[:2]:
        federation.join(client)
    stop = threading.Event()
    keep_beating(federation, CLIENTS[:2], stop)
    round_1 = federation.open_round(1, [0, 1])
    assert federation.beat("client-0").action == pb.HeartbeatReply.TRAIN
    assert "has not joined this run" in refusal(lambda: federation.beat("client-2")).details()
    fetched = list(
        federation.stub.FetchGlobal(
            pb.FetchRequest(run_id=RUN_ID, round=1, client_id="client-0"), metadata=auth("client-0")
        )
    )
    sent = [
        update_chunks(good_delta(seed), client, steps=seed + 2) for seed, client in enumerate(CLIENTS[:2])
    ]
    for chunks, client in zip(sent, CLIENTS[:2], strict=True):
        assert "accepted" in federation.push(chunks, client).message
    result = round_1.result(timeout=10)
    stop.set()
    assert [update.client_id for update in result.updates] == [0, 1] and result.dropped == []
    assert [update.steps for update in result.updates] == [2, 3]
    torch.testing.assert_close(result.updates[1].delta, good_delta(1), rtol=0, atol=0)
    assert result.bytes_up == sum(c.ByteSize() + 5 for chunks in sent for c in chunks)
    assert result.bytes_down == sum(c.ByteSize() + 5 for c in fetched)
    assert federation.beat("client-0").action == pb.HeartbeatReply.WAIT  # the round has closed


def test_a_dead_client_is_dropped_and_rejoins_the_next_round(federation):
    for client in CLIENTS[:2]:
        federation.join(client)
    stop = threading.Event()
    keep_beating(federation, ["client-0"], stop)  # client-1 falls silent: dead
    round_1 = federation.open_round(1, [0, 1])
    federation.push(update_chunks(good_delta(), "client-0"), "client-0")
    result = round_1.result(timeout=10)
    assert [u.client_id for u in result.updates] == [0] and result.dropped == [1]
    assert any("dropped client 1 (no heartbeat" in line for line in federation.log)
    late = refusal(lambda: federation.push(update_chunks(good_delta(), "client-1"), "client-1"))
    assert late.code() == Code.FAILED_PRECONDITION
    assert federation.join("client-1").client_index == 1  # back, in the same slot
    round_2 = federation.open_round(2, [0, 1])
    assert federation.beat("client-1").action == pb.HeartbeatReply.TRAIN
    for client in CLIENTS[:2]:
        federation.push(update_chunks(good_delta(), client, round_number=2), client)
    assert [u.client_id for u in round_2.result(timeout=10).updates] == [0, 1]
    stop.set()


def test_a_stalled_client_is_dropped_at_the_deadline(federation):
    federation.transport.deadline_s = 0.5
    for client in CLIENTS[:2]:
        federation.join(client)
    stop = threading.Event()
    keep_beating(federation, CLIENTS[:2], stop)  # both alive; client-1 never pushes
    round_1 = federation.open_round(1, [0, 1])
    federation.push(update_chunks(good_delta(), "client-0"), "client-0")
    result = round_1.result(timeout=10)
    stop.set()
    assert result.dropped == [1] and any("missed the round's deadline" in line for line in federation.log)


def replace_tensor(delta_overrides: dict, **first):
    delta = {**good_delta(), **delta_overrides}
    return lambda: update_chunks({k: v for k, v in delta.items() if v is not None}, **first)


def corrupt_tensor_bytes():
    encoded = encode_state(make_codec("none"), good_delta())
    message = pb.StatePayload(
        tensors=[
            pb.Tensor(
                name=t.name,
                shape=list(t.shape),
                dtype=t.dtype,
                codec=t.codec,
                data=t.data[:-4] + b"\x00\x00\x80\x7f",
                crc32c=tensor_checksum(t),
            )
            for t in encoded
        ]
    )
    return list(
        chunk_stream(message.SerializeToString(), RUN_ID, 1, "client-0", 1024, num_examples=1, steps=1)
    )


def garbage_payload():
    garbage = bytes(range(7, 256)) * 3  # not a StatePayload: field 0 is invalid
    return list(chunk_stream(b"\x00" + garbage, RUN_ID, 1, "client-0", 1024, num_examples=1, steps=1))


BAD_UPDATES = {
    "wrong run id": (
        lambda: update_chunks(good_delta(), run_id="run-from-yesterday"),
        Code.FAILED_PRECONDITION,
        "wrong run id",
    ),
    "wrong round": (
        lambda: update_chunks(good_delta(), round_number=7),
        Code.FAILED_PRECONDITION,
        "round 7 is not open",
    ),
    "not sampled": (
        lambda: update_chunks(good_delta(), client="client-2"),
        Code.FAILED_PRECONDITION,
        "not sampled",
    ),
    "wrong name": (
        replace_tensor({"encoder.query.lora_A": None, "encoder.key.lora_A": torch.zeros(4, 64)}),
        Code.INVALID_ARGUMENT,
        "unknown ['encoder.key.lora_A']",
    ),
    "wrong shape": (
        replace_tensor({"encoder.query.lora_A": torch.zeros(4, 63)}),
        Code.INVALID_ARGUMENT,
        "float32[4, 64] is expected",
    ),
    "wrong dtype": (
        replace_tensor({"encoder.query.lora_A": torch.zeros(4, 64, dtype=torch.float64)}),
        Code.INVALID_ARGUMENT,
        "float64[4, 64] where",
    ),
    "NaN": (
        replace_tensor({"classifier.weight": torch.full((2, 64), float("nan"))}),
        Code.INVALID_ARGUMENT,
        "NaN or Inf",
    ),
    "Inf": (
        replace_tensor({"classifier.weight": torch.full((2, 64), float("inf"))}),
        Code.INVALID_ARGUMENT,
        "NaN or Inf",
    ),
    "norm over the bound": (
        replace_tensor({"classifier.weight": torch.full((2, 64), 10.0)}),
        Code.INVALID_ARGUMENT,
        "over the bound 50",
    ),
    "no examples": (replace_tensor({}, num_examples=0), Code.INVALID_ARGUMENT, "must report its examples"),
    "NaN loss": (replace_tensor({}, train_loss=float("nan")), Code.INVALID_ARGUMENT, "must be finite"),
    "negative energy": (replace_tensor({}, energy_j=-1.0), Code.INVALID_ARGUMENT, "energy must be finite"),
    "infinite energy": (
        replace_tensor({}, energy_j=float("inf")),
        Code.INVALID_ARGUMENT,
        "energy must be finite",
    ),
    "truncated stream": (lambda: update_chunks(good_delta())[:-1], Code.INVALID_ARGUMENT, "truncated"),
    "chunks out of order": (
        lambda: update_chunks(good_delta())[::-1],
        Code.INVALID_ARGUMENT,
        "arrived where chunk 0",
    ),
    "tensor CRC32C": (corrupt_tensor_bytes, Code.INVALID_ARGUMENT, "CRC32C mismatch"),
    "garbage payload": (garbage_payload, Code.INVALID_ARGUMENT, "not a StatePayload"),
    "oversized message": (
        lambda: [pb.Chunk(run_id=RUN_ID, round=1, client_id="client-0", last=True, data=bytes(100_000))],
        Code.RESOURCE_EXHAUSTED,
        "",
    ),
    "empty stream": (lambda: [], Code.INVALID_ARGUMENT, "empty update stream"),
}


@pytest.fixture
def open_round_1(federation):
    for client in CLIENTS:
        federation.join(client)
    stop = threading.Event()
    keep_beating(federation, CLIENTS, stop)
    future = federation.open_round(1, [0, 1])
    yield federation, future
    stop.set()


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_a_bad_update_is_refused_clearly_and_changes_nothing(open_round_1, case):
    federation, future = open_round_1
    make_chunks, code, message = BAD_UPDATES[case]
    chunks = make_chunks()
    owner = chunks[0].client_id if chunks else "client-0"
    error = refusal(lambda: federation.push(chunks, owner))
    assert error.code() == code and message in error.details(), error.details()
    assert federation.servicer.rounds.current.updates == {}
    # The server is still up and its round intact: good updates are accepted and come out unchanged.
    for seed, client in enumerate(CLIENTS[:2]):
        federation.push(update_chunks(good_delta(seed), client), client)
    result = future.result(timeout=10)
    assert [u.client_id for u in result.updates] == [0, 1]
    torch.testing.assert_close(result.updates[0].delta, good_delta(0), rtol=0, atol=0)


def test_a_duplicate_update_is_refused(open_round_1):
    federation, future = open_round_1
    federation.push(update_chunks(good_delta(5)))
    error = refusal(lambda: federation.push(update_chunks(good_delta(6))))
    assert error.code() == Code.ALREADY_EXISTS and "already pushed round 1" in error.details()
    federation.push(update_chunks(good_delta(), "client-1"), "client-1")
    torch.testing.assert_close(future.result(timeout=10).updates[0].delta, good_delta(5), rtol=0, atol=0)


def test_garbage_bytes_instead_of_a_message_are_refused(open_round_1):
    federation, _ = open_round_1
    raw = federation.channel.stream_unary(
        "/edgefed.v1.Federation/PushUpdate",
        request_serializer=lambda data: data,
        response_deserializer=pb.PushReply.FromString,
    )
    error = refusal(lambda: raw(iter([b"\xff\xff\xff\xff garbage"]), metadata=auth("client-0")))
    assert error.code() in (Code.INTERNAL, Code.INVALID_ARGUMENT, Code.UNKNOWN)
    assert federation.beat("client-0").action == pb.HeartbeatReply.TRAIN


CHUNK_FIELDS = st.fixed_dictionaries(
    {
        "run_id": st.sampled_from([RUN_ID, "", "other-run"]),
        "round": st.integers(-1, 3),
        "client_id": st.sampled_from([*CLIENTS, "", "mallory"]),
        "index": st.integers(0, 3),
        "last": st.booleans(),
        "framing": st.sampled_from([2, 2, 2, 0, 1, 3]),  # mostly the current framing, to reach the checks
        "data": st.binary(max_size=1500),
        "num_examples": st.integers(-(2**40), 2**40),
        "train_loss": st.floats(allow_nan=True, allow_infinity=True),
        "steps": st.integers(-5, 5),
        "train_s": st.floats(allow_nan=True, allow_infinity=True),
    }
)
MESSAGES = st.one_of(
    st.lists(CHUNK_FIELDS.map(lambda fields: pb.Chunk(**fields).SerializeToString()), min_size=1, max_size=4),
    # A valid stream with a few bytes flipped, cut or inserted.
    st.tuples(
        st.integers(0, 10**6), st.binary(min_size=1, max_size=8), st.sampled_from(["flip", "cut", "insert"])
    ),
    st.lists(st.binary(max_size=300), min_size=1, max_size=3),
)


def test_fuzzed_streams_never_crash_the_server_or_corrupt_the_round(federation):
    """A few thousand random and mutated PushUpdate messages; only client-2 is sampled, and whatever it
    manages to get accepted must be its genuine delta (every tensor is CRC32C-checked)."""
    for client in CLIENTS:
        federation.join(client)
    # Thousands of streams load the server and this process: a wider heartbeat window, so that a
    # heartbeat held up by the load does not drop client-2 (dropping is tested on its own above).
    federation.servicer.clients.heartbeat_s = 10 * HEARTBEAT_S
    stop = threading.Event()
    keep_beating(federation, CLIENTS, stop)
    future = federation.open_round(1, [2])
    raw = federation.channel.stream_unary(
        "/edgefed.v1.Federation/PushUpdate",
        request_serializer=lambda data: data,
        response_deserializer=pb.PushReply.FromString,
    )
    genuine = [c.SerializeToString() for c in update_chunks(good_delta(9), "client-2", chunk_bytes=512)]
    sent = [0]

    @settings(
        max_examples=1200,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(MESSAGES, st.sampled_from(CLIENTS))
    def fuzz(message, token_owner):
        if isinstance(message, tuple):
            position, noise, how = message
            which = position % len(genuine)
            chunk, at = genuine[which], position % len(genuine[which])
            mutated = {
                "flip": chunk[:at] + bytes(b ^ 0xA5 for b in noise) + chunk[at + len(noise) :],
                "cut": chunk[:at],
                "insert": chunk[:at] + noise + chunk[at:],
            }[how]
            message = [*genuine[:which], mutated, *genuine[which + 1 :]]
        sent[0] += len(message)
        try:
            raw(iter(message), metadata=auth(token_owner), timeout=5)
        except grpc.RpcError as error:
            assert error.code() != Code.DEADLINE_EXCEEDED, "the server stopped answering"

    fuzz()
    assert sent[0] >= 3000
    assert federation.beat("client-2").action in (pb.HeartbeatReply.TRAIN, pb.HeartbeatReply.WAIT)
    round_state = federation.servicer.rounds.current  # None: a stream was accepted (bytes flipped in
    # a padding field leave every value and checksum as they were), and it must be the genuine delta
    if round_state is not None and 2 not in round_state.updates:
        federation.push(update_chunks(good_delta(9), "client-2"), "client-2")
    result = future.result(timeout=10)
    stop.set()
    assert [u.client_id for u in result.updates] == [2]
    torch.testing.assert_close(result.updates[0].delta, good_delta(9), rtol=0, atol=0)
    assert result.updates[0].num_examples > 0 and result.updates[0].steps > 0


def test_tls_serves_clients_that_trust_the_certificate_and_no_plaintext(federation):
    key, certificate = self_signed_certificate()
    servicer = FederationServicer(
        federation.servicer.run, TOKENS, heartbeat_s=HEARTBEAT_S, log=lambda _: None
    )
    secure = GrpcTransport(
        servicer, "127.0.0.1:0", min_clients=1, deadline_s=30, tls=ServerTls(key, certificate)
    )
    try:
        with open_channel(secure.address, ClientTls(certificate), CHANNEL_MESSAGE_BYTES) as channel:
            reply = pb_grpc.FederationStub(channel).Join(
                pb.JoinRequest(client_id="client-1"), metadata=auth("client-1")
            )
            assert reply.client_index == 1
        with grpc.insecure_channel(secure.address) as channel:
            plaintext = pb_grpc.FederationStub(channel).Join
            error = refusal(
                lambda: plaintext(pb.JoinRequest(client_id="client-1"), metadata=auth("client-1"), timeout=5)
            )
            assert error.code() == Code.UNAVAILABLE
    finally:
        secure.close()
