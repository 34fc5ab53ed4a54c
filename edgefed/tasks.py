"""What a run trains for: sequence classification (fine-tuning) or masked-LM pre-training.

A method names its task; the task loads the model with the right head, reads and encodes the data,
and evaluates the global model. Everything else in a round (clients, wire, aggregation) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from edgefed.data import EncodedExamples, LabeledTexts, encode, load_splits, ordered_batches
from edgefed.data.masking import IGNORED, encode_for_mlm
from edgefed.data.splits import load_train
from edgefed.errors import EdgefedError
from edgefed.models import load_classifier, load_masked_lm
from edgefed.registry import Registry
from edgefed.types import Evaluation

TASKS: Registry[Task] = Registry("task")
# Masked-LM logits are [batch, length, vocabulary]: 30k floats per token, so evaluate in small batches.
MLM_EVAL_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 64


class Task(ABC):
    name: ClassVar[str]
    # Pre-training: reads unlabelled text (`.txt`, one document per line) as well, and reports the MLM
    # loss (tables, plots) with `accuracy` the masked-token accuracy.
    unlabeled: ClassVar[bool]

    @abstractmethod
    def load_model(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        """The pre-trained model with this task's head, and the modules the checkpoint lacked."""

    def splits(self, data: str | None, seed: int) -> tuple[LabeledTexts, LabeledTexts]:
        return load_splits(data, seed, unlabeled=self.unlabeled)

    def client_data(self, data: str) -> LabeledTexts:
        return load_train(data, unlabeled=self.unlabeled)

    @abstractmethod
    def num_labels(self, train: LabeledTexts, evaluation: LabeledTexts) -> int:
        """Classes of the head (0: the task has no class labels)."""

    @abstractmethod
    def encode(self, data: LabeledTexts, tokenizer, max_seq_len: int) -> EncodedExamples: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, examples: EncodedExamples, device: torch.device) -> Evaluation: ...


@TASKS.register("classification")
class SequenceClassification(Task):
    name = "classification"
    unlabeled = False

    def load_model(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        return load_classifier(model_path, num_labels)

    def num_labels(self, train: LabeledTexts, evaluation: LabeledTexts) -> int:
        num_labels = max(max(train.labels), max(evaluation.labels)) + 1
        if num_labels < 2:
            raise EdgefedError(f"{train.source}: every label is 0; classification needs at least two classes")
        return num_labels

    def encode(self, data: LabeledTexts, tokenizer, max_seq_len: int) -> EncodedExamples:
        return encode(data, tokenizer, max_seq_len)

    def evaluate(self, model: nn.Module, examples: EncodedExamples, device: torch.device) -> Evaluation:
        return evaluate_classifier(model, examples, device)


@TASKS.register("masked-lm")
class MaskedLanguageModeling(Task):
    """Masked-LM pre-training: `loss` is the mean cross-entropy over masked tokens (`mlm_loss` in
    metrics.jsonl) and `accuracy` the share of masked tokens predicted exactly."""

    name = "masked-lm"
    unlabeled = True

    def load_model(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        return load_masked_lm(model_path)

    def num_labels(self, train: LabeledTexts, evaluation: LabeledTexts) -> int:
        return 0

    def encode(self, data: LabeledTexts, tokenizer, max_seq_len: int) -> EncodedExamples:
        return encode_for_mlm(data, tokenizer, max_seq_len)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: EncodedExamples, device: torch.device) -> Evaluation:
        model.eval()
        by_length = sorted(range(len(examples)), key=lambda i: len(examples.input_ids[i]))
        loss_sum, correct, masked = 0.0, 0, 0
        for positions in ordered_batches(len(examples), MLM_EVAL_BATCH_SIZE):
            batch = examples.batch([by_length[position] for position in positions])
            batch = {key: value.to(device) for key, value in batch.items()}
            output = model(**batch)
            scored = batch["labels"] != IGNORED
            count = int(scored.sum())
            loss_sum += output.loss.item() * count
            correct += int((output.logits.argmax(dim=-1)[scored] == batch["labels"][scored]).sum())
            masked += count
        return Evaluation(correct / masked, loss_sum / masked, mlm_loss=loss_sum / masked)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, examples: EncodedExamples, device: torch.device) -> Evaluation:
    """Accuracy and mean cross-entropy over all examples (and per exit, for early-exit models)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    exit_correct: list[int] = []
    # Length-sorted batches pad less; the order does not change the metrics.
    by_length = sorted(range(len(examples)), key=lambda i: len(examples.input_ids[i]))
    for positions in ordered_batches(len(examples), EVAL_BATCH_SIZE):
        indices = [by_length[position] for position in positions]
        batch = {key: value.to(device) for key, value in examples.batch(indices).items()}
        output = model(**batch)
        loss_sum += output.loss.item() * len(indices)
        correct += (output.logits.argmax(dim=-1) == batch["labels"]).sum().item()
        for exit_index, logits in enumerate(getattr(output, "exit_logits", None) or ()):
            if exit_index == len(exit_correct):
                exit_correct.append(0)
            exit_correct[exit_index] += (logits.argmax(dim=-1) == batch["labels"]).sum().item()
    exits = [count / len(examples) for count in exit_correct] or None
    return Evaluation(correct / len(examples), loss_sum / len(examples), exits)
