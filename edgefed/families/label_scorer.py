"""Label scorers: a sentence encoder that classifies by comparing an input with the names of its task's
labels (few-shot multi-task runs, edgefed/tasks/multitask.py). It has no head of its own, so FedAvg
never mixes label spaces and a task no client trained on is scored by the same model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from edgefed.data import EncodedExamples
from edgefed.families.base import FAMILIES, ModelFamily
from edgefed.families.classifier import evaluate_classifier
from edgefed.models import load_encoder
from edgefed.types import Evaluation

# Cosine similarities in [-1, 1] become logits at temperature 0.05, the contrastive training
# temperature of sentence encoders (SimCSE, Sentence-BERT's MultipleNegativesRankingLoss).
SCALE = 20.0


class LabelScorer(nn.Module):
    """A sentence encoder that classifies by comparing an input with the names of its task's labels.

    Every batch carries the label names (`label_input_ids`, `label_attention_mask`) of its task;
    `example_weights` (FewFedWeight's energy weights of pseudo labels) weigh each example's loss.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # the cost model reads the encoder's shape

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        label_input_ids: torch.Tensor,
        label_attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        example_weights: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        names = self.embed(label_input_ids, label_attention_mask)
        logits = SCALE * self.embed(input_ids, attention_mask) @ names.T
        loss = None
        if labels is not None:
            losses = F.cross_entropy(logits, labels, reduction="none")
            loss = (losses * example_weights).mean() if example_weights is not None else losses.mean()
        return SequenceClassifierOutput(loss=loss, logits=logits)


@FAMILIES.register("label-scorer")
class LabelScorers(ModelFamily):
    name = "label-scorer"

    def load(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        encoder, missing = load_encoder(model_path)
        return LabelScorer(encoder), [f"encoder.{module}" for module in missing]

    def evaluate(self, model: nn.Module, examples: EncodedExamples, device: torch.device) -> Evaluation:
        """One task's examples, each batch carrying its label names."""
        return evaluate_classifier(model, examples, device)
