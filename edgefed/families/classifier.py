"""Sequence classifiers: a pre-trained encoder with a classification head, evaluated by accuracy and
mean cross-entropy (per exit for early-exit models)."""

from __future__ import annotations

import torch
from torch import nn

from edgefed.data import EncodedExamples, ordered_batches
from edgefed.families.base import FAMILIES, ModelFamily
from edgefed.models import load_classifier
from edgefed.types import Evaluation

EVAL_BATCH_SIZE = 64


@FAMILIES.register("sequence-classifier")
class SequenceClassifier(ModelFamily):
    name = "sequence-classifier"
    peft_task_type = "SEQ_CLS"
    head_modules = ("classifier",)

    def load(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        return load_classifier(model_path, num_labels)

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
