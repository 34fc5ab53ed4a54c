"""Sequence classification: fine-tuning a classifier on one labelled data set."""

from __future__ import annotations

import torch
from torch import nn

from edgefed.data import EncodedExamples, LabeledTexts, encode, ordered_batches
from edgefed.errors import EdgefedError
from edgefed.models import load_classifier
from edgefed.tasks.base import TASKS, Task
from edgefed.types import Evaluation

EVAL_BATCH_SIZE = 64


@TASKS.register("classification")
class SequenceClassification(Task):
    name = "classification"

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
