"""What crosses the network: bytes per client per round for each method and codec, and how fast
edgefed streams a delta over loopback gRPC compared with raw gRPC streaming of the same bytes.

Everything is measured in this one run, side by side:

- bytes: each method's trainable state on the model, encoded with each codec and framed exactly as
  a client pushes it (gRPC messages of the edgefed.v1 wire format, chunked at 1 MiB); down is the
  global state, lossless; setup is FeDeRA's one-off state.
- throughput: a pre-encoded fp32 delta pushed to a live FederationServicer (chunking, per-chunk
  checks, reassembly, per-tensor CRC32C, shape/dtype/finiteness/norm checks), against a bare gRPC
  client-streaming method that receives the same chunks' bytes and only counts them, and two baselines
  that do part of edgefed's work on them (`sink_handler`); and the CPU time the receiving side spends
  on each.
- `--accuracy`: the demo (FeDeRA, 4 clients, 16 rounds, in-process) with codec none and int8.

    python benchmarks/comm.py [--accuracy] [--out benchmarks/results/comm.md]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import grpc
import numpy as np
import torch
from publish import publish

from edgefed.client.federated import EncodedUpdate
from edgefed.codecs import encode_state, make_codec
from edgefed.config import RunConfig
from edgefed.methods import METHODS, AdapterSpec, trainable_state
from edgefed.models import load_classifier, resolve_model_path
from edgefed.transport.auth import bearer_metadata
from edgefed.transport.base import receive_update, state_payload, state_shapes
from edgefed.transport.grpc_server import GrpcTransport
from edgefed.transport.servicer import FederationServicer, RunDescription
from edgefed.wire.channels import MESSAGE_HEADROOM
from edgefed.wire.framing import CHUNK_BYTES, ChunkView, Expected, reassemble, wire_size
from edgefed.wire.sending import chunk_stream, serialize_state

METHOD_NAMES = ("fft", "lora", "federa", "bitfit", "adapter")
CODECS = ("none", "fp16", "int8", "int4", "topk:0.1")
RUN_ID = "bench"
# The sink's baselines (path: its method), then edgefed's own PushUpdate.
SINK_PATHS = {"raw": "Push", "framing": "Frames", "checks": "Checks", "parse": "Receive"}
CODEC = make_codec("none")
PATHS = (*SINK_PATHS, "edgefed")
MB = 1e6


def stream_bytes(payload: bytes, **first) -> int:
    return sum(wire_size(chunk) for chunk in chunk_stream(payload, RUN_ID, 1, "client-0", **first))


def bytes_table(model_name: str) -> list[str]:
    path = resolve_model_path(model_name)
    lines = [
        "| method | trainable | down (global state) | setup (once) | "
        + " | ".join(f"up `{codec}`" for codec in CODECS)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(CODECS),
    ]
    for name in METHOD_NAMES:
        torch.manual_seed(0)
        base, new_modules = load_classifier(path, 2)
        model, setup = METHODS.create(name).prepare_global(base, AdapterSpec(head_modules=tuple(new_modules)))
        state = trainable_state(model)
        delta = {key: 0.01 * torch.randn_like(tensor) for key, tensor in state.items()}
        up = []
        for spec in CODECS:
            payload = serialize_state(encode_state(make_codec(spec), delta))
            up.append(stream_bytes(payload, num_examples=1, train_loss=0.5, steps=5, train_s=1.0))
        down, once = stream_bytes(state_payload(state)), stream_bytes(state_payload(setup)) if setup else 0
        trainable = sum(t.numel() for t in state.values())
        lines.append(
            f"| {name} | {trainable:,} | {down / MB:.3f} MB | {once / MB:.3f} MB | "
            + " | ".join(f"{value / MB:.3f} MB ({value / up[0]:.2f}×)" for value in up)
            + " |"
        )
        print(f"measured bytes of {name}", file=sys.stderr)
    return lines


def sink_handler(shapes: dict[str, tuple[tuple[int, ...], str]]) -> grpc.GenericRpcHandler:
    """Four baselines on one server: `Push` only counts the raw bytes it receives (raw gRPC); `Frames`
    parses them as edgefed Chunks and reassembles the payload (the framing without content checks);
    `Checks` runs the per-byte part of the content checks (CRC32C and a sum of squares of the values) on
    each message as it arrives and keeps the messages, as a server must keep an update until the round
    is aggregated, with no framing: what checking every byte costs any receiver at the least; `Receive`
    is edgefed's reading of an update (`receive_update`: framing and every tensor's checks, the tensors
    of `shapes`) without the live server around it (tokens, stream limits, the round)."""

    def count(request_iterator, context):
        return sum(len(message) for message in request_iterator).to_bytes(8, "little")

    def checks(request_iterator, context):
        kept = []
        for message in request_iterator:
            crc32c.crc32c(message)
            # numpy's dot over the message as it lies (aligned): in this busy server torch's was slower.
            values = np.frombuffer(message, np.float32, len(message) // 4)
            with np.errstate(all="ignore"):  # the header's bytes read as floats may overflow
                float(np.dot(values, values))
            kept.append(message)
        return sum(map(len, kept)).to_bytes(8, "little")

    def frames(request_iterator, context):
        expected = Expected(RUN_ID, 1, None, "client-0", max_bytes=1 << 40)
        payload, _ = reassemble(map(ChunkView, request_iterator), expected)  # as the server reads them
        return len(payload).to_bytes(8, "little")

    def receive(request_iterator, context):
        expected = Expected(RUN_ID, 1, shapes, "client-0", max_bytes=1 << 40, max_norm=math.inf)
        update = receive_update(map(ChunkView, request_iterator), expected, CODEC, 0, torch.device("cpu"))
        return update.num_examples.to_bytes(8, "little")

    methods = {
        "Push": grpc.stream_unary_rpc_method_handler(count),
        "Frames": grpc.stream_unary_rpc_method_handler(frames),
        "Checks": grpc.stream_unary_rpc_method_handler(checks),
        "Receive": grpc.stream_unary_rpc_method_handler(receive),
    }
    return grpc.method_handlers_generic_handler("bench.Sink", methods)


def delta_update(total_mb: float) -> tuple[dict[str, torch.Tensor], EncodedUpdate]:
    """A seeded fp32 delta of `total_mb` in 16 tensors, encoded as a client pushes it."""
    tensors = 16
    numel = int(total_mb * (1 << 20)) // 4 // tensors
    generator = torch.Generator().manual_seed(0)
    delta = {f"layer{i}.weight": 0.01 * torch.randn(numel, generator=generator) for i in range(tensors)}
    return delta, EncodedUpdate(serialize_state(encode_state(make_codec("none"), delta)), 10, 0.5, 5, 1.0)


def sender(total_mb: float, requests, replies, cpu: int | None = None) -> None:
    """The client side, a process of its own (as a device is): for each (address, method, round, its
    metadata) it gets, it serialises that round's chunks beforehand, then times one call that streams
    them. With `cpu`, it runs on that core alone (as `taskset` would pin it)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    _, update = delta_update(total_mb)
    limit = CHUNK_BYTES + MESSAGE_HEADROOM
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    channels: dict[str, grpc.Channel] = {}
    while (request := requests.get()) is not None:
        address, method, round_number, metadata = request
        chunks = [chunk.SerializeToString() for chunk in update.chunks(RUN_ID, round_number, "client-0")]
        channel = channels.setdefault(address, grpc.insecure_channel(address, options=options))
        call = channel.stream_unary(method)
        start = time.perf_counter()
        call(iter(chunks), metadata=metadata)
        replies.put(time.perf_counter() - start)


def pinned_throughput(total_mb: float, repeats: int) -> tuple[dict[str, float], dict[str, float], int]:
    """`throughput` with the receiving process on core 0 and the sender on core 1, each alone on its
    core (`taskset -c 0` and `-c 1`): a fresh process, so that gRPC's own threads start pinned too."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_pinned_receiver, args=(total_mb, repeats, results))
    process.start()
    measured = results.get(timeout=3600)
    process.join()
    return measured


def _pinned_receiver(total_mb: float, repeats: int, results) -> None:
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    results.put(throughput(total_mb, repeats, sender_cpu=1))


def throughput(
    total_mb: float, repeats: int, sender_cpu: int | None = None
) -> tuple[dict[str, float], dict[str, float], int]:
    """MB/s of each path and MB per CPU-second the receiving side spent on it (medians over interleaved
    repeats), and the payload's bytes. Every path gets the same chunk bytes from a sender process,
    serialised before the clock starts: what differs is the receiver."""
    delta, update = delta_update(total_mb)
    global_state = {name: torch.zeros_like(tensor) for name, tensor in delta.items()}
    config = RunConfig(clients=1, codec="none")
    servicer = FederationServicer(
        RunDescription(RUN_ID, config, 2, ("classifier",), "", b""), heartbeat_s=3600, log=lambda line: None
    )
    servicer.clients.slots["client-0"] = 0
    servicer.clients.examples[0] = update.num_examples  # as its Join would declare
    metadata = bearer_metadata(servicer.clients.sessions.issue("client-0"))  # as its Join would give
    transport = GrpcTransport(servicer, "127.0.0.1:0", min_clients=1, deadline_s=3600)
    limit = CHUNK_BYTES + MESSAGE_HEADROOM
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    sink = grpc.server(ThreadPoolExecutor(max_workers=4), options=options)
    sink.add_generic_rpc_handlers((sink_handler(state_shapes(global_state)),))
    sink_address = f"127.0.0.1:{sink.add_insecure_port('127.0.0.1:0')}"
    sink.start()
    context = multiprocessing.get_context("spawn")
    requests, replies = context.Queue(), context.Queue()
    process = context.Process(target=sender, args=(total_mb, requests, replies, sender_cpu))
    process.start()

    times: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu: dict[str, list[float]] = {path: [] for path in PATHS}

    def timed(path: str, address: str, method: str, round_number: int, metadata=()) -> None:
        # CPU time (user + system) of this whole process: while a call is timed its main thread waits,
        # so what it uses is the receiving servers' threads (gRPC's own and the handlers').
        start = time.process_time()
        requests.put((address, method, round_number, metadata))
        times[path].append(replies.get(timeout=600))
        cpu[path].append(time.process_time() - start)

    try:
        for round_number in range(1, repeats + 1):
            servicer.clients.last_seen[0] = time.monotonic()
            collector = threading.Thread(target=transport.fit_round, args=(round_number, [0], global_state))
            collector.start()
            while servicer.rounds.current is None:
                time.sleep(0.001)
            timed("edgefed", transport.address, "/edgefed.v1.Federation/PushUpdate", round_number, metadata)
            collector.join()
            for path, method in SINK_PATHS.items():
                timed(path, sink_address, f"/bench.Sink/{method}", 1)
    finally:
        requests.put(None)
        process.join()
        transport.close()
        sink.stop(0)
    size = len(update.payload)

    def per_second(samples: dict[str, list[float]]) -> dict[str, float]:
        return {path: size / statistics.median(values) / MB for path, values in samples.items()}

    return per_second(times), per_second(cpu), size


def demo_accuracy() -> list[str]:
    from edgefed.components import resolve_config
    from edgefed.federation.runner import run

    lines = [
        "| codec | final accuracy | best accuracy | bytes up (all rounds) | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    finals = {}
    for spec in ("none", "int8"):
        out = Path("runs") / f"comm-demo-{spec}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = run(resolve_config(None, {"codec": spec, "out": str(out)}), echo=lambda line: None)
        finals[spec] = summary.final_accuracy
        lines.append(
            f"| {spec} | {summary.final_accuracy:.4f} | {summary.best_accuracy:.4f} | "
            f"{summary.bytes_up / MB:.2f} MB | {summary.wall_s:.0f} |"
        )
        print(f"ran the demo with codec {spec}", file=sys.stderr)
    gap = 100 * (finals["int8"] - finals["none"])
    lines += ["", f"int8 − none: {gap:+.2f} accuracy points (target: within ±0.5)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument(
        "--stream-mb",
        type=lambda text: [float(size) for size in text.split(",")],
        default=[0.3, 4.0, 64.0],
        help="sizes of the streamed delta, comma-separated (0.3: FeDeRA on MiniLM; 64: full weights)",
    )
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--accuracy", action="store_true", help="also run the demo with codecs none and int8")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()

    lines = [
        f"`python benchmarks/comm.py{' --accuracy' if args.accuracy else ''}` on {platform.machine()} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, grpcio {grpc.__version__}.",
        "",
        f"## Bytes per client per round, `{args.model}` (rank 8 on query, value; gRPC message bytes)",
        "",
        *bytes_table(args.model),
    ]
    lines += [
        "",
        f"## Loopback streaming of an fp32 delta in 1 MiB chunks (MB/s, median of {args.repeats})",
        "",
        "raw: a gRPC client stream of the same chunk bytes that the receiver only counts; framing: edgefed "
        "Chunk messages with their order/run/round/size checks and reassembly (views of the chunks, no "
        "copy); checks: CRC32C and a sum of squares over each message as it arrives, the messages kept (as "
        "a server keeps an update until the round is aggregated), nothing else: what checking every byte "
        "costs any receiver at the least; parse: edgefed's reading of an update (framing plus every "
        "tensor's CRC32C, shape/dtype, finiteness and norm checks) on the same bare server; end to end: "
        "edgefed's PushUpdate into a live server, that reading plus tokens, stream limits and the round. "
        "Cores: shared, the sender "
        f"and the receiving process both free to run on any of the machine's {os.cpu_count()}; pinned, the "
        "receiving process on core 0 and the sender on core 1 (as `taskset -c 0` and `taskset -c 1` "
        "pin them), each in a fresh process. The target is end to end ≥ 0.9 of checks.",
        "",
        "| delta | cores | raw | framing | checks | parse | end to end | checks / raw | parse / checks | "
        "**end to end / checks** |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cpu_lines = [
        "",
        "## What the receiving side spends (MB received per CPU-second of the receiving process)",
        "",
        "User plus system time of every thread of the receiving process during the call (gRPC's own "
        "and the handler's), median of the same repeats. With shared cores a receiver that spends more "
        "CPU per byte also takes cores from the sender: on loopback the stream's speed follows these "
        "figures.",
        "",
        "| delta | cores | raw | framing | checks | parse | end to end | parse / checks | "
        "end to end / checks |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    placements = {"shared": throughput, "pinned": pinned_throughput} if os.cpu_count() > 1 else {}
    for stream_mb in args.stream_mb:
        for cores, measure in placements.items():
            rates, cpu, size = measure(stream_mb, args.repeats)
            lines.append(
                f"| {size / MB:.2f} MB | {cores} | {' | '.join(f'{rates[path]:.0f}' for path in PATHS)} | "
                f"{rates['checks'] / rates['raw']:.2f} | {rates['parse'] / rates['checks']:.2f} | "
                f"**{rates['edgefed'] / rates['checks']:.2f}** |"
            )
            cpu_lines.append(
                f"| {size / MB:.2f} MB | {cores} | {' | '.join(f'{cpu[path]:.0f}' for path in PATHS)} | "
                f"{cpu['parse'] / cpu['checks']:.2f} | {cpu['edgefed'] / cpu['checks']:.2f} |"
            )
            print(f"measured streaming of {size / MB:.2f} MB, cores {cores}", file=sys.stderr)
    lines += cpu_lines
    # Random bytes: a buffer of zeros is the kernel's one zero page mapped over and over, read from cache.
    data = np.random.default_rng(0).bytes(size)
    rates = {}
    for name, checksum in (("CRC32C", crc32c.crc32c), ("sha256", lambda d: hashlib.sha256(d).digest())):
        checksum(data)
        start = time.perf_counter()
        checksum(data)
        rates[name] = size / (time.perf_counter() - start) / MB
    lines += [
        "",
        f"For scale, one pass over {size / MB:.0f} MB on this CPU: CRC32C (the wire's checksum) "
        f"{rates['CRC32C']:.0f} MB/s, sha256 (what it replaced) {rates['sha256']:.0f} MB/s.",
    ]
    if args.accuracy:
        lines += ["", "## Demo setting, codec none vs int8 (in-process)", "", *demo_accuracy()]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
