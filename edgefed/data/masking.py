"""Masked-language-model batches: BERT's dynamic masking of 15 % of the tokens (80 % [MASK], 10 % a
random token, 10 % kept), drawn afresh for every training batch and fixed for evaluation batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from edgefed.data.batches import EncodedExamples
from edgefed.data.files import LabeledTexts
from edgefed.errors import EdgefedError

MLM_PROBABILITY = 0.15
IGNORED = -100  # the label of positions that carry no loss (transformers' convention)


@dataclass
class MaskedLMExamples(EncodedExamples):
    """Tokenised text whose batches are masked for MLM; `labels` of a batch are token ids or -100.

    The examples' own `labels` (sentence labels, when the file had them) only shape partitions.
    """

    mask_id: int = 0
    vocab_size: int = 0
    special_ids: tuple[int, ...] = ()

    def batch(self, indices: list[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A masked batch. Without a generator (evaluation) the masks depend only on the batch's
        examples, so every round evaluates the same masked positions."""
        padded = super().batch(indices)
        ids, attention = padded["input_ids"], padded["attention_mask"]
        if generator is None:
            digest = hashlib.sha256(repr(indices).encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        candidates = attention.bool() & ~torch.isin(ids, torch.tensor(self.special_ids, dtype=torch.long))
        draw = torch.rand(ids.shape, generator=generator)
        masked = candidates & (draw < MLM_PROBABILITY)
        # Every sequence with a maskable token gets at least one mask: a batch without any would have
        # no loss (short SST-2 phrases are often 2-3 tokens long).
        unmasked_rows = ~masked.any(dim=1) & candidates.any(dim=1)
        if unmasked_rows.any():
            first = torch.where(candidates, draw, torch.full_like(draw, 2.0)).argmin(dim=1)
            rows = unmasked_rows.nonzero().squeeze(1)
            masked[rows, first[rows]] = True
        action = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[masked & (action < 0.8)] = self.mask_id
        swap = masked & (action >= 0.8) & (action < 0.9)
        inputs[swap] = random_ids[swap]
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORED))
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


def encode_for_mlm(data: LabeledTexts, tokenizer, max_seq_len: int) -> MaskedLMExamples:
    if tokenizer.mask_token_id is None:
        raise EdgefedError("the model's tokenizer has no mask token; masked-LM pre-training needs one")
    ids = tokenizer(data.texts, truncation=True, max_length=max_seq_len)["input_ids"]
    return MaskedLMExamples(
        ids,
        list(data.labels),
        tokenizer.pad_token_id or 0,
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tuple(tokenizer.all_special_ids),
    )
