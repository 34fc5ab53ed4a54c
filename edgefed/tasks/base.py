"""The `Task` interface: what a run trains for, from its data files to the evaluation of the global model.

A task reads the data and cuts each client's shard from it, writes and reads a shard as a client's
files, and encodes shards and the evaluation set; the family of model it trains (edgefed/families/)
loads the model with its head and evaluates it. Everything else in a round (clients, wire,
aggregation) is shared.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from edgefed.data import LabeledTexts, load_splits, partition
from edgefed.data.splits import load_train
from edgefed.errors import EdgefedError
from edgefed.families import FAMILIES, ModelFamily
from edgefed.registry import Registry
from edgefed.settings import Configurable
from edgefed.types import Evaluation

if TYPE_CHECKING:
    from edgefed.config import RunConfig

TASKS: Registry[Task] = Registry("task")


@dataclass(frozen=True)
class DataSettings:
    """The run settings a task reads its data with (RunConfig.data_settings)."""

    data: str | None
    seed: int
    clients: int
    partition: str
    train_limit: int | None = None
    eval_limit: int | None = None
    tasks: tuple[str, ...] = ()
    eval_tasks: tuple[str, ...] = ()
    shots: int = 16
    holdout_shots: int = 4
    unlabeled_pool: int = 256
    prompt_template: str = "{text}"


class Task(Configurable, ABC):
    """A task on one data set (a folder or a file) split across clients by `partition`; the multi-task
    task overrides how data is read and shared out."""

    name: ClassVar[str]
    # The kind of model that does it (FAMILIES): how it is loaded, evaluated and reported.
    family: ClassVar[str]
    # Pre-training: reads unlabelled text (`.txt`, one document per line) as well.
    unlabeled: ClassVar[bool] = False

    @property
    def model_family(self) -> ModelFamily:
        return FAMILIES.create(self.family)

    def check(self, config: RunConfig) -> None:
        """Refuse, in one line, settings this task does not take: those of few-shot multi-task runs."""
        from edgefed.tasks.pseudo import check_pseudo_labels

        check_pseudo_labels(config.pseudo_labels)
        needs = {
            "eval-tasks": bool(config.eval_tasks),
            f"pseudo-labels {config.pseudo_labels}": config.pseudo_labels != "none",
        }
        for what, set_ in needs.items():
            if set_:
                raise EdgefedError(f"{what} needs a few-shot multi-task run: set --tasks")

    def load_model(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        """The pre-trained model with its family's head, and the modules the checkpoint lacked."""
        return self.model_family.load(model_path, num_labels)

    def load_data(self, settings: DataSettings) -> tuple[Any, Any]:
        """(training data, evaluation data), each with `len` and a `source`."""
        train, evaluation = load_splits(settings.data, settings.seed, unlabeled=self.unlabeled)
        train = train.subset(list(range(min(settings.train_limit or len(train), len(train)))))
        evaluation = evaluation.subset(
            list(range(min(settings.eval_limit or len(evaluation), len(evaluation))))
        )
        return train, evaluation

    @abstractmethod
    def num_labels(self, train: Any, evaluation: Any) -> int:
        """Classes of the head (0: the task has no class labels)."""

    def shards(self, train: LabeledTexts, settings: DataSettings) -> list[Any]:
        """Each client's part of the training data, in client order."""
        parts = partition(train.labels, settings.clients, settings.partition, settings.seed)
        return [train.subset(part) for part in parts]

    def write_shard(self, shard: LabeledTexts, path: Path) -> Path:
        """A client's shard as the files `client_data` reads (a JSONL file at `path`.jsonl)."""
        path = path.with_suffix(".jsonl")
        with path.open("w", encoding="utf-8") as handle:
            for text, label in zip(shard.texts, shard.labels, strict=True):
                handle.write(json.dumps({"text": text, "label": label}) + "\n")
        return path

    def client_data(self, path: str) -> Any:
        """A client's own data, read from its files."""
        return load_train(path, unlabeled=self.unlabeled)

    def encode_client(self, shard: Any, tokenizer, max_seq_len: int, settings: DataSettings) -> Any:
        """A client's shard, tokenised for its trainer."""
        return self.encode(shard, tokenizer, max_seq_len)

    @abstractmethod
    def encode(self, data: Any, tokenizer, max_seq_len: int) -> Any:
        """The evaluation data (and, for single-set tasks, a client's shard), tokenised."""

    def evaluate(self, model: nn.Module, examples: Any, device: torch.device) -> Evaluation:
        """The global model on the encoded evaluation set, as its family evaluates it."""
        return self.model_family.evaluate(model, examples, device)
