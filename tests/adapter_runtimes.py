"""What the tests of the runtimes that train exported adapters (ONNX Runtime, ExecuTorch) share: a worker
and its examples on the tiny BERT without dropout (conftest's `still_model_dir`), a perturbed state,
and a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgefed.client import build_worker
from edgefed.components import data_settings, resolve_config, task_of
from edgefed.models import load_tokenizer
from tests.tiny import tiny_bert_config
from tests.tolerance import training_terms

# The mixed-runtime federations' chain of roundings: 3 rounds of 4 local steps (an aggregation
# counted as a fifth) at 32 tokens and batches of 8, then an evaluation over 100 examples.
MIXED_RUN_TERMS = training_terms(tiny_bert_config(), seq_len=32, batch_size=8, steps=3 * 5, eval_examples=100)


def worker_and_examples(model_dir: Path, data_dir: Path, method: str):
    config = resolve_config(
        None, {"model": str(model_dir), "data": str(data_dir), "method": method, "lr": 0.01, "batch_size": 8}
    )
    task = task_of(config)
    base, heads = task.load_model(str(model_dir), 2)
    worker = build_worker(config, base, tuple(heads), torch.device("cpu"), None)
    train, _ = task.load_data(data_settings(config))
    examples = task.encode_client(train, load_tokenizer(str(model_dir)), 32, data_settings(config))
    return config, worker, examples


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A global state away from the initial one (LoRA's B starts at zero, where A has no gradient)."""
    generator = torch.Generator().manual_seed(5)
    return {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in state.items()}


def float64_round(worker, global_state, examples, steps: int, seed: int):
    """The torch round of `worker` run in float64 (the reference a float32 round's rounding is measured
    against), with its per-step losses; the worker's model is float32 again afterwards."""
    losses: list[float] = []
    worker.model.double()
    try:
        update = worker.trainer.fit(0, global_state, examples, steps, seed=seed, on_step=losses.append)
    finally:
        worker.model.float()
    return update, losses


def run_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
