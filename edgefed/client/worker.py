"""The one worker builder: a client's model, adapted and fused, its trainer, and its federated clients.

Every runtime builds its clients here: the in-process simulation (one worker shared by the clients,
which take turns), `edgefed client` over gRPC (one worker, one client), and the peak-memory probe
(edgefed/client/probe.py). A worker starts from a freshly loaded pre-trained model and the server's
setup state, so it computes what the server's global model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgefed.client.federated import FederatedClient
from edgefed.client.training import LocalTrainer
from edgefed.codecs import make_codec
from edgefed.components import adapter_spec, method_of, task_of
from edgefed.config import RunConfig
from edgefed.data import EncodedExamples
from edgefed.data.fewshot import FewShotExamples
from edgefed.data.rounds import local_steps
from edgefed.devices.planner import Plan
from edgefed.methods import Method, SetupState
from edgefed.models import resolve_model_path
from edgefed.runtimes import RuntimeBuild, Trainer
from edgefed.scope import Scope
from edgefed.split import RemoteBody
from edgefed.tasks.pseudo import PseudoLabels

if TYPE_CHECKING:
    from edgefed.setup import RunSetup

StepHook = Callable[[int, int, float], None]  # (round, client, loss) after each local step


@dataclass
class Worker:
    config: RunConfig
    method: Method
    model: nn.Module
    trainer: LocalTrainer

    def client(
        self,
        index: int,
        examples: EncodedExamples | FewShotExamples,
        plan: Plan | None = None,
        scope: Scope | None = None,
        remote_body: RemoteBody | None = None,
        on_step: StepHook = lambda round_number, client, loss: None,
        trainer: Trainer | None = None,
    ) -> FederatedClient:
        """Client `index` on this worker: its data, its plan (None: the run's settings) and, for split
        learning, its stream to the server's body. A few-shot client (FewShotExamples) trains on its
        labelled examples, pseudo-labels its pool as `pseudo-labels` says, and is scored on its held-out
        slice. `trainer`: what trains it, when not the worker's torch LocalTrainer (another runtime's,
        edgefed/runtimes.py)."""
        config = self.config
        pseudo = holdout = None
        if isinstance(examples, FewShotExamples):
            if config.pseudo_labels != "none":
                pseudo = PseudoLabels(
                    examples.unlabeled, config.pseudo_labels, config.energy_temperature, config.pseudo_weight
                )
            holdout = examples.heldout if len(examples.heldout) else None
            examples = examples.labeled
        batch_size = plan.batch_size if plan else config.batch_size
        steps = local_steps(len(examples), batch_size, config.local_steps, config.local_epochs)
        return FederatedClient(
            index,
            trainer or self.trainer,
            examples,
            steps,
            config.seed,
            make_codec(config.codec),
            on_step,
            plan,
            scope,
            remote_body,
            pseudo,
            holdout,
        )

    def runtime_build(self, tokenizer, folder: Path) -> RuntimeBuild:
        """What a client runtime (edgefed/runtimes.py) builds its trainer or its devices' files from."""
        return RuntimeBuild(self.config, self.model, self.trainer, tokenizer, folder)


def worker_for(setup: RunSetup, device: torch.device) -> Worker:
    """A worker built as a client builds it: from the pre-trained files and the server's setup state."""
    return client_worker(setup.config, setup.num_labels, setup.spec.head_modules, setup.setup, device)


def client_worker(
    config: RunConfig, num_labels: int, head_modules: tuple[str, ...], setup: SetupState, device: torch.device
) -> Worker:
    """`worker_for` from the parts of a setup a child process is given."""
    base, _ = task_of(config).load_model(resolve_model_path(config.model), num_labels)
    return build_worker(config, base, head_modules, device, setup)


def build_worker(
    config: RunConfig,
    base: nn.Module,
    head_modules: tuple[str, ...],
    device: torch.device,
    setup: SetupState | None,
) -> Worker:
    """Adapt the freshly loaded pre-trained model `base` with the server's `setup` (None: adapt it as
    the server adapts its global model, for a worker with no server), fuse its kernels, and give it
    the run's trainer."""
    method = method_of(config)
    spec = adapter_spec(config, method, head_modules)
    model = method.adapt(base, spec, setup) if setup is not None else method.prepare_global(base, spec)[0]
    method.accelerate(model)
    trainer = LocalTrainer(
        model, config.lr_for(method.default_lr), config.batch_size, device, config.max_grad_norm
    )
    return Worker(config, method, model, trainer)
