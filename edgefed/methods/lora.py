"""LoRA (Hu et al., 2021) through peft: y = W·x + s·B·A·x on the target modules; B starts at zero."""

from __future__ import annotations

import types
from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import METHODS, AdapterSpec, LowRankPair, Method, SetupState
from edgefed.methods.settings import LowRankSettings

ADAPTER_NAME = "default"


@METHODS.register("lora")
class LoRA(Method):
    name = "lora"
    default_lr = 3e-3
    multitask = True
    trains_decoders = True
    settings_type = LowRankSettings

    def accelerate(self, model: nn.Module) -> None:
        if self.settings.fused_kernels:
            use_fused_kernels(model)

    def lora_config(self, spec: AdapterSpec) -> LoraConfig:
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.target_modules),
            modules_to_save=list(spec.head_modules),
            lora_dropout=0.0,
            task_type=TaskType[spec.peft_task_type] if spec.peft_task_type else None,
        )

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        try:
            return get_peft_model(model, self.lora_config(spec))
        except ValueError as error:  # peft's message names the modules it could not find
            raise EdgefedError(f"--target-modules {','.join(spec.target_modules)}: {error}") from None

    def low_rank_pairs(self, model: nn.Module) -> list[LowRankPair]:
        return [
            LowRankPair(
                a=f"{name}.lora_A.{ADAPTER_NAME}.weight",
                b=f"{name}.lora_B.{ADAPTER_NAME}.weight",
                scale=float(layer.scaling[ADAPTER_NAME]),
            )
            for name, layer in lora_layers(model)
        ]

    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    def load(self, out_dir: Path, base: nn.Module, spec: AdapterSpec) -> nn.Module:
        return PeftModel.from_pretrained(base, out_dir)


def use_fused_kernels(model: nn.Module, backend: str = "auto") -> int:
    """Route each peft LoRA Linear through `edgefed.kernels.lora_linear` (fused Triton on CUDA).

    Falls back to peft's own forward wherever the fused kernel does not apply (CPU tensors with
    backend "auto", adapter dropout, DoRA, merged or several active adapters). Returns the number
    of layers routed.
    """
    from peft.tuners.lora import Linear as LoraLinear

    routed = 0
    for _, layer in lora_layers(model):
        if isinstance(layer, LoraLinear):
            # A method bound to the layer, not a closure over it: copy.deepcopy rebinds a bound method
            # to the copy, so a copied model computes with its own weights.
            layer.fused_backend = backend
            layer.forward = types.MethodType(_fused_forward, layer)
            routed += 1
    return routed


def _fused_forward(layer, x, *args, **kwargs):
    from edgefed.kernels import lora_linear

    name, backend = ADAPTER_NAME, layer.fused_backend
    applies = (
        (x.is_cuda or backend == "triton")
        and not args
        and not kwargs
        and not layer.disable_adapters
        and not layer.merged
        and list(layer.active_adapters) == [name]
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and not layer.use_dora.get(name, False)
    )
    if not applies:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.get_base_layer()
    return lora_linear(
        x,
        base.weight,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        layer.scaling[name],
        base.bias,
        backend=backend,
    )


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    ]
