"""A client on ExecuTorch against a client on torch, in one process, side by side: local step time on the
same batches, and the training program's export time and size.

- step time: one client's local round of FeDeRA (or LoRA) on all-MiniLM-L6-v2, batch 16, 64 tokens,
  from the same global state, seed and batches; rounds alternate (ExecuTorch, torch, ...), the first
  of each warms up, and the median s per step over the others counts. ExecuTorch's program takes
  every batch padded to 64 tokens (its shapes are static); torch's batches are as long as their
  longest text. Both train without dropout, as the program does.

A federation mixing both runtimes computes the torch-only one (tests/test_executorch.py, on the tests'
tiny model); at this step time the demo with ExecuTorch clients would take about half an hour here.

    python benchmarks/executorch_runtime.py [--method federa] [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import statistics
import time
from pathlib import Path

import torch
from publish import publish

from edgefed.client import build_worker
from edgefed.components import data_settings, resolve_config, task_of
from edgefed.et.local import EtLocalTrainer
from edgefed.et.program import training_program
from edgefed.methods import trainable_state
from edgefed.models import load_tokenizer, resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="federa", choices=("federa", "lora"))
    parser.add_argument("--steps", type=int, default=3, help="local steps of a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per runtime, in turn")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    config = resolve_config(None, {"method": args.method, "batch_size": 16, "max_seq_len": 64})
    task = task_of(config)
    path = resolve_model_path(config.model)
    base, heads = task.load_model(path, 2)
    worker = build_worker(config, base, tuple(heads), torch.device("cpu"), None)
    for module in worker.model.modules():  # the program has no dropout: neither has torch's round here
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train, _ = task.load_data(data_settings(config))
    examples = task.encode_client(train, load_tokenizer(path), config.max_seq_len, data_settings(config))
    trainable = list(trainable_state(worker.model))
    start = time.perf_counter()
    program = training_program(worker.model, trainable, config.batch_size, config.max_seq_len)
    export_s = time.perf_counter() - start
    et = EtLocalTrainer(program, trainable, worker.trainer.lr, 16, 64, 0, config.max_grad_norm)
    state = {name: tensor.clone() for name, tensor in trainable_state(worker.model).items()}
    seconds = {"executorch": [], "torch": []}
    for _ in range(args.rounds):
        for name, trainer in (("executorch", et), ("torch", worker.trainer)):
            update = trainer.fit(0, state, examples, args.steps, seed=0)
            seconds[name].append(update.train_s / update.steps)
    step = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    lines = [
        f"`python benchmarks/executorch_runtime.py --method {args.method}` on "
        f"{platform.machine()} ({torch.get_num_threads()} threads), torch {metadata.version('torch')}, "
        f"executorch {metadata.version('executorch')}.",
        "",
        f"## One client's local round: {args.method} on all-MiniLM-L6-v2, batch 16, 64 tokens, "
        f"{args.steps} steps",
        "",
        "| | torch | ExecuTorch | ExecuTorch / torch |",
        "|---|---:|---:|---:|",
        f"| s per local step (median of rounds 2-{args.rounds}) | {step['torch']:.3f} | "
        f"{step['executorch']:.3f} | {step['executorch'] / step['torch']:.2f} |",
        "",
        f"The training program (made once per run by the server in {export_s:.1f} s) is "
        f"{len(program) / 1e6:.1f} MB: every weight of the model. Both runtimes ran without dropout.",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
