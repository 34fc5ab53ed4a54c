"""ONNX Runtime training artifacts for a classifier with adapters, made once per run by the server.

The model (adapters included; FeDeRA's residual base weights are ordinary frozen weights by then) is
exported with torch's TorchScript exporter at opset 15 in training mode: LayerNorm stays decomposed,
which ORT's training graph builder fuses back with the outputs its gradient needs, where the newer
exporter's LayerNormalization node lacks them. Dropout is exported at p = 0: a Dropout node that
scaled-dot-product attention leaves without its mask output has no gradient in ORT, and a device's
ORT round must compute what a torch round computes. The onnx package writes IR version 14, ORT 1.19
reads at most 10, and nothing here needs more, so the files are stamped 10.

Artifacts: the training model (loss and gradients of the adapter tensors), the eval model and the
checkpoint (every parameter). The optimizer is not an artifact: the device applies torch's update
rule itself (edgefed/ort/trainer.py).
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.ort import require_onnxruntime_training
from edgefed.ort.trainer import ARTIFACT_FILES, EVAL_MODEL, PARAMETER_PREFIX, TRAINING_MODEL

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 15
ORT_IR_VERSION = 10
GENERATE_LOG = "generate.log"


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """The process's stderr (file descriptor 2) into `path` for the block. ORT's gradient-graph builder
    logs every graph rewrite there at info level, whatever its logger severity says; the log is kept
    beside the artifacts. (Another thread's stderr in those seconds lands there too.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("wb") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class Logits(nn.Module):
    """The classifier as ONNX sees it: token ids, mask and segment ids in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # attribute name = PARAMETER_PREFIX without its dot

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def write_artifacts(model: nn.Module, trainable: Sequence[str], folder: Path) -> dict[str, bytes]:
    """Export `model` and generate its training artifacts in `folder`; returns them by file name.
    `trainable`: the names (as in model.named_parameters()) of the tensors a client trains."""
    require_onnxruntime_training()  # and quiets ONNX Runtime's log
    try:
        import onnx
    except ImportError:
        raise EdgefedError(
            "making ONNX Runtime training artifacts needs onnx: pip install 'edgefed[onnx]'"
        ) from None
    from onnxruntime.training import artifacts

    exported = copy.deepcopy(model).cpu()
    for module in exported.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # A forward set on the instance (edgefed's fused-kernel routing) is a closure over the original
        # module, which deepcopy does not copy: the export runs each module's own class forward.
        module.__dict__.pop("forward", None)
    wrapper = Logits(exported).train()
    example = torch.zeros(2, 8, dtype=torch.long)
    axes = {name: {0: "batch", 1: "length"} for name in INPUTS} | {"logits": {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of dynamo's
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example, torch.ones_like(example), example),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            export_params=True,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING,
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_axes=axes,
        )
    exported_model = onnx.load_from_string(buffer.getvalue())
    exported_model.ir_version = ORT_IR_VERSION
    names = [initializer.name for initializer in exported_model.graph.initializer]
    wanted = {PARAMETER_PREFIX + name for name in trainable}
    missing = sorted(wanted - set(names))
    if missing:
        raise ValueError(f"the exported graph lost trainable tensors: {missing[:3]}")
    folder.mkdir(parents=True, exist_ok=True)
    with stderr_to(folder / GENERATE_LOG):
        artifacts.generate_artifacts(
            exported_model,
            requires_grad=[name for name in names if name in wanted],
            frozen_params=[name for name in names if name not in wanted],
            loss=artifacts.LossType.CrossEntropyLoss,
            artifact_directory=str(folder),
        )
    for name in (TRAINING_MODEL, EVAL_MODEL):
        stamped = onnx.load(str(folder / name))
        stamped.ir_version = ORT_IR_VERSION
        onnx.save(stamped, str(folder / name))
    return {name: (folder / name).read_bytes() for name in ARTIFACT_FILES}
