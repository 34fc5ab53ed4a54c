"""Client runtimes: what trains a client's tensors, behind one `Trainer` protocol.

torch (edgefed's LocalTrainer), ONNX Runtime training artifacts (edgefed/ort) and an ExecuTorch
training program (edgefed/et) are runtimes. A runtime is a package of its own plus one registration:
an entry point in the `edgefed.runtimes` group of pyproject.toml naming its `Runtime` subclass. The
registry reads the names from the installed package's metadata and imports a runtime only when one is
asked for by name, so a device without torch can load the ort runtime, and another package can add a
runtime without touching edgefed.

A runtime declares where its clients can run (`transports`), why it cannot train a given run
(`refusal`), what it needs installed (`require`), the trainer of an in-process client (`trainer`),
and, for a runtime that trains on devices over gRPC, the device side (`device`: a DeviceRuntime,
edgefed/wire/device.py) and the files such a device fetches at setup (`setup_files`, which the server
makes once and hands out by runtime name without knowing any runtime).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from edgefed.errors import EdgefedError
from edgefed.settings import Configurable

if TYPE_CHECKING:  # a torch-free device imports this module
    from torch import nn

    from edgefed.config import RunConfig
    from edgefed.types import ClientUpdate, State

ENTRY_POINTS = "edgefed.runtimes"
# The methods whose adapters the exported-program runtimes (ort, executorch) train.
ADAPTER_METHODS = ("lora", "federa")


class Trainer(Protocol):
    """A client's local round: train from `global_state` on `examples` and return the update.

    `scope`, `exit_layer`, `batch_size`, `pseudo` and `holdout` narrow the round to a device's plan and
    FewFedWeight's pseudo labels (edgefed/client/training.py); runtimes that train whole adapters
    refuse them."""

    def fit(
        self,
        client_id: int,
        global_state: State,
        examples: Any,
        steps: int,
        seed: int,
        on_step: Callable[[float], None] = ...,
        scope: Any = None,
        exit_layer: int | None = None,
        batch_size: int | None = None,
        pseudo: Any = None,
        holdout: Any = None,
    ) -> ClientUpdate: ...


@dataclass(frozen=True)
class RuntimeBuild:
    """What a runtime builds from: the run's settings and a client's model, as a client builds it."""

    config: RunConfig
    model: nn.Module  # adapted with the server's setup state
    torch_trainer: Any  # the worker's own LocalTrainer: its learning rate (`lr`) and device
    tokenizer: Any  # the model's tokenizer (transformers)
    folder: Path  # where the runtime keeps what it makes for the run (<run>/<runtime>)

    @property
    def lr(self) -> float:
        return self.torch_trainer.lr

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


class Runtime(Configurable, ABC):
    name: ClassVar[str]
    # The transports whose clients it can train (inproc, grpc, flower), and how to say it.
    transports: ClassVar[tuple[str, ...]]
    where: ClassVar[str] = ""
    # "module:Class" of its DeviceRuntime, for `edgefed client --runtime NAME` (None: in-process only).
    device: ClassVar[str | None] = None
    # Whether its devices fetch files from the server at setup (`setup_files`).
    fetches_files: ClassVar[bool] = False

    def refusal(self, config: RunConfig, task: str) -> str | None:
        """Why this runtime cannot train the clients of a run so configured, whose method trains for
        `task` (a phrase that starts with the runtime's name), or None."""
        return None

    def require(self) -> None:
        """Raise one clear EdgefedError where what this runtime needs is not installed."""

    @abstractmethod
    def trainer(self, build: RuntimeBuild) -> Trainer:
        """The trainer of an in-process client."""

    def setup_files(self, build: RuntimeBuild) -> bytes:
        """What its devices fetch at setup (`FetchRuntime`), as a payload (with `fetches_files`)."""
        raise EdgefedError(f"runtime {self.name}: its devices fetch no files")

    def device_class(self) -> Callable[..., Any]:
        if self.device is None:
            raise EdgefedError(f"runtime {self.name} trains in-process clients only, not devices")
        module, _, attribute = self.device.partition(":")
        return getattr(importlib.import_module(module), attribute)


class TorchRuntime(Runtime):
    """edgefed's own LocalTrainer (edgefed/client/training.py), which trains every method, plan and exit;
    defined here, with no package of its own, so that a torch-free device can list the runtimes."""

    name = "torch"
    transports = ("inproc", "grpc", "flower")
    where = "in-process clients, client processes and Flower nodes"
    device = "edgefed.transport.torch_device:TorchDevice"

    def trainer(self, build: RuntimeBuild) -> Trainer:
        return build.torch_trainer


def adapter_refusal(name: str, config: RunConfig, task: str) -> str | None:
    """Why a runtime that trains exported adapters (ort, executorch) cannot train this run, or None."""
    if config.method not in ADAPTER_METHODS or task != "classification" or config.tasks:
        return (
            f"{name} trains {' and '.join(ADAPTER_METHODS)} classifiers, not {config.method} "
            f"({task}{', multi-task' if config.tasks else ''})"
        )
    if config.profiles:
        return f"{name} trains the run's whole adapters: no device profiles"
    return None


def check_runtimes(config: RunConfig, task: str) -> None:
    """Each client runtime the run names exists, carries the run's clients and can train them (its
    method trains for `task`)."""
    known = RUNTIMES.names()
    unknown = sorted(set(config.client_runtime) - set(known))
    if not config.client_runtime or unknown:
        raise EdgefedError(f"unknown client-runtime {unknown[:1]}; choose from: {', '.join(known)}")
    for name in sorted(set(config.client_runtime)):
        runtime = RUNTIMES.create(name)
        if config.transport not in runtime.transports:
            raise EdgefedError(
                f"client-runtime {name} runs {runtime.where}: transport {' or '.join(runtime.transports)}"
            )
        refusal = runtime.refusal(config, task)
        if refusal:
            raise EdgefedError(f"client-runtime {refusal}")
        runtime.require()


class RuntimeRegistry:
    """The runtimes registered by the installed packages' entry points, imported when first asked for."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._loaded: dict[str, Runtime] = {}

    def _entry_points(self) -> dict[str, Any]:
        found = {point.name: point for point in entry_points(group=self.group)}
        if not found:
            raise EdgefedError(
                f"no client runtimes are registered ({self.group}): edgefed is not installed; "
                "pip install -e . (or make install)"
            )
        return found

    def names(self) -> list[str]:
        return sorted(self._entry_points())

    def create(self, name: str) -> Runtime:
        if name not in self._loaded:
            points = self._entry_points()
            if name not in points:
                raise EdgefedError(f"unknown runtime '{name}'; choose from: {', '.join(sorted(points))}")
            self._loaded[name] = points[name].load()()
        return self._loaded[name]

    def device_names(self) -> list[str]:
        """The runtimes a device can train with (`edgefed client --runtime`)."""
        return [name for name in self.names() if self.create(name).device is not None]


RUNTIMES = RuntimeRegistry(ENTRY_POINTS)
