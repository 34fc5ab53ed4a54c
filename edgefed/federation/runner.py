"""The federated fine-tuning recipe behind `edgefed run` and `edgefed server`: set up, run the rounds, save.

`federate` reads top to bottom as torchtune's recipes do: build the federation from the configuration
(or resume it from its checkpoint), hand the round loop its transport and its policy, and write the
result. `run` and `serve` differ only in the transport they give it.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgefed.aggregators import AGGREGATORS
from edgefed.client import build_worker
from edgefed.codecs import make_codec
from edgefed.config import RunConfig, adapter_runtime_refusal, config_from_text, write_config
from edgefed.devices.clock import SimulatedClock
from edgefed.errors import EdgefedError
from edgefed.federation.checkpoint import Checkpoint, load_checkpoint, restore_rng
from edgefed.federation.loop import FederatedServer, StartingPoint
from edgefed.federation.policy import RunPolicy
from edgefed.federation.progress import StepProgress
from edgefed.federation.recorder import Recorder
from edgefed.federation.report import finish_run
from edgefed.federation.setup import ServerSide, describe_fleet, prepare
from edgefed.methods import count_trainable, load_trainable_state, trainable_state
from edgefed.models import resolve_model_path
from edgefed.split import InProcessSplitStub, RemoteBody, SplitSide
from edgefed.transport.auth import TokenBook
from edgefed.transport.base import Roster, Transport, state_payload
from edgefed.transport.grpc_server import FederationServicer, GrpcTransport, RunDescription
from edgefed.transport.inproc import InProcessTransport
from edgefed.transport.loopback import LoopbackFleet
from edgefed.transport.split_rounds import SplitRounds
from edgefed.types import client_name
from edgefed.wire.channels import ServerTls, is_loopback
from edgefed.wire.streams import STREAM_IDLE_S

Echo = Callable[[str], None]
# Builds a run's transport: (the federation, its run id and directory, the clients of a resumed run,
# the step progress, the log, FedBERT's split side or None).
TransportFactory = Callable[[ServerSide, str, Path, Roster, StepProgress, Echo, SplitSide | None], Transport]


def run(config: RunConfig, echo: Echo = print, resume: bool = False) -> dict:
    """`edgefed run`: a whole federation from one command; clients in this process or in processes."""

    def transport(side, run_id, run_dir, roster, progress, log, split) -> Transport:
        if side.config.transport == "inproc":
            return in_process_transport(side, run_id, progress.step, split, run_dir)
        return LoopbackFleet.start(
            served_description(side, run_id, run_dir),
            side.task,
            side.shards,
            side.fleet,
            side.device,
            run_dir,
            roster,
            log,
            split.servicer if split else None,
        )

    return federate(config, transport, echo, resume)


def serve(
    config: RunConfig,
    address: str,
    tokens: TokenBook | None = None,
    tls: ServerTls | None = None,
    resume: bool = False,
    heartbeat_s: float = 1.0,
    echo: Echo = print,
    stream_idle_s: float = STREAM_IDLE_S,
    split_port: int = 0,
) -> dict:
    """`edgefed server`: serve the federation on `address` to `edgefed client`s; returns the summary."""
    if tokens is not None and len(tokens.clients) != config.clients:
        raise EdgefedError(
            f"the token file lists {len(tokens.clients)} clients, the run has {config.clients}"
        )
    if tokens is None and not is_loopback(address):
        echo(f"edgefed: warning: serving {address} without --tokens: anyone who reaches it can join")
    if tokens is not None and tls is None and not is_loopback(address):
        echo(f"edgefed: warning: serving {address} without TLS: the clients' tokens travel in plaintext")

    def transport(side, run_id, run_dir, roster, progress, log, split) -> Transport:
        servicer = FederationServicer(
            served_description(side, run_id, run_dir),
            tokens,
            roster,
            heartbeat_s,
            side.device,
            log,
            side.fleet,
            stream_idle_s,
        )
        grpc_transport = GrpcTransport(
            servicer,
            address,
            side.config.min_clients or side.config.clients,
            side.config.round_deadline_s,
            tls,
            split=split.servicer if split else None,
            split_port=split_port,
        )
        log(f"edgefed: serving run {run_id} on {grpc_transport.address}")
        return grpc_transport

    return federate(dataclasses.replace(config, transport="grpc"), transport, echo, resume)


def federate(config: RunConfig, make_transport: TransportFactory, echo: Echo, resume: bool) -> dict:
    """The server's side of any run: build (or resume), run the rounds with checkpoints, save, summarise."""
    # -- setup ----------------------------------------------------------------------------------------
    set_seed(config.seed)
    run_dir = choose_run_dir(config, resume)
    side = prepare(config)
    lr = config.lr if config.lr is not None else side.method.default_lr
    data = str(Path(config.data).resolve()) if config.data is not None else None  # None: the shipped sample
    tasks, eval_tasks = (
        tuple(str(Path(path).resolve()) for path in paths) for paths in (config.tasks, config.eval_tasks)
    )
    side.config = config = dataclasses.replace(config, lr=lr, data=data, tasks=tasks, eval_tasks=eval_tasks)
    aggregator = AGGREGATORS.create(config.aggregator)
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is None:
        run_id = uuid.uuid4().hex[:16]
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no directory behind
        write_config(config, run_dir / "config.toml")
    else:
        run_id = checkpoint.run_id
        resume_from(checkpoint, side, run_dir)
        aggregator.load_state_dict(checkpoint.aggregator_state)
        echo(f"edgefed: resuming run {run_id} after round {checkpoint.round} from {run_dir / 'checkpoint'}")
    describe_run(side, echo)
    progress = StepProgress(config)
    log = progress.writer(echo)
    split = split_side(side, run_id, checkpoint, log, echo) if side.method.splits_model else None
    transport = make_transport(
        side, run_id, run_dir, checkpoint.clients if checkpoint else Roster(), progress, log, split
    )
    if split is not None:
        transport = SplitRounds(transport, split)
    server = FederatedServer(
        side.global_model,
        aggregator,
        side.method.low_rank_pairs(side.global_model),
        transport,
        lambda model: side.task.evaluate(model, side.eval_examples, side.device),
        config.clients,
        config.sample_fraction,
        config.seed,
        config.min_clients,
        log,
        SimulatedClock(side.fleet) if config.profiles else None,
        config.max_client_share,
    )
    recorder = Recorder(
        run_dir, log, resume_after=checkpoint.round if checkpoint else None, masked_lm=side.task.unlabeled
    )
    stop_at = config.target_accuracy if config.stop_at_target else None
    policy = RunPolicy(recorder, run_dir, run_id, aggregator, transport, split, stop_at)
    start = (
        StartingPoint(checkpoint.round + 1, checkpoint.wall_s, checkpoint.sim_s or 0.0)
        if checkpoint
        else StartingPoint()
    )
    # A run stopped at its target and killed before it finished does not train past it on resume.
    rounds = checkpoint.round if checkpoint and policy.stopped_before() else config.rounds
    # -- the rounds -----------------------------------------------------------------------------------
    started = time.perf_counter()
    try:
        server.run(rounds, policy, start)
    finally:
        progress.close()
        transport.close()
    # -- save -----------------------------------------------------------------------------------------
    return finish_run(side, run_dir, recorder.rounds, time.perf_counter() - started, echo)


def resume_from(checkpoint: Checkpoint, side: ServerSide, run_dir: Path) -> None:
    """Check that the checkpoint belongs to this configuration; restore the global model and the RNGs."""
    config = side.config
    recorded = config_from_text((run_dir / "config.toml").read_text(encoding="utf-8"), "config.toml")
    if dataclasses.replace(recorded, transport=config.transport, out=config.out) != config:
        raise EdgefedError(f"{run_dir}: the configuration differs from the one the run started with")
    load_trainable_state(
        side.global_model, {k: v.to(side.device) for k, v in checkpoint.global_state.items()}
    )
    if bool(checkpoint.server_state) != side.method.splits_model:
        raise EdgefedError(f"{run_dir}: the checkpoint does not hold what {config.method} needs to resume")
    restore_rng(checkpoint.rng)


def describe_run(side: ServerSide, echo: Echo) -> None:
    config = side.config
    trainable = count_trainable(side.global_model)
    total = sum(p.numel() for p in side.global_model.parameters())
    echo(
        f"edgefed: {config.method} on {config.model} ({trainable:,} of {total:,} parameters train), "
        f"{config.clients} clients ({config.sharing()}), {config.rounds} rounds, "
        f"{len(side.train):,} training and {len(side.evaluation):,} evaluation examples, "
        f"{side.device.type}, {config.transport} transport"
    )
    if config.profiles:
        describe_fleet(side, echo)
    if config.pseudo_labels != "none":
        echo(
            f"edgefed: pseudo labels ({config.pseudo_labels}): each client labels its "
            f"{config.unlabeled_pool} unlabelled inputs with the broadcast global model on the device; "
            "they never leave it"
        )


def split_side(
    side: ServerSide, run_id: str, checkpoint: Checkpoint | None, log: Echo, echo: Echo
) -> SplitSide:
    """FedBERT: the body the server trains over the Split stream (a resumed run's, from its checkpoint)."""
    config = side.config
    split = SplitSide(
        side.global_model, config.split_strategy, config.split_codec, config.lr, config.max_grad_norm,
        run_id, side.device, log, config.seed,
    )  # fmt: skip
    if checkpoint is not None:
        split.trainer.load_state_dict({k: v.to(side.device) for k, v in checkpoint.server_state.items()})
        split.sync_global()
    echo(
        f"edgefed: split learning ({config.split_strategy}): the clients hold the embeddings and the MLM "
        f"head, this server the body; activations and gradients travel as {config.split_codec}"
    )
    return split


def run_description(side: ServerSide, run_id: str) -> RunDescription:
    return RunDescription(
        run_id,
        side.config,
        side.num_labels,
        side.spec.head_modules,
        side.fingerprint,
        state_payload(side.setup),
    )


def served_description(side: ServerSide, run_id: str, run_dir: Path) -> RunDescription:
    """What clients over gRPC learn of the run, with the ort devices' runtime files when the run allows
    them (made when the first one asks), else why not."""
    refusal = adapter_runtime_refusal(side.config, side.method)
    if refusal is None and side.config.codec != "none":
        refusal = f"ort devices send their deltas uncompressed: codec none, not {side.config.codec}"
    return dataclasses.replace(
        run_description(side, run_id),
        ort_files=None if refusal else lambda: ort_device_files(side, run_dir),
        ort_refusal=refusal or "",
    )


def client_worker(side: ServerSide, device: torch.device):
    """A worker built as a client builds it: the pre-trained files and the server's setup state."""
    base, _ = side.task.load_model(resolve_model_path(side.config.model), side.num_labels)
    return build_worker(side.config, base, side.spec.head_modules, device, side.setup)


def ort_artifacts(worker, run_dir: Path) -> tuple[dict[str, list[int]], dict[str, bytes]]:
    """ONNX Runtime training artifacts of `worker`'s model in <run>/ort/: the tensors they train (name
    -> shape), and the files by name."""
    from edgefed.ort.artifacts import write_artifacts

    shapes = {name: list(tensor.shape) for name, tensor in trainable_state(worker.model).items()}
    return shapes, write_artifacts(worker.model, list(shapes), run_dir / "ort")


def ort_device_files(side: ServerSide, run_dir: Path) -> bytes:
    """What `edgefed client --runtime ort` fetches at setup (edgefed/ort/device.py), as a payload: the
    artifacts, the model's tokenizer.json and the manifest of the run's training settings."""
    from edgefed.ort.arrays import files_payload
    from edgefed.ort.device import MANIFEST, TOKENIZER, Manifest

    config = side.config
    backend = getattr(side.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgefedError(f"{config.model} has no fast tokenizer (tokenizer.json), which ort devices use")
    worker = client_worker(side, torch.device("cpu"))
    trainable, files = ort_artifacts(worker, run_dir)
    manifest = Manifest(
        trainable=trainable,
        lr=worker.trainer.lr,
        max_grad_norm=config.max_grad_norm,
        batch_size=config.batch_size,
        local_steps=config.local_steps,
        local_epochs=config.local_epochs,
        max_seq_len=config.max_seq_len,
        seed=config.seed,
        chunk_bytes=config.chunk_bytes,
        pad_id=side.tokenizer.pad_token_id or 0,
    )
    return files_payload(files | {TOKENIZER: backend.to_str().encode(), MANIFEST: manifest.to_json()})


def executorch_trainer(side: ServerSide, worker, run_dir: Path):
    """The ExecuTorch training program of `worker`'s model, made once (<run>/executorch/train.pte), and
    the in-process trainer that runs it."""
    from edgefed.et.local import EtLocalTrainer
    from edgefed.et.program import training_program

    config = side.config
    trainable = list(trainable_state(worker.model))
    program = training_program(worker.model, trainable, config.batch_size, config.max_seq_len)
    (run_dir / "executorch").mkdir(parents=True, exist_ok=True)
    (run_dir / "executorch" / "train.pte").write_bytes(program)
    pad_id = side.tokenizer.pad_token_id or 0
    return EtLocalTrainer(
        program,
        trainable,
        worker.trainer.lr,
        config.batch_size,
        config.max_seq_len,
        pad_id,
        config.max_grad_norm,
    )


def in_process_transport(
    side: ServerSide,
    run_id: str,
    on_step: Callable[[int, int, float], None],
    split: SplitSide | None,
    run_dir: Path,
) -> InProcessTransport:
    """The clients of a simulation, taking turns on one worker built only from the pre-trained files and
    the server's setup state, as a remote client builds it; each with its own shard and plan. With
    `split`, each client reaches the server's body through its own stream to the Split servicer. With
    client-runtime ort, the server makes ONNX Runtime training artifacts of the worker's model once
    (<run>/ort/) and the clients it names train through them."""
    config = side.config
    worker = client_worker(side, side.device)
    runtimes = {"torch": None}
    if "ort" in config.client_runtime:
        from edgefed.ort.local import OrtLocalTrainer

        trainable, _ = ort_artifacts(worker, run_dir)
        runtimes["ort"] = OrtLocalTrainer(
            run_dir / "ort", list(trainable), worker.trainer.lr, config.batch_size, config.max_grad_norm
        )
    if "executorch" in config.client_runtime:
        runtimes["executorch"] = executorch_trainer(side, worker, run_dir)
    settings = config.data_settings()
    clients = []
    for index, shard in enumerate(side.shards):
        plan = side.fleet.plan(index)
        seq_len = plan.seq_len if plan else config.max_seq_len
        examples = side.task.encode_client(shard, side.tokenizer, seq_len, settings)
        remote_body = None
        if split is not None:
            stub = InProcessSplitStub(split.servicer)
            remote_body = RemoteBody(stub, split.servicer.run_id, config.split_codec, client_name(index))
        scope = side.fleet.scope(plan) if plan else None
        runtime = runtimes[config.client_runtime[index % len(config.client_runtime)]]
        clients.append(worker.client(index, examples, plan, scope, remote_body, on_step, runtime))
    return InProcessTransport(
        clients,
        side.setup,
        make_codec(config.codec),
        run_id,
        config.chunk_bytes,
        config.max_update_norm,
        side.device,
        [side.fleet.scope(side.fleet.plan(index)) for index in range(config.clients)],
    )


def choose_run_dir(config: RunConfig, resume: bool = False) -> Path:
    """`--out`, which must not hold a run already (unless resuming it), or a fresh runs/<method>-<time>."""
    if resume:
        if config.out is None:
            raise EdgefedError("--resume needs --out DIR, the directory of the run to resume")
        return Path(config.out)
    if config.out is not None:
        run_dir = Path(config.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise EdgefedError(
                f"{run_dir}: the run directory exists and is not empty; choose another --out (or --resume it)"
            )
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{config.method}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path("runs") / f"{config.method}-{stamp}-{suffix}"
    return run_dir


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
