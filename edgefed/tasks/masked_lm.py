"""Masked-LM pre-training (FDAPT, FFDAPT, FedBERT): unlabelled text, evaluated by masked-token loss."""

from __future__ import annotations

import torch
from torch import nn

from edgefed.data import LabeledTexts, ordered_batches
from edgefed.data.masking import IGNORED, MaskedLMExamples, encode_for_mlm
from edgefed.models import load_masked_lm
from edgefed.tasks.base import TASKS, Task
from edgefed.types import Evaluation

# Masked-LM logits are [batch, length, vocabulary]: 30k floats per token, so evaluate in small batches.
MLM_EVAL_BATCH_SIZE = 16


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

    def encode(self, data: LabeledTexts, tokenizer, max_seq_len: int) -> MaskedLMExamples:
        return encode_for_mlm(data, tokenizer, max_seq_len)

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
