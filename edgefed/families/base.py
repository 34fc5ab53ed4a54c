"""The `ModelFamily` interface: what a model is — a sequence classifier, a label scorer, a masked
language model — how it is loaded with its head, how it is evaluated, what peft calls it, and what its
evaluation's figures are called.

A task (edgefed/tasks/) says what a run trains for and on which data; it names the family of model
that does it, and everything that depends on the kind of model (loading, adapting, evaluating,
reporting) asks the family instead of branching on the task or the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgefed.registry import Registry
from edgefed.settings import Configurable
from edgefed.types import Evaluation


@dataclass(frozen=True)
class CurveMetrics:
    """How a family's figures are named in the console table and which one its curves plot."""

    accuracy: str  # the console column of Evaluation.accuracy
    loss: str  # ... and of Evaluation.loss
    plots_loss: bool = False  # the curves plot the loss (a language model), not the accuracy
    curve_label: str = "evaluation accuracy"


class ModelFamily(Configurable, ABC):
    name: ClassVar[str]
    # peft's TaskType for adapters on this kind of model (None: peft's generic wrapper).
    peft_task_type: ClassVar[str | None] = None
    # What trains as the head when the checkpoint lacked no module (a fine-tuned classifier's own).
    head_modules: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[CurveMetrics] = CurveMetrics("accuracy", "eval loss")
    # What LoRA and FeDeRA adapt where the run names no target modules (peft matches name suffixes).
    target_modules: ClassVar[tuple[str, ...]] = ("query", "value")

    @abstractmethod
    def load(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        """The pre-trained model with this family's head, and the modules the checkpoint lacked."""

    @abstractmethod
    def evaluate(self, model: nn.Module, examples: Any, device: torch.device) -> Evaluation:
        """The model on encoded evaluation examples."""


FAMILIES: Registry[ModelFamily] = Registry("model family")
