"""A server that one slow or hostile client cannot stall, steer or flood. Each test is an attack that
once worked against a live server on loopback; all are bounded in count and time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from edgefed.aggregators import AGGREGATORS
from edgefed.aggregators.base import bounded_shares
from edgefed.config import RunConfig
from edgefed.errors import EdgefedError
from edgefed.federation.atomic import write_text_atomic
from edgefed.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgefed.federation.loop import FederatedServer
from edgefed.federation.runner import serve
from edgefed.transport import grpc_client
from edgefed.transport.base import Roster, Transport, state_payload
from edgefed.transport.clients import MISSED_HEARTBEATS, ClientBook
from edgefed.transport.grpc_client import CHANNEL_MESSAGE_BYTES, GrpcClient
from edgefed.transport.grpc_server import GrpcTransport
from edgefed.transport.refusals import LINES_PER_WINDOW as REFUSAL_LINES
from edgefed.transport.runtime_files import DOWNLOADS
from edgefed.transport.servicer import FederationServicer, RunDescription, RuntimeOffer
from edgefed.types import ClientUpdate, Evaluation, RoundResult
from edgefed.wire.channels import SERVER_STREAM_WINDOW, ClientTls, ServerTls, open_channel, start_server
from edgefed.wire.framing import Expected, reassemble, wire_size
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import (
    CLIENTS,
    EXAMPLES,
    HEARTBEAT_S,
    RUN_ID,
    TOKENS,
    auth,
    good_delta,
    keep_beating,
    refusal,
    self_signed_certificate,
    serve_federation,
    update_chunks,
)

Code = grpc.StatusCode
STALLED = 16
CONNECTION_STATE = 256 << 10  # what gRPC holds for one open connection and its stream, at most


def silent_push(federation, client: str, stop: threading.Event) -> grpc.Future:
    """A PushUpdate stream that sends nothing until `stop` is set."""

    def nothing():
        stop.wait()
        yield from ()

    return federation.stub.PushUpdate.future(nothing(), metadata=federation.auth(client))


@pytest.mark.parametrize("tokens", [TOKENS, None], ids=["tokens", "open"])
def test_silent_streams_of_one_client_leave_the_others_served_and_are_cancelled(tokens):
    with serve_federation(tokens, stream_idle_s=1.0) as federation:
        for client in CLIENTS:
            federation.join(client)
        round_1 = federation.open_round(1, [0, 1])  # client-0's update is due: its streams get in
        stop, beating = threading.Event(), threading.Event()
        stalled = [silent_push(federation, "client-0", stop) for _ in range(STALLED)]
        try:
            keep_beating(federation, ["client-0", "client-1"], beating)  # both stay connected
            for _ in range(10):  # the worker pool has 14 threads: 16 held streams would starve these
                assert (
                    federation.stub.Heartbeat(
                        pb.HeartbeatRequest(run_id=RUN_ID, client_id="client-1"),
                        metadata=federation.auth("client-1"),
                        timeout=2,
                    ).action
                    == pb.HeartbeatReply.TRAIN
                )
            refused = [call for call in stalled if call.done()]
            assert len(refused) >= STALLED - 2, "a client holds at most two streams"
            assert all(call.exception().code() == Code.RESOURCE_EXHAUSTED for call in refused)
            deadline = time.monotonic() + 10
            while not all(call.done() for call in stalled) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert all(
                call.exception().code() in (Code.RESOURCE_EXHAUSTED, Code.CANCELLED) for call in stalled
            )
            # The caller sees CANCELLED before the server's handler thread has unwound and let go.
            while federation.servicer.streams.open_streams() and time.monotonic() < deadline + 5:
                time.sleep(0.05)
            assert federation.servicer.streams.open_streams() == 0
            assert any(
                "cancelled PushUpdate" in line and "no message for 1 s" in line for line in federation.log
            )
            for client in CLIENTS[:2]:  # the attacker's slot still takes an honest update
                federation.push(update_chunks(good_delta(), client), client)
            assert sorted(u.client_id for u in round_1.result(timeout=10).updates) == [0, 1]
        finally:
            stop.set()
            beating.set()


class BusyServer(pb_grpc.FederationServicer):
    """Refuses the first heartbeats as an overloaded server does, then says the run is DONE."""

    def __init__(self, refusals: int) -> None:
        self.calls, self.refusals = 0, refusals

    def Heartbeat(self, request, context):
        self.calls += 1
        if self.calls <= self.refusals:
            code = Code.RESOURCE_EXHAUSTED if self.calls % 2 else Code.UNAVAILABLE
            context.abort(code, "Concurrent RPC limit exceeded!")
        return pb.HeartbeatReply(action=pb.HeartbeatReply.DONE)


def test_a_client_retries_a_busy_server_with_backoff_instead_of_exiting(monkeypatch):
    monkeypatch.setattr(grpc_client, "BACKOFF_S", (0.01, 0.05))
    busy = BusyServer(refusals=4)
    server, port = start_server(
        [lambda s: pb_grpc.add_FederationServicer_to_server(busy, s)],
        "127.0.0.1:0",
        max_message_bytes=1 << 20,
        workers=2,
        max_concurrent_rpcs=4,
    )
    try:
        client = GrpcClient(f"127.0.0.1:{port}", "unused", "client-0", echo=lambda line: None)
        beat = client._call(client.stub.Heartbeat, pb.HeartbeatRequest(run_id="r", client_id="client-0"))
        assert beat.action == pb.HeartbeatReply.DONE and busy.calls == 5
        client.retry_s, busy.calls = 0.05, 0
        busy.refusals = 1000
        with pytest.raises(EdgefedError, match=r"unreachable or busy for 0\.05 s"):
            client._call(client.stub.Heartbeat, pb.HeartbeatRequest(run_id="r", client_id="client-0"))
    finally:
        server.stop(0)


def test_a_client_declares_its_examples_once_within_the_cap(federation):
    join = federation.stub.Join
    too_many = refusal(lambda: federation.join("client-0", num_examples=10**15))
    assert too_many.code() == Code.INVALID_ARGUMENT and "max-client-examples" in too_many.details()
    federation.join("client-0")
    changed = refusal(lambda: federation.join("client-0", num_examples=EXAMPLES + 1))
    assert changed.code() == Code.FAILED_PRECONDITION and "fixed for the run" in changed.details()
    assert join(pb.JoinRequest(client_id="client-0"), metadata=auth("client-0")).client_index == 0
    federation.join("client-1", num_examples=0)  # joined, count not declared yet
    round_1 = federation.open_round(1, [0, 1])
    lying = refusal(lambda: federation.push(update_chunks(good_delta(), num_examples=10**15)))
    assert lying.code() == Code.INVALID_ARGUMENT and f"declared {EXAMPLES} at Join" in lying.details()
    undeclared = refusal(lambda: federation.push(update_chunks(good_delta(), "client-1"), "client-1"))
    assert (
        undeclared.code() == Code.FAILED_PRECONDITION
        and "declared its training examples" in undeclared.details()
    )
    federation.join("client-1")
    for client in CLIENTS[:2]:
        federation.push(update_chunks(good_delta(), client), client)
    assert [u.num_examples for u in round_1.result(timeout=10).updates] == [EXAMPLES, EXAMPLES]


def test_declared_counts_survive_a_server_restart(federation):
    federation.join("client-0", num_examples=7)
    restarted = FederationServicer(federation.servicer.run, TOKENS, federation.transport.roster(), log=print)
    assert restarted.clients.examples == {0: 7}


class ScriptedTransport(Transport):
    """Rounds whose results a test writes: the network's part, so the loop's own is what is tested."""

    def __init__(self, results: list[RoundResult]) -> None:
        self.results = results

    def wait_for_clients(self) -> list[int]:
        return [0, 1, 2]

    def fit_round(self, round_number, clients, global_state) -> RoundResult:
        return self.results.pop(0)


class Recorded:
    """A round policy that keeps what the loop hands it."""

    def __init__(self) -> None:
        self.rounds = []

    def keep(self, metrics, global_state) -> None:
        self.rounds.append(metrics)

    def should_stop(self, metrics) -> bool:
        return False


def test_no_client_outweighs_its_share_and_a_rerun_round_keeps_its_bytes():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)

    def update(client: int, value: float, examples: float) -> ClientUpdate:
        return ClientUpdate(client, {"weight": torch.full((1, 1), value)}, examples, 0.5, 1, 0.1)

    results = [
        RoundResult([update(0, 1.0, 10)], [1, 2], bytes_up=100, bytes_down=300, client_bytes={0: (100, 100)}),
        RoundResult(
            [update(0, 100.0, 10**15), update(1, 1.0, 10), update(2, 1.0, 10)],
            bytes_up=60,
            bytes_down=90,
            client_bytes={0: (30, 20), 1: (30, 20), 2: (30, 20)},
        ),
    ]
    policy = Recorded()
    server = FederatedServer(
        model,
        AGGREGATORS.create("fedavg"),
        [],
        ScriptedTransport(results),
        lambda model: Evaluation(0.5, 1.0),
        num_clients=3,
        sample_fraction=1.0,
        seed=0,
        echo=lambda line: None,
        max_share=0.5,
    )
    state = server.run(1, policy)
    assert state["weight"].item() == pytest.approx(0.5 * 100 + 0.25 + 0.25)  # the liar weighs half, not all
    assert [m.round for m in policy.rounds] == [0, 1], "only the round that completed is kept"
    last = policy.rounds[-1]
    assert (last.bytes_up, last.bytes_down) == (160, 390), (
        "the discarded attempt's bytes crossed the wire too"
    )
    assert last.client_bytes[0] == [130, 120]


@pytest.mark.parametrize(
    ("counts", "share"),
    [([10**15, 10, 10, 10], 0.5), ([5, 5, 90], 0.4), ([1, 2, 3, 4, 100], 0.25), ([3, 1], 0.3)],
)
def test_bounded_shares_cap_the_largest_and_keep_the_rest(counts, share):
    updates = [ClientUpdate(k, {}, n, 0.0, 1, 0.0) for k, n in enumerate(counts)]
    weights = [u.num_examples for u in bounded_shares(updates, share)]
    assert max(weights) / sum(weights) <= max(share, 1 / len(counts)) + 1e-9
    cap = max(weights)
    if share * len(counts) > 1:  # feasible: counts under the cap are kept, the others drop to it
        assert weights == [min(n, cap) for n in counts]


def test_unauthenticated_senders_cost_the_server_no_memory(tmp_path):
    """32 callers without a token, each on its own connection, send 16 MiB messages to each service (the
    Split one too): the server's peak memory moves by a few MB, since no request without a token is read."""
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time, torch
            from edgefed.config import RunConfig
            from edgefed.split import BodySlot, SplitBodyServicer
            from edgefed.transport.auth import TokenBook
            from edgefed.transport.grpc_server import GrpcTransport
            from edgefed.transport.servicer import FederationServicer, RunDescription
            run = RunDescription("run", RunConfig(method="fedbert", clients=2), 0, ("cls",), "f", b"")
            tokens = TokenBook([("client-0", "token-of-client-0"), ("client-1", "token-of-client-1")])
            federation = FederationServicer(run, tokens, log=lambda line: None)
            body = torch.nn.Linear(4, 4)
            split = SplitBodyServicer(BodySlot(body, torch.optim.SGD(body.parameters(), lr=0.1)), "run")
            transport = GrpcTransport(federation, "127.0.0.1:0", 2, 600.0, split=split)
            print(transport.address.rsplit(":", 1)[1], federation.split_port, flush=True)
            time.sleep(600)
            """
        )
    )
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port, split_port = server.stdout.readline().split()
        big = bytes(16 << 20)
        options = [("grpc.max_send_message_length", 64 << 20)]
        before = peak_rss(server.pid)

        def send(index: int) -> Code:
            """One sender on its own connection: a Join, or (every other one) a Split stream."""
            address = f"127.0.0.1:{port if index % 2 else split_port}"
            try:
                with grpc.insecure_channel(address, options) as channel:
                    if index % 2:
                        channel.unary_unary("/edgefed.v1.Federation/Join")(big, timeout=20)
                    else:
                        list(channel.stream_stream("/edgefed.v1.Split/Exchange")(iter([big]), timeout=20))
            except grpc.RpcError as error:
                return error.code()
            return Code.OK

        with ThreadPoolExecutor(STALLED) as pool:
            codes = list(pool.map(send, range(2 * STALLED)))
        growth = peak_rss(server.pid) - before
        assert set(codes) <= {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED}, codes
        # Reading the requests would cost 512 MiB. What remains is what the senders put in flight before
        # the refusal lands, at most the server's fixed stream window (SERVER_STREAM_WINDOW) on each of the
        # 2 * STALLED connections, and gRPC's state per connection (well under CONNECTION_STATE). Measured:
        # 2-8 MiB alone, 19 MiB beside a busy test suite.
        bound = 2 * STALLED * (SERVER_STREAM_WINDOW + CONNECTION_STATE)
        assert growth < bound, f"the server's peak memory grew by {growth / 2**20:.0f} MiB"
    finally:
        server.kill()
        server.wait()


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_client_is_live_from_join_while_it_builds_its_model(federation, monkeypatch):
    client = GrpcClient(
        federation.transport.address, "unused", "client-1", token=TOKENS.token_for("client-1"), echo=print
    )
    alive = []

    def slow_build(joined):  # an edge device loading its model: many heartbeat intervals
        for _ in range(8):
            time.sleep(HEARTBEAT_S)
            with federation.servicer.condition:
                alive.append(joined.client_index in federation.servicer.connected())
        federation.servicer.finished = True

    monkeypatch.setattr(client.runtime, "build", slow_build)
    client.run()
    assert alive and all(alive)


def test_bytes_count_only_for_accepted_updates_and_their_sender(federation):
    for client in CLIENTS:
        federation.join(client)
    round_1 = federation.open_round(1, [0, 1])
    spoofed = update_chunks(good_delta())
    for chunk in spoofed[1:]:
        chunk.client_id = "client-1"
    refused = refusal(lambda: federation.push(spoofed))
    assert "in the stream of 'client-0'" in refused.details()
    nan = update_chunks({**good_delta(), "classifier.weight": torch.full((2, 64), float("nan"))})
    refusal(lambda: federation.push(nan))
    pushed = {client: update_chunks(good_delta(), client) for client in CLIENTS[:2]}
    for client, chunks in pushed.items():
        federation.push(chunks, client)
    result = round_1.result(timeout=10)
    for slot, client in enumerate(CLIENTS[:2]):
        assert result.client_bytes[slot][1] == sum(map(wire_size, pushed[client]))
    assert result.bytes_up == sum(sum(map(wire_size, chunks)) for chunks in pushed.values())


def test_client_strings_are_escaped_and_cut_short_in_the_log():
    with serve_federation(tokens=None) as federation:
        forged = "evil\nedgefed: round 1: dropped client 0"
        federation.stub.Join(pb.JoinRequest(client_id=forged))
        federation.stub.Join(pb.JoinRequest(client_id="x" * 3000))
        huge = refusal(lambda: federation.stub.Join(pb.JoinRequest(client_id="y" * 10_000)))
        assert huge.code() == Code.INVALID_ARGUMENT and "limit is 4,096" in huge.details()
        assert all("\n" not in line and len(line) < 500 for line in federation.log)
        assert any("evil\\nedgefed: round 1" in line for line in federation.log)


@pytest.mark.parametrize(
    "paths",
    [
        {"data": "/srv/secret/place/sst2"},
        {"model": "/srv/secret/models/minilm"},
        {"tasks": ("/srv/secret/mr", "/srv/secret/trec"), "eval_tasks": ("/srv/secret/cr",)},
        {"out": "/srv/secret/runs/a"},
    ],
)
def test_the_join_reply_says_nothing_of_the_servers_paths(paths):
    """Every setting that names a file or folder: the client learns its name, never where it lies."""
    config = RunConfig(clients=3, **paths)
    description = RunDescription(RUN_ID, config, 2, ("classifier",), "f" * 64, state_payload({}))
    servicer = FederationServicer(description, TOKENS, log=lambda line: None)
    transport = GrpcTransport(servicer, "127.0.0.1:0", 1, 30.0)
    try:
        with grpc.insecure_channel(transport.address) as channel:
            request = pb.JoinRequest(client_id="client-0")
            reply = pb_grpc.FederationStub(channel).Join(request, metadata=auth("client-0"))
        assert "/srv" not in reply.config_toml
        for key, value in paths.items():
            names = [Path(path).name for path in ((value,) if isinstance(value, str) else value)]
            assert key == "out" or all(f'"{name}"' in reply.config_toml for name in names)
    finally:
        transport.close()


def test_mutual_tls_admits_only_clients_with_a_certificate_the_server_trusts():
    server_key, server_certificate = self_signed_certificate()
    client_key, client_certificate = self_signed_certificate()
    stranger = self_signed_certificate()
    description = RunDescription(RUN_ID, RunConfig(clients=3), 2, ("classifier",), "f" * 64, b"")
    servicer = FederationServicer(description, TOKENS, log=lambda line: None)
    tls = ServerTls(server_key, server_certificate, client_ca=client_certificate)
    secure = GrpcTransport(servicer, "127.0.0.1:0", 1, 30.0, tls=tls)
    request = pb.JoinRequest(client_id="client-1")
    try:
        known = ClientTls(server_certificate, client_key, client_certificate)
        with open_channel(secure.address, known, CHANNEL_MESSAGE_BYTES) as channel:
            assert pb_grpc.FederationStub(channel).Join(request, metadata=auth("client-1")).client_index == 1
        for identity in (ClientTls(server_certificate), ClientTls(server_certificate, *stranger)):
            with open_channel(secure.address, identity, CHANNEL_MESSAGE_BYTES) as channel:
                join = pb_grpc.FederationStub(channel).Join
                error = refusal(lambda join=join: join(request, metadata=auth("client-1"), timeout=5))
                assert error.code() == Code.UNAVAILABLE
    finally:
        secure.close()


def test_both_ends_warn_before_a_token_travels_in_plaintext(tmp_path):
    said = []
    GrpcClient("10.1.2.3:50051", "unused", "client-0", token="t" * 20, echo=said.append)
    GrpcClient("127.0.0.1:50051", "unused", "client-0", token="t" * 20, echo=said.append)
    assert len(said) == 1 and "in plaintext" in said[0] and "--tls-ca" in said[0]
    config = RunConfig(clients=3, data=str(tmp_path / "no-such-data"), out=str(tmp_path / "run"))
    for address, warned in (("0.0.0.0:0", True), ("127.0.0.1:0", False)):
        said.clear()
        with pytest.raises(EdgefedError):  # the data is missing: the server stops after its warnings
            serve(config, address, tokens=TOKENS, echo=said.append)
        assert any("tokens travel in plaintext" in line for line in said) == warned, said


def test_a_file_written_atomically_is_whole_or_untouched(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new, then a lone surrogate \udc80 the encoder refuses\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.parametrize("killed_at", ["before the swap", "between its renames", "after it", "removing .old"])
def test_a_checkpoint_killed_at_any_step_of_its_swap_loads_and_saves_again(tmp_path, monkeypatch, killed_at):
    """Killed before, between or after the swap's renames (also midway through removing the old
    version), the next start reads a whole checkpoint, and its next save succeeds."""
    import edgefed.federation.atomic as atomic

    roster = Roster({"client-0": 0}, {"client-0": 5})
    save_checkpoint(tmp_path, Checkpoint(1, RUN_ID, {"w": torch.zeros(2)}, 0.0, clients=roster))
    # A save's steps: rmtree(staging), replace(final, old), replace(staging, final), rmtree(old).
    kill = {"before the swap": 1, "between its renames": 2, "after it": 3, "removing .old": 3}[killed_at]
    calls = []

    def killable(real):
        def step(path, *args, **kwargs):
            if len(calls) == kill:
                if killed_at == "removing .old":
                    (Path(path) / "meta.json").unlink()
                raise KeyboardInterrupt  # stands in for the kill: nothing after it runs
            calls.append(real.__name__)
            return real(path, *args, **kwargs)

        return step

    monkeypatch.setattr(atomic.os, "replace", killable(os.replace))
    monkeypatch.setattr(atomic.shutil, "rmtree", killable(shutil.rmtree))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, Checkpoint(2, RUN_ID, {"w": torch.ones(2)}, 0.0, clients=roster))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert (loaded.round, loaded.global_state["w"].tolist()) in ((1, [0.0, 0.0]), (2, [1.0, 1.0]))
    save_checkpoint(tmp_path, Checkpoint(3, RUN_ID, {"w": torch.full((2,), 3.0)}, 0.0, clients=roster))
    assert load_checkpoint(tmp_path).round == 3 and sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_without_a_configured_bound_a_huge_finite_update_is_refused():
    """Safe by default: a run without --max-update-norm still bounds every update (a per-value RMS of
    DEFAULT_UPDATE_RMS), so one client's finite 1e30 update never reaches the aggregate."""
    from edgefed.codecs import encode_state, make_codec
    from edgefed.transport.base import DEFAULT_UPDATE_RMS, receive_update, update_bound
    from edgefed.wire.framing import Expected, WireError
    from edgefed.wire.sending import EncodedUpdate, serialize_state

    shapes = {"w": ((64, 16), "float32")}
    assert update_bound(None, shapes) == DEFAULT_UPDATE_RMS * 32 and update_bound(5.0, shapes) == 5.0
    codec = make_codec("none")
    expected = Expected(RUN_ID, 1, shapes, "client-0", max_norm=update_bound(None, shapes))

    def pushed(delta):
        update = EncodedUpdate(serialize_state(encode_state(codec, {"w": delta})), 10, 0.5, 5, 1.0)
        return receive_update(update.chunks(RUN_ID, 1, "client-0"), expected, codec, 0, torch.device("cpu"))

    assert pushed(0.01 * torch.randn(64, 16)).num_examples == 10
    with pytest.raises(WireError, match=r"update norm 3.2e\+31 over the bound 320"):
        pushed(torch.full((64, 16), 1e30))


def test_setup_calls_hold_no_worker_while_a_runtimes_files_are_made():
    """20 FetchRuntime calls while the files take seconds to make: each is told at once to come back
    (once the first is queued, a worker each used to wait for the build, and 14 workers starved the
    heartbeats); the files are made once and then streamed to all; no honest client counts as gone."""
    made, build_s = [], 3.0

    def slow_files() -> bytes:
        made.append(time.monotonic())
        time.sleep(build_s)
        return b"runtime files " * 1000

    offers = {"torch": RuntimeOffer(), "slow": RuntimeOffer(slow_files)}
    with serve_federation(runtimes=offers) as federation:
        for client in CLIENTS:
            federation.join(client, runtime="slow")

        def fetch(client: str) -> bytes | grpc.StatusCode:
            request = pb.FetchRequest(run_id=RUN_ID, client_id=client)
            try:
                chunks = list(federation.stub.FetchRuntime(request, metadata=auth(client), timeout=30))
            except grpc.RpcError as error:
                return error.code()
            received = reassemble(chunks, Expected(RUN_ID, 0, None, client, 1 << 20))[0]
            return b"".join(received.parts)

        gone_after_s = MISSED_HEARTBEATS * HEARTBEAT_S  # a client unheard this long counts as gone
        with ThreadPoolExecutor(20) as pool:
            asked = [pool.submit(fetch, CLIENTS[i % len(CLIENTS)]) for i in range(20)]
            answered_s = []
            while not made or time.monotonic() < made[0] + build_s / 2:  # heartbeats during the build
                started = time.monotonic()
                federation.stub.Heartbeat(
                    pb.HeartbeatRequest(run_id=RUN_ID, client_id="client-1"),
                    metadata=auth("client-1"),
                    timeout=gone_after_s,
                )
                answered_s.append(time.monotonic() - started)
                time.sleep(HEARTBEAT_S / 4)
            answers = [call.result(timeout=build_s) for call in asked]
        assert len(answered_s) >= 5 and all(answer == Code.UNAVAILABLE for answer in answers)
        assert any("making the slow runtime's files" in line for line in federation.log)
        deadline = time.monotonic() + 4 * build_s
        while (payload := fetch("client-2")) == Code.UNAVAILABLE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(made) == 1 and payload == b"runtime files " * 1000


def test_without_a_token_file_each_client_is_known_by_the_token_its_join_gave_it(tmp_path):
    """A server without --tokens (loopback only) gives each client a session token at its first Join:
    nobody else can rejoin or speak as it, its stream limit holds over any number of connections, and
    a restarted server (from its checkpoint) still knows the token."""
    with serve_federation(tokens=None, stream_idle_s=1.0) as federation:
        for client in CLIENTS:
            assert federation.join(client).session_token
        assert not federation.join("client-0").session_token, "a rejoin keeps its token"
        squatter = refusal(lambda: federation.stub.Join(pb.JoinRequest(client_id="client-0")))
        assert squatter.code() == Code.UNAUTHENTICATED and "only its session token" in squatter.details()
        beat = pb.HeartbeatRequest(run_id=RUN_ID, client_id="client-0")
        assert refusal(lambda: federation.stub.Heartbeat(beat)).code() == Code.UNAUTHENTICATED
        impostor = refusal(lambda: federation.stub.Heartbeat(beat, metadata=federation.auth("client-1")))
        assert impostor.code() == Code.PERMISSION_DENIED
        round_1 = federation.open_round(1, [0, 1])
        stop, channels = threading.Event(), []

        def nothing():
            stop.wait()
            yield from ()

        try:
            stalled = []
            for _ in range(12):  # a connection each: once, each held its own two streams
                channels.append(grpc.insecure_channel(federation.transport.address))
                stub = pb_grpc.FederationStub(channels[-1])
                stalled += [
                    stub.PushUpdate.future(nothing(), metadata=federation.auth("client-0")) for _ in "ab"
                ]
            deadline = time.monotonic() + 5
            while sum(call.done() for call in stalled) < len(stalled) - 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [call.exception().code() for call in stalled if call.done()]
            assert refused == [Code.RESOURCE_EXHAUSTED] * (len(stalled) - 2)
            federation.push(update_chunks(good_delta(), "client-1"), "client-1")
        finally:
            stop.set()
            for channel in channels:
                channel.close()
        federation.push(update_chunks(good_delta(), "client-0"), "client-0")
        assert sorted(update.client_id for update in round_1.result(timeout=10).updates) == [0, 1]
        roster = federation.transport.roster()
    save_checkpoint(tmp_path, Checkpoint(1, RUN_ID, {}, 0.0, clients=roster))
    restarted = FederationServicer(federation.servicer.run, None, load_checkpoint(tmp_path).clients)
    assert restarted.clients.owner(federation.auth("client-2")) == "client-2"


def test_calls_without_a_token_do_not_crowd_out_the_clients():
    """400 heartbeats without a token at once are refused before they are read, and none of them takes
    the place of an honest client's call (a server-wide cap on calls in flight once did)."""
    with serve_federation() as federation:
        federation.join("client-1")
        anonymous = pb.HeartbeatRequest(run_id=RUN_ID, client_id="client-1")
        flood = [federation.stub.Heartbeat.future(anonymous) for _ in range(400)]
        honest = [federation.beat("client-1").action for _ in range(20)]
        assert honest == [pb.HeartbeatReply.WAIT] * 20
        assert {call.exception().code() for call in flood} == {Code.UNAUTHENTICATED}


def test_one_client_refused_over_and_over_writes_a_few_lines_of_log(federation):
    federation.join("client-0")
    wrong = pb.HeartbeatRequest(run_id="another-run", client_id="client-0")
    for _ in range(200):
        refusal(lambda: federation.stub.Heartbeat(wrong, metadata=auth("client-0")))
    said = [line for line in federation.log if "wrong run id" in line]
    assert len(said) == REFUSAL_LINES and "go unlogged" in said[-1]


def test_a_runtimes_files_are_downloaded_by_a_few_devices_at_a_time():
    """Once made, the files go to DOWNLOADS devices at once; the next is told to come back (it retries)
    rather than add one more stream of megabytes that the server's heartbeats would wait behind."""
    files = bytes(8 << 20)  # more than a stream's window: a download nobody reads stays open
    offers = {"torch": RuntimeOffer(), "big": RuntimeOffer(lambda: files)}
    with serve_federation(runtimes=offers) as federation:
        for client in CLIENTS:
            federation.join(client, runtime="big")

        def download(client: str):
            request = pb.FetchRequest(run_id=RUN_ID, client_id=client)
            return federation.stub.FetchRuntime(request, metadata=auth(client), timeout=30)

        def fetched(client: str) -> bytes | None:
            """The files, or None when told to come back."""
            try:
                received = reassemble(list(download(client)), Expected(RUN_ID, 0, None, client, 1 << 24))
            except grpc.RpcError as error:
                assert error.code() == Code.UNAVAILABLE
                return None
            return b"".join(received[0].parts)

        deadline = time.monotonic() + 10
        while fetched("client-2") is None and time.monotonic() < deadline:  # the first ask makes them
            time.sleep(0.05)
        held = [download(client) for client in ("client-0", "client-1", "client-0", "client-1")[:DOWNLOADS]]
        for call in held:
            next(call)  # each download has begun, and is read no further
        busy = refusal(lambda: next(download("client-2")))
        assert busy.code() == Code.UNAVAILABLE and f"{DOWNLOADS} devices are downloading" in busy.details()
        for call in held:
            call.cancel()
        deadline = time.monotonic() + 10
        while (payload := fetched("client-2")) is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the cancelled downloads' handlers let go
        assert payload == files


class CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def notify_all(self) -> None:
        self.wakeups += 1
        super().notify_all()


def test_heartbeats_of_connected_clients_do_not_wake_the_server():
    """Only a client (back) among the connected wakes the server's waits: with a thousand clients in an
    open round, each heartbeat waking its checks held the lock every heartbeat needs (p99 0.27 s)."""
    condition = CountingCondition()
    book = ClientBook(3, None, None, None, 100, HEARTBEAT_S, condition, lambda line: None)
    with condition:
        for _ in range(100):
            book.seen(0)
            book.seen(1)
    assert condition.wakeups == 2
    book.last_seen[0] -= MISSED_HEARTBEATS * HEARTBEAT_S + 1  # client 0 went silent, and is back
    with condition:
        book.seen(0)
    assert condition.wakeups == 3
