"""One `edgefed server` on loopback against a thousand clients heartbeating, then the same while one
client misbehaves three ways: heartbeat latency (p50, p99, max) and the server's resident memory.

The clients are asyncio coroutines on grpc.aio (little CPU each), one channel and one bearer token
per client, every client joining and then heartbeating once per `--heartbeat-s`, as `edgefed client`
does while it trains. The server is the real command on SST-2 (../shared/data/sst2), sized for 21
clients more than the fleet, so that it keeps waiting until the last phase. The phases:

1. heartbeats only;
2. fleet client 0 opens `--stalled` PushUpdate streams that send nothing and as many FetchSetup
   streams it never reads, with no round open: refused before anything is read;
3. 20 more clients, joined with the ort runtime, ask for its files at once while the server makes
   them (ONNX Runtime training artifacts of the run's model), retrying while told UNAVAILABLE, as
   `edgefed client --runtime ort` does, then each downloads them (a process of their own, so that
   the downloads do not hold up the event loop timing the fleet);
4. the last client joins, so the server opens round 1 with every client sampled, and that client
   holds `--stalled` silent pushes and as many unread FetchGlobal streams inside the open round: what
   a device whose link died mid-round does.

    python benchmarks/load.py [--clients 1000] [--seconds 20] [--out benchmarks/results/load.md]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc import aio
from publish import publish

from edgefed.transport.auth import TokenBook, bearer_metadata
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"  # a thousand clients need more than the shipped sample


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


FETCHERS = 20  # clients fetching the ort runtime's files at once (phase 3)
EXTRA = FETCHERS + 1  # and the client that stalls inside round 1 (phase 4)


def start_server(clients: int, heartbeat_s: float, folder: Path) -> tuple[subprocess.Popen, str, TokenBook]:
    tokens = TokenBook.generate([f"load-{index:05d}" for index in range(clients + EXTRA)])
    tokens.write(folder / "tokens.txt")
    port = free_port()
    command = [
        sys.executable, "-m", "edgefed", "server", "--address", f"127.0.0.1:{port}",
        "--tokens", str(folder / "tokens.txt"), "--clients", str(clients + EXTRA), "--partition", "iid",
        "--heartbeat-s", str(heartbeat_s), "--out", str(folder / "run"), "--data", str(SST2),
        "--codec", "none",  # what the ort runtime's devices send
    ]  # fmt: skip
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while "waiting for clients" not in (folder / "server.log").read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start:\n" + (folder / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    return server, f"127.0.0.1:{port}", tokens


class Fleet:
    """The simulated clients: each joins, then heartbeats on its interval and records the latency."""

    def __init__(self, address: str, tokens: TokenBook, count: int, heartbeat_s: float) -> None:
        self.address, self.tokens, self.heartbeat_s = address, tokens, heartbeat_s
        self.names = tokens.clients[:count]
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.recording = False

    async def client(self, name: str, stop: asyncio.Event) -> None:
        metadata = bearer_metadata(self.tokens.token_for(name))
        async with aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.FederationStub(channel)
            joined = await stub.Join(pb.JoinRequest(client_id=name, num_examples=4), metadata=metadata)
            request = pb.HeartbeatRequest(run_id=joined.run_id, client_id=name)
            await asyncio.sleep(random.uniform(0, self.heartbeat_s))  # clients do not beat in lockstep
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    await stub.Heartbeat(request, metadata=metadata, timeout=10)
                    if self.recording:
                        self.latencies.append(time.perf_counter() - start)
                except grpc.RpcError as error:
                    self.errors[error.code().name] = self.errors.get(error.code().name, 0) + 1
                await asyncio.sleep(max(0.0, self.heartbeat_s - (time.perf_counter() - start)))

    def take(self) -> tuple[list[float], dict[str, int]]:
        latencies, errors = self.latencies, self.errors
        self.latencies, self.errors = [], {}
        return latencies, errors


async def joined_client(
    stub: pb_grpc.FederationStub, name: str, metadata, heartbeat_s: float, stop: asyncio.Event, runtime=""
) -> tuple[pb.JoinReply, asyncio.Task]:
    """Join, and heartbeat until `stop` (so the server keeps the client) in a task of its own."""
    request = pb.JoinRequest(client_id=name, num_examples=4, runtime=runtime)
    joined = await stub.Join(request, metadata=metadata)

    async def beat():
        beat_request = pb.HeartbeatRequest(run_id=joined.run_id, client_id=name)
        while not stop.is_set():
            await stub.Heartbeat(beat_request, metadata=metadata, timeout=10)
            await asyncio.sleep(heartbeat_s)

    return joined, asyncio.create_task(beat())


async def hold_stalled_streams(
    address: str,
    name: str,
    token: str,
    *,
    count: int,
    stop: asyncio.Event,
    done: asyncio.Event,
    heartbeat_s: float,
    in_round: bool,
) -> dict:
    """`count` silent PushUpdate and `count` unread fetch streams of one client (FetchSetup; in a round,
    FetchGlobal of it); how each ended. `in_round`: the client joins now, and its Join opens round 1."""
    metadata = bearer_metadata(token)
    outcomes: dict[str, int] = {}
    async with aio.insecure_channel(address) as channel:
        stub = pb_grpc.FederationStub(channel)
        joined, beating = await joined_client(stub, name, metadata, heartbeat_s, stop)
        round_number = 0
        while in_round and round_number == 0:  # until the server has opened the round
            beat = await stub.Heartbeat(
                pb.HeartbeatRequest(run_id=joined.run_id, client_id=name), metadata=metadata
            )
            round_number = beat.round if beat.action == pb.HeartbeatReply.TRAIN else 0
            await asyncio.sleep(0.1)
        fetch = stub.FetchGlobal if in_round else stub.FetchSetup

        async def silent():
            await stop.wait()
            return
            yield  # an async generator that sends nothing

        async def push():
            try:
                await stub.PushUpdate(silent(), metadata=metadata)
                return "OK"
            except grpc.RpcError as error:
                return error.code().name

        async def unread_fetch():
            request = pb.FetchRequest(run_id=joined.run_id, round=round_number, client_id=name)
            call = fetch(request, metadata=metadata)
            try:
                await call.read()  # one chunk, then never another
                await stop.wait()
                call.cancel()
                return "sent whole"  # the server finished the stream: it held no thread
            except grpc.RpcError as error:
                return error.code().name

        calls = [push() for _ in range(count)] + [unread_fetch() for _ in range(count)]
        done.set()  # the phase waits for nothing more: these end when it does
        results = await asyncio.gather(*calls)
        await beating
    for result in results:
        outcomes[result] = outcomes.get(result, 0) + 1
    return outcomes


async def fetch_as_devices(address: str, clients: dict[str, str], heartbeat_s: float, results, halt) -> None:
    """Each client (name -> token) joins with the ort runtime and fetches its files once, retrying while
    the server answers UNAVAILABLE (they are being made), and heartbeats all the while; `results` gets
    how the fetches ended and how long the last took; the clients beat on until `halt` is set."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    started, stopping, outcomes = time.perf_counter(), asyncio.Event(), []

    async def device(name: str, token: str) -> None:
        metadata = bearer_metadata(token)
        async with aio.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.FederationStub(channel)
            joined, beating = await joined_client(stub, name, metadata, heartbeat_s, stopping, runtime="ort")
            request = pb.FetchRequest(run_id=joined.run_id, client_id=name)
            while True:
                try:
                    chunks = [chunk async for chunk in stub.FetchRuntime(request, metadata=metadata)]
                    outcomes.append(f"fetched {sum(len(chunk.data) for chunk in chunks) / 1e6:.0f} MB")
                    break
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        outcomes.append(error.code().name)
                        break
                await asyncio.sleep(0.5)
            if len(outcomes) == len(clients):
                ended: dict[str, int] = {f"all fetched {time.perf_counter() - started:.0f} s after asking": 1}
                for outcome in outcomes:
                    ended[outcome] = ended.get(outcome, 0) + 1
                results.put(ended)
            await stopping.wait()
            await beating

    devices = [asyncio.create_task(device(name, token)) for name, token in clients.items()]
    await asyncio.to_thread(halt.wait)
    stopping.set()
    await asyncio.gather(*devices)


def fetcher_process(address: str, clients: dict[str, str], heartbeat_s: float, results, halt) -> None:
    """The fetching devices, in a process of their own, at the lowest priority: on real devices their
    downloads spend their own CPU, not the server's, nor that of the event loop timing the fleet."""
    os.nice(19)
    asyncio.run(fetch_as_devices(address, clients, heartbeat_s, results, halt))


async def fetch_runtime_files(
    address: str, clients: dict[str, str], *, stop: asyncio.Event, done: asyncio.Event, heartbeat_s: float
) -> dict:
    """`clients` fetch the ort runtime's files at once, from another process; how their calls ended."""
    context = multiprocessing.get_context("spawn")
    results, halt = context.Queue(), context.Event()
    process = context.Process(target=fetcher_process, args=(address, clients, heartbeat_s, results, halt))
    process.start()
    outcomes = await asyncio.to_thread(results.get, True, 900)
    done.set()
    await stop.wait()
    halt.set()
    await asyncio.to_thread(process.join)
    return outcomes


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


async def measure(args: argparse.Namespace, address: str, tokens: TokenBook, pid: int) -> list[str]:
    fleet = Fleet(address, tokens, args.clients, args.heartbeat_s)
    stop = asyncio.Event()
    started = time.perf_counter()
    tasks = [asyncio.create_task(fleet.client(name, stop)) for name in fleet.names]
    await asyncio.sleep(args.heartbeat_s * 3)  # every client has joined and beaten before recording
    joined_s = time.perf_counter() - started
    rows = []
    fetchers = {
        name: tokens.token_for(name) for name in tokens.clients[args.clients : args.clients + FETCHERS]
    }
    staller = tokens.clients[args.clients + FETCHERS]
    stalled = functools.partial(
        hold_stalled_streams, address, count=args.stalled, heartbeat_s=args.heartbeat_s
    )
    first = fleet.names[0]
    held = f"{args.stalled} silent pushes and {args.stalled} unread"
    phases = {
        "heartbeats only": None,
        f"+ {held} FetchSetup, no round open": functools.partial(
            stalled, first, tokens.token_for(first), in_round=False
        ),
        f"+ {FETCHERS} clients fetching the ort files (made as they ask)": functools.partial(
            fetch_runtime_files, address, fetchers, heartbeat_s=args.heartbeat_s
        ),
        f"+ {held} FetchGlobal, inside round 1": functools.partial(
            stalled, staller, tokens.token_for(staller), in_round=True
        ),
    }
    for phase, disturb in phases.items():
        phase_stop, done = asyncio.Event(), asyncio.Event()
        disturbance = None
        if disturb is not None:
            disturbance = asyncio.create_task(disturb(stop=phase_stop, done=done))
            await asyncio.sleep(1.0)
        fleet.take()
        fleet.recording = True
        rss, recorded = [], 0
        # A phase lasts --seconds, or as long as its disturbance takes to be done (the ort files made).
        while recorded < args.seconds or (disturbance is not None and not done.is_set() and recorded < 900):
            await asyncio.sleep(1.0)
            rss.append(resident_mb(pid))
            recorded += 1
        fleet.recording = False
        latencies, errors = fleet.take()
        phase_stop.set()
        outcome = await disturbance if disturbance else {}
        p50, p99, worst = percentiles(latencies)
        rows.append(
            f"| {phase} | {recorded} | {len(latencies):,} | {p50:.1f} | {p99:.1f} | {worst:.1f} | "
            f"{max(rss):.0f} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(errors.items())) or 'none'} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(outcome.items())) or '-'} |"
        )
        print(f"measured: {phase}", file=sys.stderr)
    stop.set()
    await asyncio.gather(*tasks)
    return [
        f"{args.clients:,} clients, each joined and heartbeating every {args.heartbeat_s:g} s (recording "
        f"starts {joined_s:.1f} s after they start); at least {args.seconds:g} s recorded per phase.",
        "",
        "| phase | s | heartbeats | p50 ms | p99 ms | max ms | server RSS MB (peak) | heartbeat errors | "
        "its calls ended |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0, help="recorded per phase")
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--stalled", type=int, default=16, help="silent pushes (and unread fetches) held")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefed-load-") as folder:
        server, address, tokens = start_server(args.clients, args.heartbeat_s, Path(folder))
        try:
            table = asyncio.run(measure(args, address, tokens, server.pid))
        finally:
            server.kill()
            server.wait()
    command = "python benchmarks/load.py" + (f" --clients {args.clients}" if args.clients != 1000 else "")
    lines = [
        f"`{command}` on {platform.machine()} ({os.cpu_count()} cores; the server and the load generator "
        f"share them), grpcio {grpc.__version__}. How the misbehaving client's calls ended: "
        "FAILED_PRECONDITION, a push refused before anything is read (no round awaits that client's "
        "update); RESOURCE_EXHAUSTED, over the two streams a client may hold; sent whole, a fetch the "
        "server finished (it fits the connection's buffers) though the client never read past its first "
        "chunk; INVALID_ARGUMENT, a push held open by the server, waiting for its first chunk, until the "
        "phase ended and the client closed it empty; fetched, the ort files, after UNAVAILABLE answers while "
        "they were made.",
        "",
        *table,
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
