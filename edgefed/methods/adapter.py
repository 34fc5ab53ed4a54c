"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after each sub-layer's output projection.

Each transformer layer gets two adapters, after the attention output projection and after the FFN
output projection, before the residual add and LayerNorm: h ← h + U·GELU(D·h), with D: d → m and
U: m → d. U starts at zero, so the adapted model computes what the pre-trained one does. As in
Houlsby et al., the LayerNorms train too. The bottleneck width m is `--rank`.

peft has no bottleneck adapter, so the result is saved as the trained tensors (safetensors) plus
`adapter.json`; `edgefed.load_trained(run_dir)` rebuilds the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import (
    METHODS,
    AdapterSpec,
    Method,
    SetupState,
    freeze_all_but,
    in_modules,
    load_trainable_state,
    trainable_state,
)
from edgefed.methods.settings import BottleneckSettings

# BERT, RoBERTa and DeBERTa name their sub-layer output projections like this.
OUTPUT_PROJECTION = re.compile(r"layer\.\d+\.(attention\.output|output)\.dense$")
STATE_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter.json"


class BottleneckAdapter(nn.Module):
    """Wraps a Linear: y = dense(x); y + up(GELU(down(y)))."""

    def __init__(self, dense: nn.Linear, width: int) -> None:
        super().__init__()
        self.dense = dense
        self.down = nn.Linear(dense.out_features, width)
        self.up = nn.Linear(width, dense.out_features)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dense(x)
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


@METHODS.register("adapter")
class BottleneckAdapters(Method):
    name = "adapter"
    default_lr = 2e-3
    settings_type = BottleneckSettings

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        targets = [name for name, module in model.named_modules() if OUTPUT_PROJECTION.search(name)]
        if not targets:
            raise EdgefedError(
                "the model has no layer.N.attention.output.dense / layer.N.output.dense to adapt"
            )
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, BottleneckAdapter(getattr(parent, child), spec.rank))
        return freeze_all_but(
            model,
            lambda name: (
                ".down." in name
                or ".up." in name
                or "LayerNorm" in name
                or in_modules(name, spec.head_modules)
            ),
        )

    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, out_dir / STATE_FILE)
        (out_dir / CONFIG_FILE).write_text(
            json.dumps(
                {"method": self.name, "bottleneck": spec.rank, "head_modules": list(spec.head_modules)}
            )
        )

    def load(self, out_dir: Path, base: nn.Module, spec: AdapterSpec) -> nn.Module:
        model = self.adapt(base, spec, {})
        load_trainable_state(model, load_file(out_dir / STATE_FILE))
        return model
