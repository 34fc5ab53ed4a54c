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

from edgefed.components import aggregator_of, config_from_text
from edgefed.config import RunConfig, ServerSettings, write_config
from edgefed.devices.clock import SimulatedClock
from edgefed.errors import EdgefedError
from edgefed.federation.checkpoint import Checkpoint, checkpoint_folder, load_checkpoint, restore_rng
from edgefed.federation.loop import FederatedServer, StartingPoint
from edgefed.federation.policy import RunPolicy
from edgefed.federation.progress import StepProgress
from edgefed.federation.recorder import Recorder, parse_metrics
from edgefed.federation.report import finish_run
from edgefed.methods import count_trainable, load_trainable_state
from edgefed.setup import RunSetup, prepare
from edgefed.split import SplitSide
from edgefed.transport.auth import TokenBook
from edgefed.transport.base import Roster, RunContext, TransportMaker
from edgefed.transport.grpc_server import Served
from edgefed.transport.inproc import InProcess
from edgefed.transport.loopback import Loopback
from edgefed.transport.split_rounds import SplitRounds
from edgefed.types import RunSummary
from edgefed.wire.channels import ServerTls, is_loopback

Echo = Callable[[str], None]


def run(config: RunConfig, echo: Echo = print, resume: bool = False) -> RunSummary:
    """`edgefed run`: a whole federation from one command; clients in this process or in processes."""
    return federate(config, InProcess() if config.transport == "inproc" else Loopback(), echo, resume)


def serve(
    config: RunConfig,
    address: str,
    tokens: TokenBook | None = None,
    tls: ServerTls | None = None,
    resume: bool = False,
    settings: ServerSettings | None = None,
    echo: Echo = print,
) -> RunSummary:
    """`edgefed server`: serve the federation on `address` to `edgefed client`s; returns the summary."""
    if tokens is not None and len(tokens.clients) != config.clients:
        raise EdgefedError(
            f"the token file lists {len(tokens.clients)} clients, the run has {config.clients}"
        )
    if tokens is None and not is_loopback(address):
        raise EdgefedError(
            f"serving {address} without --tokens would let anyone who reaches it join and steer the run: "
            "give --tokens FILE (one `client-id token` line per client), or serve on 127.0.0.1"
        )
    if tokens is None:
        echo(
            f"edgefed: warning: serving {address} without --tokens: any process on this machine can join "
            "(each client gets a session token at its first Join)"
        )
    if tokens is not None and tls is None and not is_loopback(address):
        echo(f"edgefed: warning: serving {address} without TLS: the clients' tokens travel in plaintext")
    served = Served(address, tokens, tls, settings or ServerSettings())
    return federate(dataclasses.replace(config, transport="grpc"), served, echo, resume)


def federate(config: RunConfig, transports: TransportMaker, echo: Echo, resume: bool) -> RunSummary:
    """The server's side of any run: build (or resume), run the rounds with checkpoints, save, summarise."""
    # -- setup ----------------------------------------------------------------------------------------
    set_seed(config.seed)
    run_dir = choose_run_dir(config, resume)
    setup = prepare(config)
    config = setup.config  # with the method's learning rate and absolute data paths, as recorded
    aggregator = aggregator_of(config)
    checkpoint = None
    if resume and checkpoint_folder(run_dir) is not None:
        checkpoint = load_checkpoint(run_dir)
    elif resume:
        echo(
            f"edgefed: {run_dir} has no checkpoint (the run stopped before round 0 was kept); starting afresh"
        )
    if checkpoint is None:
        run_id = uuid.uuid4().hex[:16]
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no directory behind
        write_config(config, run_dir / "config.toml")
    else:
        run_id = checkpoint.run_id
        resume_from(checkpoint, setup, run_dir)
        aggregator.load_state_dict(checkpoint.aggregator_state)
        echo(f"edgefed: resuming run {run_id} after round {checkpoint.round} from {run_dir / 'checkpoint'}")
    describe_run(setup, echo)
    progress = StepProgress(config)
    log = progress.writer(echo)
    split = split_side(setup, run_id, checkpoint, log, echo) if setup.method.splits_model else None
    roster = checkpoint.clients if checkpoint else Roster()
    transport = transports.open(setup, RunContext(run_id, run_dir, roster, progress.step, log, split))
    if split is not None:
        transport = SplitRounds(transport, split)
    server = FederatedServer(
        setup.global_model,
        aggregator,
        setup.method.low_rank_pairs(setup.global_model),
        transport,
        setup.evaluate,
        config.clients,
        config.sample_fraction,
        config.seed,
        config.min_clients,
        log,
        SimulatedClock(setup.fleet) if config.profiles else None,
        config.max_client_share,
    )
    recorder = Recorder(
        log, setup.task.model_family.metrics, parse_metrics(checkpoint.metrics_jsonl) if checkpoint else None
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
    return finish_run(setup, run_dir, recorder.rounds, time.perf_counter() - started, echo)


def resume_from(checkpoint: Checkpoint, side: RunSetup, run_dir: Path) -> None:
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


def describe_run(side: RunSetup, echo: Echo) -> None:
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
        for line in side.fleet.describe(config.clients):
            echo(line)
    if config.pseudo_labels != "none":
        echo(
            f"edgefed: pseudo labels ({config.pseudo_labels}): each client labels its "
            f"{config.unlabeled_pool} unlabelled inputs with the broadcast global model on the device; "
            "they never leave it"
        )


def split_side(
    side: RunSetup, run_id: str, checkpoint: Checkpoint | None, log: Echo, echo: Echo
) -> SplitSide:
    """FedBERT: the body the server trains over the Split stream (a resumed run's, from its checkpoint)."""
    config, settings = side.config, side.method.settings
    split = SplitSide(
        side.global_model, settings.split_strategy, settings.split_codec, config.lr, config.max_grad_norm,
        run_id, side.device, log, config.seed,
    )  # fmt: skip
    if checkpoint is not None:
        split.trainer.load_state_dict({k: v.to(side.device) for k, v in checkpoint.server_state.items()})
        split.sync_global()
    echo(
        f"edgefed: split learning ({settings.split_strategy}): the clients hold the embeddings and the MLM "
        f"head, this server the body; activations and gradients travel as {settings.split_codec}"
    )
    return split


def choose_run_dir(config: RunConfig, resume: bool = False) -> Path:
    """`--out`, which must not hold a run already (unless resuming it), or a fresh runs/<method>-<time>."""
    if resume:
        if config.out is None:
            raise EdgefedError("--resume needs --out DIR, the directory of the run to resume")
        if not (Path(config.out) / "config.toml").is_file():
            raise EdgefedError(f"{config.out}: no run to resume there (it has no config.toml)")
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
