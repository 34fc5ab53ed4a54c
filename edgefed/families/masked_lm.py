"""Masked language models (pre-training: FDAPT, FFDAPT, FedBERT): `loss` is the mean cross-entropy over
masked tokens (`mlm_loss` in metrics.jsonl) and `accuracy` the share of masked tokens predicted exactly."""

from __future__ import annotations

import torch
from torch import nn

from edgefed.data import ordered_batches
from edgefed.data.masking import IGNORED, MaskedLMExamples
from edgefed.families.base import FAMILIES, CurveMetrics, ModelFamily
from edgefed.models import load_masked_lm
from edgefed.types import Evaluation

# Masked-LM logits are [batch, length, vocabulary]: 30k floats per token, so evaluate in small batches.
MLM_EVAL_BATCH_SIZE = 16


@FAMILIES.register("masked-lm")
class MaskedLanguageModel(ModelFamily):
    name = "masked-lm"
    metrics = CurveMetrics("mask acc", "mlm loss", plots_loss=True, curve_label="evaluation MLM loss")

    def load(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        return load_masked_lm(model_path)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: MaskedLMExamples, device: torch.device) -> Evaluation:
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
