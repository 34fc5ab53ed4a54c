"""Sequence classification: fine-tuning a classifier on one labelled data set."""

from __future__ import annotations

from edgefed.data import EncodedExamples, LabeledTexts, encode
from edgefed.errors import EdgefedError
from edgefed.tasks.base import TASKS, Task


@TASKS.register("classification")
class SequenceClassification(Task):
    name = "classification"
    family = "sequence-classifier"

    def num_labels(self, train: LabeledTexts, evaluation: LabeledTexts) -> int:
        num_labels = max(max(train.labels), max(evaluation.labels)) + 1
        if num_labels < 2:
            raise EdgefedError(f"{train.source}: every label is 0; classification needs at least two classes")
        return num_labels

    def encode(self, data: LabeledTexts, tokenizer, max_seq_len: int) -> EncodedExamples:
        return encode(data, tokenizer, max_seq_len)
