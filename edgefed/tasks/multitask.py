"""Few-shot multi-task classification: one model scores each input against its task's label names.

Clients hold different tasks, so different label spaces. Instead of a head per task (which FedAvg
would mix across label spaces), the model embeds the input and each of its task's label names (the
lines of the task's labels.txt) with the same encoder — mean pooling over tokens, L2-normalised, as
sentence encoders such as all-MiniLM-L6-v2 are trained — and label c's logit is
SCALE · cos(input, name_c). The encoder's adapter (LoRA or FeDeRA) is the only trainable part and is
shared by every task; nothing ties a tensor to one label space, and a task no client trained on is
scored by the same model (zero-shot, through its label names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgefed.data import EncodedExamples, encode
from edgefed.data.fewshot import (
    FewShotExamples,
    FewShotShard,
    TaskData,
    draw_shards,
    held_out_rows,
    load_task,
    read_shard,
)
from edgefed.errors import EdgefedError
from edgefed.tasks.base import TASKS, DataSettings, Task
from edgefed.types import Evaluation

if TYPE_CHECKING:
    from edgefed.config import RunConfig


@dataclass
class TaskSet:
    """Several tasks; the first `seen` are the ones clients train on (the rest are evaluated only)."""

    tasks: list[TaskData]
    seen: int
    split: str  # "train" or "test": the split `len` counts

    @property
    def source(self) -> str:
        return ", ".join(task.name for task in self.tasks)

    def __len__(self) -> int:
        return sum(len(getattr(task, self.split)) for task in self.tasks)


@dataclass
class TaskExamples:
    name: str
    seen: bool
    examples: EncodedExamples


@TASKS.register("multitask")
class FewShotMultiTask(Task):
    name = "multitask"
    family = "label-scorer"

    def check(self, config: RunConfig) -> None:
        from edgefed.tasks.pseudo import check_pseudo_labels

        check_pseudo_labels(config.pseudo_labels)
        for name, value in (("train-limit", config.train_limit), ("profiles", config.profiles)):
            if value:
                raise EdgefedError(f"{name} does not apply to a multi-task run (--tasks)")
        if not 0 <= config.holdout_shots < config.shots:
            raise EdgefedError(
                f"holdout-shots must be in [0, shots {config.shots}), got {config.holdout_shots}"
            )

    def load_data(self, settings: DataSettings) -> tuple[TaskSet, TaskSet]:
        trained = [load_task(path) for path in settings.tasks]
        evaluated = trained + [load_task(path) for path in settings.eval_tasks]
        names = [task.name for task in evaluated]
        if len(set(names)) < len(names):
            raise EdgefedError(
                f"two task folders share a name ({', '.join(names)}); a task is named by its folder"
            )
        limit = settings.eval_limit
        tested = [
            TaskData(
                task.name,
                task.label_names,
                task.train,
                task.test.subset(list(range(min(limit or len(task.test), len(task.test))))),
            )
            for task in evaluated
        ]
        return TaskSet(trained, len(trained), "train"), TaskSet(tested, len(trained), "test")

    def num_labels(self, train: TaskSet, evaluation: TaskSet) -> int:
        return 0  # no class head: each task's labels are its label names

    def shards(self, train: TaskSet, settings: DataSettings) -> list[FewShotShard]:
        return draw_shards(
            train.tasks,
            settings.clients,
            settings.shots,
            settings.holdout_shots,
            settings.unlabeled_pool,
            settings.seed,
        )

    def write_shard(self, shard: FewShotShard, path):
        return shard.write(path)

    def client_data(self, path: str) -> FewShotShard:
        return read_shard(path)

    def encode_client(
        self, shard: FewShotShard, tokenizer, max_seq_len: int, settings: DataSettings
    ) -> FewShotExamples:
        names = label_names(shard.label_names, tokenizer, max_seq_len)
        labeled = with_names(encode(shard.labeled, tokenizer, max_seq_len), names)
        held = held_out_rows(shard.labeled.labels, settings.holdout_shots)
        kept = sorted(set(range(len(labeled))) - set(held))
        pool = tokenizer(shard.unlabeled, truncation=True, max_length=max_seq_len)["input_ids"]
        unlabeled = EncodedExamples(pool, [0] * len(pool), labeled.pad_id, constants=names)
        return FewShotExamples(labeled.subset(kept), labeled.subset(held), unlabeled)

    def encode(self, data: TaskSet, tokenizer, max_seq_len: int) -> list[TaskExamples]:
        return [
            TaskExamples(
                task.name,
                index < data.seen,
                with_names(
                    encode(task.test, tokenizer, max_seq_len),
                    label_names(task.label_names, tokenizer, max_seq_len),
                ),
            )
            for index, task in enumerate(data.tasks)
        ]

    def evaluate(self, model: nn.Module, examples: list[TaskExamples], device: torch.device) -> Evaluation:
        """`accuracy` and `loss`: the mean over the tasks clients train on (each task counts once,
        whatever its test size); `task_accuracy`: every task's, seen or not."""
        family = self.model_family
        results = {task.name: family.evaluate(model, task.examples, device) for task in examples}
        seen = [results[task.name] for task in examples if task.seen]
        return Evaluation(
            sum(result.accuracy for result in seen) / len(seen),
            sum(result.loss for result in seen) / len(seen),
            task_accuracy={name: result.accuracy for name, result in results.items()},
        )


def label_names(names: list[str], tokenizer, max_seq_len: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(names, truncation=True, max_length=max_seq_len, padding=True, return_tensors="pt")
    return {"label_input_ids": encoded["input_ids"], "label_attention_mask": encoded["attention_mask"]}


def with_names(examples: EncodedExamples, names: dict[str, torch.Tensor]) -> EncodedExamples:
    examples.constants = names
    return examples
