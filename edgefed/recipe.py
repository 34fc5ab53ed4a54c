"""The federated fine-tuning recipe behind `edgefed run`: read, partition, adapt, federate, save."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgefed.aggregators import AGGREGATORS
from edgefed.calibrate import measure_machine
from edgefed.checkpoint import Checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from edgefed.client import FederatedClient, client_name
from edgefed.clock import SimulatedClock
from edgefed.codecs import make_codec
from edgefed.config import RunConfig, config_from_text, resolve_config, write_config
from edgefed.data import EncodedExamples, LabeledTexts, partition
from edgefed.errors import EdgefedError
from edgefed.fleet import FleetPlans, adapt_and_measure, plan_request
from edgefed.methods import METHODS, AdapterSpec, Method, count_trainable
from edgefed.methods.base import SetupState, load_trainable_state, trainable_state
from edgefed.methods.lora import use_fused_kernels
from edgefed.models import load_tokenizer, model_fingerprint, resolve_model_path
from edgefed.profiles import load_profile
from edgefed.recorder import Recorder, plot_curves, time_to_target
from edgefed.server import FederatedServer
from edgefed.split import InProcessSplitStub, RemoteBody
from edgefed.split_rounds import SplitRounds, SplitSide
from edgefed.tasks import TASKS, Task
from edgefed.training import LocalTrainer, local_steps
from edgefed.transport import InProcessTransport, state_payload
from edgefed.transport.auth import TokenBook
from edgefed.transport.grpc_server import FederationServicer, GrpcTransport, RunDescription
from edgefed.transport.loopback import LoopbackFleet


@dataclass
class ServerSide:
    """What a server builds from a configuration: data, the global model and the clients' setup state."""

    config: RunConfig
    method: Method
    task: Task
    spec: AdapterSpec
    global_model: nn.Module
    setup: SetupState
    tokenizer: object
    train: LabeledTexts
    evaluation: LabeledTexts
    eval_examples: EncodedExamples
    num_labels: int
    fingerprint: str
    device: torch.device
    fleet: FleetPlans


def prepare(config: RunConfig) -> ServerSide:
    method = METHODS.create(config.method)
    task = TASKS.create(method.task)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    train, evaluation = task.splits(config.data, config.seed)
    train = train.subset(list(range(min(config.train_limit or len(train), len(train)))))
    evaluation = evaluation.subset(list(range(min(config.eval_limit or len(evaluation), len(evaluation)))))
    num_labels = task.num_labels(train, evaluation)
    # The global model, adapted once (FeDeRA's SVD happens here and nowhere else).
    base, new_modules = task.load_model(model_path, num_labels)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and config.max_seq_len > positions:
        raise EdgefedError(f"max-seq-len {config.max_seq_len} exceeds the model's {positions} positions")
    fingerprint = model_fingerprint(base, new_modules)
    spec = AdapterSpec(
        config.rank, config.alpha, config.target_modules, tuple(new_modules) or ("classifier",), config.freeze
    )
    global_model, setup, shape = adapt_and_measure(method, base, spec)
    pairs = method.low_rank_pairs(global_model)
    global_state = trainable_state(global_model)
    fleet = FleetPlans(
        shape,
        plan_request(config),
        hasattr(global_model, "exit_layer"),
        {name: tuple(tensor.shape) for name, tensor in global_state.items()},
        pairs,
        config.profiles,
    )
    global_model.to(device)
    if config.fused_kernels:
        use_fused_kernels(global_model)
    eval_examples = task.encode(evaluation, tokenizer, config.max_seq_len)
    return ServerSide(
        config,
        method,
        task,
        spec,
        global_model,
        setup,
        tokenizer,
        train,
        evaluation,
        eval_examples,
        num_labels,
        fingerprint,
        device,
        fleet,
    )


def in_process_clients(side: ServerSide, on_step, split: SplitSide | None = None) -> list[FederatedClient]:
    """The clients of a simulation, taking turns on one worker model built only from the pre-trained
    files and the server's setup state, as a remote client would build it; each with its own plan.
    With `split`, each client reaches the server's body through its own stream to the Split servicer."""
    config = side.config
    shards = partition(side.train.labels, config.clients, config.partition, config.seed)
    worker_base, _ = side.task.load_model(resolve_model_path(config.model), side.num_labels)
    worker = side.method.adapt(worker_base, side.spec, side.setup)
    if config.fused_kernels:
        use_fused_kernels(worker)
    trainer = LocalTrainer(worker, config.lr, config.batch_size, side.device, config.max_grad_norm)
    encoded: dict[int, EncodedExamples] = {}  # the training set at each plan's sequence length
    clients = []
    for index, shard in enumerate(shards):
        plan = side.fleet.plan(index)
        seq_len = plan.seq_len if plan else config.max_seq_len
        if seq_len not in encoded:
            encoded[seq_len] = side.task.encode(side.train, side.tokenizer, seq_len)
        examples = encoded[seq_len].subset(shard)
        batch_size = plan.batch_size if plan else config.batch_size
        steps = local_steps(len(examples), batch_size, config.local_steps, config.local_epochs)
        codec = make_codec(config.codec)
        scope = side.fleet.scope(plan) if plan else None
        remote_body = None
        if split is not None:
            stub = InProcessSplitStub(split.servicer)
            remote_body = RemoteBody(stub, split.servicer.run_id, config.split_codec, client_name(index))
        clients.append(
            FederatedClient(
                index, trainer, examples, steps, config.seed, codec, on_step, plan, scope, remote_body
            )
        )
    return clients


def run(config: RunConfig, echo=print, resume: bool = False) -> dict:
    """`edgefed run`: a whole federation from one command; clients in this process or in processes."""

    def transport(side: ServerSide, run_id: str, run_dir: Path, slots: dict[str, int], progress, log, split):
        if side.config.transport == "inproc":
            clients = in_process_clients(side, progress.step, split)
            return InProcessTransport(
                clients,
                side.setup,
                make_codec(side.config.codec),
                run_id,
                side.config.chunk_bytes,
                side.config.max_update_norm,
                side.device,
                [side.fleet.scope(side.fleet.plan(index)) for index in range(side.config.clients)],
            )
        return LoopbackFleet.start(side, run_id, run_dir, slots, log, split)

    return federate(config, transport, echo, resume)


def serve(
    config: RunConfig,
    address: str,
    tokens: TokenBook | None = None,
    tls: tuple[bytes, bytes] | None = None,
    resume: bool = False,
    heartbeat_s: float = 1.0,
    echo=print,
) -> dict:
    """`edgefed server`: serve the federation on `address` to `edgefed client`s; returns the summary."""
    if tokens is not None and len(tokens.clients) != config.clients:
        raise EdgefedError(
            f"the token file lists {len(tokens.clients)} clients, the run has {config.clients}"
        )
    host = address.rsplit(":", 1)[0]
    if tokens is None and host not in ("127.0.0.1", "localhost", "[::1]"):
        echo(f"edgefed: warning: serving {address} without --tokens: anyone who reaches it can join")

    def transport(side: ServerSide, run_id: str, run_dir: Path, slots: dict[str, int], progress, log, split):
        description = RunDescription(
            run_id,
            side.config,
            side.num_labels,
            side.spec.head_modules,
            side.fingerprint,
            state_payload(side.setup),
        )
        servicer = FederationServicer(description, tokens, slots, heartbeat_s, side.device, log, side.fleet)
        grpc_transport = GrpcTransport(
            servicer,
            address,
            side.config.min_clients or side.config.clients,
            side.config.round_deadline_s,
            tls,
            split=split.servicer if split else None,
        )
        log(f"edgefed: serving run {run_id} on {grpc_transport.address}")
        return grpc_transport

    return federate(dataclasses.replace(config, transport="grpc"), transport, echo, resume)


def federate(config: RunConfig, make_transport, echo, resume: bool) -> dict:
    """The server's side of any run: build, (resume,) run the rounds with checkpoints, save, summarise."""
    set_seed(config.seed)
    run_dir = choose_run_dir(config, resume)
    side = prepare(config)
    lr = config.lr if config.lr is not None else side.method.default_lr
    data = str(Path(config.data).resolve()) if config.data is not None else None  # None: the shipped sample
    side.config = config = dataclasses.replace(config, lr=lr, data=data)
    aggregator = AGGREGATORS.create(config.aggregator)
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is None:
        run_id = uuid.uuid4().hex[:16]
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no directory behind
        write_config(config, run_dir / "config.toml")
    else:
        run_id = checkpoint.run_id
        recorded = config_from_text((run_dir / "config.toml").read_text(encoding="utf-8"), "config.toml")
        if dataclasses.replace(recorded, transport=config.transport, out=config.out) != config:
            raise EdgefedError(f"{run_dir}: the configuration differs from the one the run started with")
        load_trainable_state(
            side.global_model, {k: v.to(side.device) for k, v in checkpoint.global_state.items()}
        )
        if bool(checkpoint.server_state) != side.method.splits_model:
            raise EdgefedError(
                f"{run_dir}: the checkpoint does not hold what {config.method} needs to resume"
            )
        aggregator.load_state_dict(checkpoint.aggregator_state)
        restore_rng(checkpoint.rng)
        echo(f"edgefed: resuming run {run_id} after round {checkpoint.round} from {run_dir / 'checkpoint'}")
    trainable = count_trainable(side.global_model)
    total = sum(p.numel() for p in side.global_model.parameters())
    echo(
        f"edgefed: {config.method} on {config.model} ({trainable:,} of {total:,} parameters train), "
        f"{config.clients} clients ({config.partition}), {config.rounds} rounds, "
        f"{len(side.train):,} training and {len(side.evaluation):,} evaluation examples, "
        f"{side.device.type}, {config.transport} transport"
    )
    if config.profiles:
        describe_fleet(side, echo)
    progress = StepProgress(config)
    log = progress.writer(echo)
    slots = checkpoint.clients if checkpoint else {}
    split = None
    if side.method.splits_model:  # FedBERT: the server trains the body over the Split stream
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
    transport = make_transport(side, run_id, run_dir, slots, progress, log, split)
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
        simulated_clock(side, echo) if config.profiles else None,
    )
    recorder = Recorder(
        run_dir, log, resume_after=checkpoint.round if checkpoint else None, masked_lm=side.task.unlabeled
    )

    def save_round(round_number: int, state, wall_s: float) -> None:
        checkpoint = Checkpoint(
            round_number,
            run_id,
            state,
            wall_s,
            aggregator.state_dict(),
            transport.slots(),
            rng_state(),
            recorder.rounds[-1].get("sim_s"),
            split.trainer.state_dict() if split else {},
        )
        save_checkpoint(run_dir, checkpoint)

    def reached(metrics: dict) -> bool:
        return config.stop_at_target and metrics["accuracy"] >= config.target_accuracy

    # A run stopped at its target and killed before it finished does not train past it on resume.
    done = checkpoint is not None and any(reached(metrics) for metrics in recorder.rounds)
    started = time.perf_counter()
    try:
        server.run(
            checkpoint.round if done else config.rounds,
            recorder.record,
            save_round,
            first_round=checkpoint.round + 1 if checkpoint else 1,
            wall_offset=checkpoint.wall_s if checkpoint else 0.0,
            sim_offset=(checkpoint.sim_s or 0.0) if checkpoint else 0.0,
            stop=reached,
        )
    finally:
        progress.close()
        transport.close()
    return finish_run(side, run_dir, recorder.rounds, time.perf_counter() - started, echo)


def finish_run(side: ServerSide, run_dir: Path, rounds: list[dict], total_s: float, echo) -> dict:
    """The trained adapter, summary.json, curves.png and the closing lines."""
    config, global_model = side.config, side.global_model
    result_dir = run_dir / side.method.result_dir
    side.method.save(global_model.cpu(), side.spec, side.setup, result_dir)
    side.tokenizer.save_pretrained(result_dir)
    target_round, target_wall, target_sim = time_to_target(rounds, config.target_accuracy)
    best = max(rounds, key=lambda metrics: metrics["accuracy"])
    trainable = count_trainable(global_model)
    summary = {
        "method": config.method,
        "task": side.task.name,
        "aggregator": config.aggregator,
        "codec": config.codec,
        "transport": config.transport,
        "model": config.model,
        "clients": config.clients,
        "rounds": config.rounds,
        "train_source": side.train.source,
        "eval_source": side.evaluation.source,
        "train_examples": len(side.train),
        "eval_examples": len(side.evaluation),
        "num_labels": side.num_labels,
        "head_modules": list(side.spec.head_modules),
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in global_model.parameters()),
        "final_accuracy": rounds[-1]["accuracy"],
        "final_loss": rounds[-1]["loss"],
        "final_mlm_loss": rounds[-1].get("mlm_loss"),
        "final_exit_accuracy": rounds[-1].get("exit_accuracy"),
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
        "target_accuracy": config.target_accuracy,
        "rounds_to_target": target_round,
        # "simulated": the simulated device clock (edgefed/clock.py), only for fleets with profiles.
        "time_to_target_s": {"wall": target_wall, "simulated": target_sim},
        "profiles": list(config.profiles),
        "plans": {
            str(index): dataclasses.asdict(plan)
            for index in range(config.clients)
            if (plan := side.fleet.plan(index)) is not None
        },
        "sim_s": rounds[-1].get("sim_s"),
        "bytes_up": sum(metrics["bytes_up"] for metrics in rounds),
        "bytes_down": sum(metrics["bytes_down"] for metrics in rounds),
        "split_bytes_up": sum(metrics.get("split_bytes_up", 0) for metrics in rounds),
        "split_bytes_down": sum(metrics.get("split_bytes_down", 0) for metrics in rounds),
        "setup_bytes_per_client": len(state_payload(side.setup)),
        "wall_s": rounds[-1]["wall_s"],
        "total_s": total_s,
        "run_dir": str(run_dir),
        "result_dir": str(result_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    title = f"{config.method} · {config.aggregator} · {config.clients} clients · {config.partition}"
    if not plot_curves(rounds, title, run_dir / "curves.png", masked_lm=side.task.unlabeled):
        echo("edgefed: curves.png skipped (matplotlib is not installed: pip install 'edgefed[demo]')")
    echo(format_summary(summary))
    return summary


def describe_fleet(side: ServerSide, echo) -> None:
    """Each client's profile and plan, and the check that the aggregator can combine them."""
    config, fleet = side.config, side.fleet
    for index in range(config.clients):
        plan = fleet.plan(index)
        echo(
            f"edgefed: client {index}: {plan.profile}: layers {plan.frozen_layers}-{plan.exit_layer - 1} "
            f"train (exit {plan.exit_layer}), rank {plan.rank}, batch {plan.batch_size}, length "
            f"{plan.seq_len}; predicted {plan.step_s:.3f} s/step, {plan.peak_gb:.2f} GB"
        )
    if config.aggregator != "hetero" and fleet.heterogeneous(range(config.clients)):
        raise EdgefedError(
            "the clients' plans train different tensors (frozen layers, exits or ranks differ from the "
            "run's); combine them with --aggregator hetero"
        )


def simulated_clock(side: ServerSide, echo) -> SimulatedClock:
    if side.config.host_profile:
        host = load_profile(side.config.host_profile)
    else:
        echo("edgefed: measuring this machine for the simulated device clock (edgefed profile)")
        host = measure_machine(device=side.device, quick=True, echo=lambda line: None)
    echo(
        f"edgefed: simulated device clock: this machine runs {host.fp32_tflops:.3f} TFLOP/s FP32 GEMMs and "
        f"streams {host.bandwidth_gbs:.1f} GB/s; each client's measured time is scaled to its profile"
    )
    return SimulatedClock(side.fleet, host, side.fleet.shape)


class StepProgress:
    """A progress bar over in-process local training steps on a terminal (silent elsewhere: the table
    and, over gRPC, the clients' own logs suffice)."""

    def __init__(self, config: RunConfig) -> None:
        per_round = max(1, round(config.sample_fraction * config.clients))
        total = config.rounds * per_round * config.local_steps if config.local_steps else None
        self.rounds = config.rounds
        self.bar = tqdm(
            total=total,
            unit="step",
            desc="local training",
            leave=False,
            file=sys.stderr,
            disable=None if config.transport == "inproc" else True,
        )

    def step(self, round_number: int, client: int, loss: float) -> None:
        self.bar.set_postfix_str(
            f"round {round_number}/{self.rounds} client {client} loss {loss:.3f}", refresh=False
        )
        self.bar.update()

    def writer(self, echo):
        """Where table lines go: above the bar while it is shown."""
        return echo if self.bar.disable else lambda line: self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


def format_summary(summary: dict) -> str:
    if summary.get("final_mlm_loss") is not None:
        lines = [
            f"final MLM loss {summary['final_mlm_loss']:.4f} (masked-token accuracy "
            f"{summary['final_accuracy']:.4f}), {summary['wall_s']:.1f} s wall clock on this machine"
        ]
    else:
        lines = [
            f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f} at round "
            f"{summary['best_round']}), eval loss {summary['final_loss']:.4f}, "
            f"{summary['wall_s']:.1f} s wall clock on this machine"
        ]
    if summary["target_accuracy"] is not None:
        target = summary["target_accuracy"]
        if summary["rounds_to_target"] is None:
            lines.append(f"target accuracy {target:.4f} not reached")
        else:
            lines.append(
                f"target accuracy {target:.4f} reached at round {summary['rounds_to_target']} after "
                f"{summary['time_to_target_s']['wall']:.1f} s (wall clock)"
                + (
                    f", {summary['time_to_target_s']['simulated']:.1f} s on the SIMULATED device clock"
                    if summary["time_to_target_s"]["simulated"] is not None
                    else ""
                )
            )
    share = 100 * summary["trainable_parameters"] / summary["total_parameters"]
    traffic = (
        f"{summary['trainable_parameters']:,} trainable parameters ({share:.2f} %); "
        f"{summary['bytes_up'] / 1e6:.2f} MB up, {summary['bytes_down'] / 1e6:.2f} MB down in all"
    )
    if summary["setup_bytes_per_client"]:
        traffic += (
            f" (down includes a one-off setup of {summary['setup_bytes_per_client'] / 1e6:.2f} MB per client)"
        )
    lines.append(traffic)
    if summary.get("split_bytes_up"):
        lines.append(
            f"split activations and gradients: {summary['split_bytes_up'] / 1e6:.2f} MB up, "
            f"{summary['split_bytes_down'] / 1e6:.2f} MB down in all"
        )
    if summary["final_exit_accuracy"]:
        exits = ", ".join(f"{accuracy:.4f}" for accuracy in summary["final_exit_accuracy"])
        lines.append(f"accuracy at each exit (layers 1..{len(summary['final_exit_accuracy'])}): {exits}")
    if summary["sim_s"] is not None:
        profiles = ", ".join(summary["profiles"])
        lines.append(f"{summary['sim_s']:.1f} s on the SIMULATED device clock (profiles {profiles})")
    lines.append(f"run directory: {summary['run_dir']}")
    if summary.get("task") == "masked-lm":
        result = summary["result_dir"]
        lines.append(f"pre-trained model: {result} (fine-tune it: edgefed run --model {result})")
    return "\n".join(lines)


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


def load_trained(run_dir: str | Path) -> nn.Module:
    """The trained model of a finished run, for any method (peft adapters on the original model)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise EdgefedError(f"{run_dir}: no summary.json; the run did not finish")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    config = resolve_config(str(run_dir / "config.toml"), {})
    spec = AdapterSpec(
        config.rank, config.alpha, config.target_modules, tuple(summary["head_modules"]), config.freeze
    )
    method = METHODS.create(config.method)
    return method.load(
        run_dir / method.result_dir, resolve_model_path(config.model), summary["num_labels"], spec
    )
