"""One `edgefed server` on loopback against a thousand clients heartbeating, then the same while one
client holds stalled streams: heartbeat latency (p50, p99, max) and the server's resident memory.

The clients are asyncio coroutines on grpc.aio (little CPU each), one channel and one bearer token
per client, every client joining and then heartbeating once per `--heartbeat-s`, as `edgefed client`
does while it trains. The server is the real command on SST-2 (../shared/data/sst2), sized for one
client more than join, so it keeps waiting and every call it answers is a Join or a Heartbeat.
In the second phase client 0 also opens `--stalled` PushUpdate streams that send nothing and as many
FetchSetup streams it never reads: what a hostile client, or a device whose link died, does.

    python benchmarks/load.py [--clients 1000] [--seconds 20] [--out benchmarks/results/load.md]
"""

from __future__ import annotations

import argparse
import asyncio
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


def start_server(clients: int, heartbeat_s: float, folder: Path) -> tuple[subprocess.Popen, str, TokenBook]:
    tokens = TokenBook.generate([f"load-{index:05d}" for index in range(clients + 1)])
    tokens.write(folder / "tokens.txt")
    port = free_port()
    command = [
        sys.executable, "-m", "edgefed", "server", "--address", f"127.0.0.1:{port}",
        "--tokens", str(folder / "tokens.txt"), "--clients", str(clients + 1), "--partition", "iid",
        "--heartbeat-s", str(heartbeat_s), "--out", str(folder / "run"), "--data", str(SST2),
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


async def hold_stalled_streams(address: str, name: str, token: str, count: int, stop: asyncio.Event) -> dict:
    """`count` silent PushUpdate and `count` unread FetchSetup streams of one client; how each ended."""
    metadata = bearer_metadata(token)
    outcomes: dict[str, int] = {}
    async with aio.insecure_channel(address) as channel:
        stub = pb_grpc.FederationStub(channel)
        joined = await stub.Join(pb.JoinRequest(client_id=name, num_examples=4), metadata=metadata)

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
            call = stub.FetchSetup(pb.FetchRequest(run_id=joined.run_id, client_id=name), metadata=metadata)
            try:
                await call.read()  # one chunk, then never another
                await stop.wait()
                call.cancel()
                return "sent whole"  # the server finished the stream: it held no thread
            except grpc.RpcError as error:
                return error.code().name

        calls = [push() for _ in range(count)] + [unread_fetch() for _ in range(count)]
        results = await asyncio.gather(*calls)
    for result in results:
        outcomes[result] = outcomes.get(result, 0) + 1
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
    for phase in ("heartbeats only", f"+ {args.stalled} silent pushes and {args.stalled} unread fetches"):
        stalled_stop = asyncio.Event()
        stalled = None
        if phase != "heartbeats only":
            name = fleet.names[0]
            stalled = asyncio.create_task(
                hold_stalled_streams(address, name, tokens.token_for(name), args.stalled, stalled_stop)
            )
            await asyncio.sleep(1.0)
        fleet.take()
        fleet.recording = True
        rss = []
        for _ in range(int(args.seconds)):
            await asyncio.sleep(1.0)
            rss.append(resident_mb(pid))
        fleet.recording = False
        latencies, errors = fleet.take()
        stalled_stop.set()
        outcome = await stalled if stalled else {}
        p50, p99, worst = percentiles(latencies)
        rows.append(
            f"| {phase} | {len(latencies):,} | {p50:.1f} | {p99:.1f} | {worst:.1f} | {max(rss):.0f} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(errors.items())) or 'none'} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(outcome.items())) or '-'} |"
        )
        print(f"measured: {phase}", file=sys.stderr)
    stop.set()
    await asyncio.gather(*tasks)
    return [
        f"{args.clients:,} clients, each joined and heartbeating every {args.heartbeat_s:g} s (recording "
        f"starts {joined_s:.1f} s after they start); {args.seconds:g} s recorded per phase.",
        "",
        "| phase | heartbeats | p50 ms | p99 ms | max ms | server RSS MB (peak) | heartbeat errors | "
        "stalled streams ended |",
        "|---|---:|---:|---:|---:|---:|---|---|",
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
        f"share them), grpcio {grpc.__version__}. How the stalled streams ended: FAILED_PRECONDITION, a "
        "push refused before anything is read (no round awaits that client's update); RESOURCE_EXHAUSTED, "
        "over the two streams a client may hold; sent whole, a fetch the server finished (the setup "
        "fits the connection's buffers) though the client never read past its first chunk; CANCELLED, "
        "idle for the server's --stream-idle-s (30 s, longer than a phase).",
        "",
        *table,
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
