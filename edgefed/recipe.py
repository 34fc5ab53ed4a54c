"""The federated fine-tuning recipe behind `edgefed run`: read, partition, adapt, federate, save."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgefed.aggregators import AGGREGATORS
from edgefed.codecs import make_codec
from edgefed.config import RunConfig, resolve_config, write_config
from edgefed.data import encode, load_splits, partition
from edgefed.errors import EdgefedError
from edgefed.methods import METHODS, AdapterSpec, count_trainable
from edgefed.methods.lora import use_fused_kernels
from edgefed.models import load_classifier, load_tokenizer, resolve_model_path
from edgefed.recorder import Recorder, plot_curves, time_to_target
from edgefed.server import FederatedServer
from edgefed.training import LocalTrainer, evaluate, local_steps
from edgefed.transport import InProcessTransport, payload_bytes


def run(config: RunConfig, echo=print) -> dict:
    """Run a federation in this process and write its run directory; returns the summary."""
    set_seed(config.seed)
    run_dir = choose_run_dir(config)
    method = METHODS.create(config.method)
    aggregator = AGGREGATORS.create(config.aggregator)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    train, evaluation = load_splits(config.data, config.seed)
    train = train.subset(list(range(min(config.train_limit or len(train), len(train)))))
    evaluation = evaluation.subset(list(range(min(config.eval_limit or len(evaluation), len(evaluation)))))
    num_labels = max(max(train.labels), max(evaluation.labels)) + 1
    if num_labels < 2:
        raise EdgefedError(f"{train.source}: every label is 0; classification needs at least two classes")
    shards = partition(train.labels, config.clients, config.partition, config.seed)
    encoded_train = encode(train, tokenizer, config.max_seq_len)
    client_examples = [encoded_train.subset(shard) for shard in shards]
    eval_examples = encode(evaluation, tokenizer, config.max_seq_len)

    # Server: the global model, adapted once (FeDeRA's SVD happens here and nowhere else).
    base, new_modules = load_classifier(model_path, num_labels)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and config.max_seq_len > positions:
        raise EdgefedError(f"max-seq-len {config.max_seq_len} exceeds the model's {positions} positions")
    spec = AdapterSpec(
        config.rank, config.alpha, config.target_modules, tuple(new_modules) or ("classifier",)
    )
    global_model, setup = method.prepare_global(base, spec)
    global_model.to(device)
    if config.fused_kernels:
        use_fused_kernels(global_model)
    # Clients: in this process they take turns on one worker model, built only from the
    # pre-trained files and the server's setup state, as a remote client would build it.
    worker_base, _ = load_classifier(model_path, num_labels)
    worker = method.adapt(worker_base, spec, setup)
    if config.fused_kernels:
        use_fused_kernels(worker)
    lr = config.lr if config.lr is not None else method.default_lr
    trainer = LocalTrainer(worker, lr, config.batch_size, device)

    def steps_for(client: int) -> int:
        return local_steps(
            len(client_examples[client]), config.batch_size, config.local_steps, config.local_epochs
        )

    data = str(Path(config.data).resolve()) if config.data is not None else None  # None: the shipped sample
    resolved = dataclasses.replace(config, lr=lr, data=data)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no directory behind
    write_config(resolved, run_dir / "config.toml")
    trainable = count_trainable(global_model)
    total = sum(p.numel() for p in global_model.parameters())
    echo(
        f"edgefed: {config.method} on {config.model} ({trainable:,} of {total:,} parameters train), "
        f"{config.clients} clients ({config.partition}), {config.rounds} rounds, {len(train):,} training "
        f"and {len(evaluation):,} evaluation examples, {device.type}"
    )
    progress = StepProgress(config)
    transport = InProcessTransport(
        trainer, client_examples, steps_for, config.seed, setup, make_codec(config.codec), progress.step
    )
    server = FederatedServer(
        global_model,
        aggregator,
        method.low_rank_pairs(global_model),
        transport,
        lambda model: evaluate(model, eval_examples, device),
        config.clients,
        config.sample_fraction,
        config.seed,
    )
    recorder = Recorder(run_dir, echo=progress.writer(echo))
    started = time.perf_counter()
    server.run(config.rounds, recorder.record)
    progress.close()

    method.save(global_model.cpu(), spec, setup, run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    rounds = recorder.rounds
    target_round, target_wall = time_to_target(rounds, config.target_accuracy)
    best = max(rounds, key=lambda metrics: metrics["accuracy"])
    summary = {
        "method": config.method,
        "aggregator": config.aggregator,
        "codec": config.codec,
        "model": config.model,
        "clients": config.clients,
        "rounds": config.rounds,
        "train_source": train.source,
        "eval_source": evaluation.source,
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "num_labels": num_labels,
        "head_modules": list(spec.head_modules),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_accuracy": rounds[-1]["accuracy"],
        "final_loss": rounds[-1]["loss"],
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
        "target_accuracy": config.target_accuracy,
        "rounds_to_target": target_round,
        # Simulated device time arrives with device profiles; until then only this machine's clock.
        "time_to_target_s": {"wall": target_wall},
        "bytes_up": sum(metrics["bytes_up"] for metrics in rounds),
        "bytes_down": sum(metrics["bytes_down"] for metrics in rounds),
        "setup_bytes_per_client": payload_bytes(setup),
        "wall_s": rounds[-1]["wall_s"],
        "total_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    title = f"{config.method} · {config.aggregator} · {config.clients} clients · {config.partition}"
    if not plot_curves(rounds, title, run_dir / "curves.png"):
        echo("edgefed: curves.png skipped (matplotlib is not installed: pip install 'edgefed[demo]')")
    echo(format_summary(summary))
    return summary


class StepProgress:
    """A progress bar over local training steps on a terminal (silent elsewhere: the table suffices)."""

    def __init__(self, config: RunConfig) -> None:
        per_round = max(1, round(config.sample_fraction * config.clients))
        total = config.rounds * per_round * config.local_steps if config.local_steps else None
        self.rounds = config.rounds
        self.bar = tqdm(
            total=total, unit="step", desc="local training", leave=False, file=sys.stderr, disable=None
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
    lines.append(f"run directory: {summary['run_dir']}")
    return "\n".join(lines)


def choose_run_dir(config: RunConfig) -> Path:
    """`--out`, which must not hold a run already, or a fresh runs/<method>-<time>."""
    if config.out is not None:
        run_dir = Path(config.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise EdgefedError(f"{run_dir}: the run directory exists and is not empty; choose another --out")
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
    spec = AdapterSpec(config.rank, config.alpha, config.target_modules, tuple(summary["head_modules"]))
    method = METHODS.create(config.method)
    return method.load(run_dir / "adapter", resolve_model_path(config.model), summary["num_labels"], spec)
