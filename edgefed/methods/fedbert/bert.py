"""FedBERT's surgery on a BERT masked-LM model: the body (encoder stack) as a module of its own, and the
client's model, which keeps the embeddings and the MLM head around a body that runs elsewhere."""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import MaskedLMOutput

from edgefed.errors import EdgefedError


class BertBody(nn.Module):
    """A BERT encoder stack as a body: (embedding output, attention mask [batch, seq] of 1s and 0s or
    None) → last hidden state. Its parameter names are the BertModel's (`encoder.layer.0...`)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.config = bert.config
        self.encoder = bert.encoder

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # As BertModel does in transformers 5: the 4-D mask for the configured attention implementation
        # (None under sdpa when nothing is padded); BertEncoder takes it as it is.
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        return self.encoder(hidden_states, attention_mask=mask).last_hidden_state


class UnattachedBody(nn.Module):
    """Where a split client's body goes until its transport attaches a RemoteBody."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> NoReturn:
        raise EdgefedError("this split model's body runs on a server: attach a RemoteBody first")


class BertMaskedLMClient(nn.Module):
    """The client's side of FedBERT's layout: a BertForMaskedLM's embeddings and MLM head around a body
    (a RemoteBody, or a BertBody to run it whole). The MLM decoder's weight stays tied to the word
    embeddings, both on the client. Parameter names are the BertForMaskedLM's (`bert.embeddings.*`,
    `cls.*`), so the client part's state matches the whole model's."""

    def __init__(self, model: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.bert = nn.ModuleDict({"embeddings": model.bert.embeddings})
        self.body = body
        self.cls = model.cls
        self.config = model.config
        self.vocab_size = model.config.vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        embedded = self.bert["embeddings"](input_ids=input_ids, token_type_ids=token_type_ids)
        logits = self.cls(self.body(embedded, attention_mask))
        loss = None
        if labels is not None:  # BertForMaskedLM's loss: mean cross-entropy over labels other than -100
            loss = nn.functional.cross_entropy(logits.view(-1, self.vocab_size).float(), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits)
