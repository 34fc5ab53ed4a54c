"""Building a federation from a configuration: the data, the global model, the setup state and the
fleet's plans, once, into a frozen `RunSetup` that the recipe, its transports and their clients read;
and loading what a finished run trained."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgefed.codecs import bytes_per_value
from edgefed.components import adapter_spec, data_settings, method_of, resolve_config, task_of
from edgefed.config import RunConfig
from edgefed.devices.fleet import FleetPlans, adapted_fleet
from edgefed.devices.planner import Request
from edgefed.errors import EdgefedError
from edgefed.methods import AdapterSpec, Method
from edgefed.methods.base import SetupState
from edgefed.models import default_device, load_tokenizer, model_fingerprint, resolve_model_path
from edgefed.tasks import Task
from edgefed.types import Evaluation, RunSummary

SUMMARY = "summary.json"  # what a finished run writes last (edgefed/federation/report.py)


@dataclass(frozen=True)
class RunSetup:
    """What a server builds from a configuration: data, the global model and the clients' setup state.
    Frozen: the global model's weights change as the rounds go, nothing else here does."""

    config: RunConfig
    method: Method
    task: Task
    spec: AdapterSpec
    global_model: nn.Module
    setup: SetupState
    tokenizer: object
    train: Any  # the task's training data (LabeledTexts; a TaskSet for multi-task runs)
    shards: list[Any]  # each client's part of it, in client order
    evaluation: Any
    eval_examples: Any
    num_labels: int
    fingerprint: str
    device: torch.device
    fleet: FleetPlans

    def evaluate(self, model: nn.Module) -> Evaluation:
        """`model` (the global model as the rounds leave it) on the run's evaluation examples."""
        return self.task.evaluate(model, self.eval_examples, self.device)


def settled(config: RunConfig, method: Method) -> RunConfig:
    """The configuration as the run records it: the method's own learning rate where none is set,
    and the data's paths absolute (None: the sample shipped in the package)."""

    def absolute(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(Path(path).resolve()) for path in paths)

    return dataclasses.replace(
        config,
        lr=config.lr_for(method.default_lr),
        data=str(Path(config.data).resolve()) if config.data is not None else None,
        tasks=absolute(config.tasks),
        eval_tasks=absolute(config.eval_tasks),
    )


def prepare(config: RunConfig) -> RunSetup:
    method = method_of(config)
    config = settled(config, method)
    task = task_of(config)
    device = default_device()
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    settings = data_settings(config)
    train, evaluation = task.load_data(settings)
    shards = task.shards(train, settings)  # drawn here: bad input fails before any write
    num_labels = task.num_labels(train, evaluation)
    # The global model, adapted once (FeDeRA's SVD happens here and nowhere else).
    base, new_modules = task.load_model(model_path, num_labels)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and config.max_seq_len > positions:
        raise EdgefedError(f"max-seq-len {config.max_seq_len} exceeds the model's {positions} positions")
    fingerprint = model_fingerprint(base, new_modules)
    spec = adapter_spec(config, method, tuple(new_modules))
    request = plan_request(config, spec)
    global_model, setup, fleet = adapted_fleet(
        method, base, spec, request, config.profiles, config.fleet_strategy
    )
    if config.profiles:
        fleet.check(config.clients, combines_plans=config.aggregator == "hetero")
    global_model.to(device)
    method.accelerate(global_model)
    eval_examples = task.encode(evaluation, tokenizer, config.max_seq_len)
    return RunSetup(
        config,
        method,
        task,
        spec,
        global_model,
        setup,
        tokenizer,
        train,
        shards,
        evaluation,
        eval_examples,
        num_labels,
        fingerprint,
        device,
        fleet,
    )


def plan_request(config: RunConfig, spec: AdapterSpec) -> Request:
    if config.local_steps is None and config.budget_s is not None:
        raise EdgefedError("budget-s bounds a round's local steps: set local-steps, not local-epochs")
    return Request(
        rank=spec.rank,
        batch_size=config.batch_size,
        seq_len=config.max_seq_len,
        local_steps=config.local_steps or 1,
        bytes_per_sent_value=bytes_per_value(config.codec),
        budget_s=config.budget_s,
    )


def read_summary(run_dir: str | Path) -> RunSummary:
    """A finished run's summary.json, as edgefed/federation/report.py wrote it."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise EdgefedError(f"{run_dir}: no {SUMMARY}; the run did not finish")
    try:
        return RunSummary.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise EdgefedError(f"{path}: not a run summary ({error})") from None


def load_trained(run_dir: str | Path) -> nn.Module:
    """The trained model of a finished run, for any method (peft adapters on the original model)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    config = resolve_config(str(run_dir / "config.toml"), {})
    method = method_of(config)
    spec = adapter_spec(config, method, tuple(summary.head_modules))
    base, _ = task_of(config).load_model(resolve_model_path(config.model), summary.num_labels)
    return method.load(run_dir / method.result_dir, base, spec)
