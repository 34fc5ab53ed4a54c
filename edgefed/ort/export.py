"""`edgefed export --onnx RUN`: a finished run's model as an ONNX file that ONNX Runtime serves.

The inference package (`onnxruntime`, which has wheels for Linux on ARM, unlike training) runs it on a
device without torch. Inputs: input_ids, attention_mask and token_type_ids, int64 [batch, length].
Outputs: `logits` [batch, num_labels]; an early-exit run (ee-adapter) has one output per exit,
`exit_1` ... `exit_N`, each what that exit answers (its ensembled log-probabilities), so a device picks
its exit as `edgefed predict` does. The file is checked before it is kept: ONNX Runtime's logits on a
batch of the run's own texts must match torch's.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.ee_adapter import EarlyExitModel
from edgefed.ort.artifacts import INPUTS, ORT_IR_VERSION

INFERENCE_OPSET = 17
TOLERANCE = 1e-4  # the largest |ORT − torch| logit the export accepts


class Outputs(nn.Module):
    """The model's answers as a tuple of tensors: its logits, or each exit's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return tuple(output.exit_logits) if isinstance(self.model, EarlyExitModel) else (output.logits,)


def output_names(model: nn.Module) -> list[str]:
    if isinstance(model, EarlyExitModel):
        return [f"exit_{index}" for index in range(1, model.num_layers + 1)]
    return ["logits"]


def export_onnx(
    model: nn.Module, sample: dict[str, torch.Tensor], path: Path, echo: Callable[[str], None] = print
) -> float:
    """Write `model` (eval mode) to `path` and return the largest |ORT − torch| over `sample`'s outputs;
    EdgefedError (and no file) when it exceeds TOLERANCE."""
    import onnx
    import onnxruntime

    wrapper = Outputs(model.cpu()).eval()  # the exporter restores the wrapper's mode on all it holds
    names = output_names(model)
    inputs = tuple(sample[name] for name in INPUTS)
    axes = {name: {0: "batch", 1: "length"} for name in INPUTS} | {name: {0: "batch"} for name in names}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():  # the TorchScript exporter is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            inputs,
            buffer,
            dynamo=False,
            opset_version=INFERENCE_OPSET,
            input_names=list(INPUTS),
            output_names=names,
            dynamic_axes=axes,
        )
        expected = [tensor.numpy() for tensor in wrapper(*inputs)]
    exported = onnx.load_from_string(buffer.getvalue())
    exported.ir_version = min(exported.ir_version, ORT_IR_VERSION)
    serialized = exported.SerializeToString()
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    answers = session.run(names, {name: sample[name].numpy() for name in INPUTS})
    worst = max(float(np.abs(ours - theirs).max()) for ours, theirs in zip(answers, expected, strict=True))
    if worst > TOLERANCE:
        raise EdgefedError(f"the ONNX model's logits differ from torch's by {worst:.2e}; nothing written")
    path.write_bytes(serialized)
    echo(
        f"edgefed: wrote {path} ({len(serialized) / 1e6:.1f} MB, outputs {', '.join(names)}); ONNX Runtime "
        f"matches torch to {worst:.1e} on {len(sample['input_ids'])} of the run's texts"
    )
    return worst
