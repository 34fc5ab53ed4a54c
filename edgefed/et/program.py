"""An ExecuTorch training program for a classifier with adapters, made once per run by the server.

The program takes a batch of a fixed shape (the run's batch size and sequence length: ExecuTorch
programs are exported for static shapes; a client pads its batches to it) and returns the mean
cross-entropy over the rows whose label is not IGNORED, the logits, and the gradients of the adapter
tensors. Two changes to the model, as for ONNX Runtime (edgefed/ort/artifacts.py): dropout is
exported at p = 0, and attention runs eagerly (softmax of q·k), since the backward of PyTorch's
fused scaled-dot-product attention is not a core ATen operator that ExecuTorch can lower.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from edgefed.et import require_executorch

IGNORED = -100  # the label of a padding row: it adds nothing to the loss or the gradients


class TrainingStep(nn.Module):
    """The classifier as the program sees it: a padded batch in, (loss, logits) out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels):
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        loss = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORED)
        return loss, logits.detach()


def training_program(model: nn.Module, trainable: Sequence[str], batch_size: int, seq_len: int) -> bytes:
    """The .pte program that trains `trainable` (names as in model.named_parameters()) of `model` on
    batches of `batch_size` × `seq_len` tokens."""
    require_executorch()
    from executorch.exir import to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    exported = copy.deepcopy(model).cpu().train()
    for module in exported.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        module.__dict__.pop("forward", None)  # edgefed's fused-kernel routing: the class's own forward
    config = getattr(exported, "config", None)
    if config is not None:
        config._attn_implementation = "eager"
    wanted = set(trainable)
    for name, parameter in exported.named_parameters():
        parameter.requires_grad_(name in wanted)
    shape = (batch_size, seq_len)
    # Distinct tensors: export would take one tensor passed twice for one input of the program.
    example = (
        torch.zeros(shape, dtype=torch.long),
        torch.ones(shape, dtype=torch.long),
        torch.zeros(shape, dtype=torch.long),
        torch.zeros(batch_size, dtype=torch.long),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export(TrainingStep(exported), example, strict=False)
        program = _export_forward_backward(program)
        return to_edge(program).to_executorch().buffer
