"""Tokenised examples and the batches cut from them (padded to the longest sequence in the batch)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from edgefed.data.files import LabeledTexts


@dataclass
class EncodedExamples:
    """Token ids (already truncated) and labels of a client's or the evaluation set's examples."""

    input_ids: list[list[int]]
    labels: list[int]
    pad_id: int
    # Per-example loss weights (FewFedWeight's pseudo labels), sent as `example_weights`; None: none.
    weights: list[float] | None = None
    # Tensors every batch carries unchanged (a label-scoring model's encoded label names).
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> EncodedExamples:
        return replace(
            self,
            input_ids=[self.input_ids[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            weights=None if self.weights is None else [self.weights[i] for i in indices],
        )

    def batch(self, indices: list[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The padded batch; `generator` drives any randomness of the batch (masking, for pre-training)."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            sequence = self.input_ids[i]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([self.labels[i] for i in indices]),
            **self.constants,
        }
        if self.weights is not None:
            batch["example_weights"] = torch.tensor([self.weights[i] for i in indices])
        return batch


def encode(data: LabeledTexts, tokenizer, max_seq_len: int) -> EncodedExamples:
    ids = tokenizer(data.texts, truncation=True, max_length=max_seq_len)["input_ids"]
    return EncodedExamples(ids, list(data.labels), tokenizer.pad_token_id or 0)


def shuffled_batches(
    num_examples: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """`steps` batches of indices, walking through fresh permutations (epochs) as often as needed."""
    produced = 0
    while produced < steps:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples, batch_size):
            if produced == steps:
                return
            yield order[start : start + batch_size]
            produced += 1


def ordered_batches(num_examples: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, num_examples, batch_size):
        yield list(range(start, min(start + batch_size, num_examples)))
