"""Masked-LM pre-training (FDAPT, FFDAPT, FedBERT): unlabelled text, evaluated by masked-token loss
(edgefed/families/masked_lm.py)."""

from __future__ import annotations

from edgefed.data import LabeledTexts
from edgefed.data.masking import MaskedLMExamples, encode_for_mlm
from edgefed.tasks.base import TASKS, Task


@TASKS.register("masked-lm")
class MaskedLanguageModeling(Task):
    name = "masked-lm"
    family = "masked-lm"
    unlabeled = True

    def num_labels(self, train: LabeledTexts, evaluation: LabeledTexts) -> int:
        return 0

    def encode(self, data: LabeledTexts, tokenizer, max_seq_len: int) -> MaskedLMExamples:
        return encode_for_mlm(data, tokenizer, max_seq_len)
