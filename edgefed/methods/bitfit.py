"""BitFit (Ben Zaken et al., 2022): only the bias terms (and the new classification head) train."""

from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import METHODS, AdapterSpec, FullWeightsMethod, SetupState, in_modules


@METHODS.register("bitfit")
class BitFit(FullWeightsMethod):
    name = "bitfit"
    default_lr = 5e-3
    trains_decoders = True

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        return name.endswith(".bias") or in_modules(name, spec.head_modules)

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        model = super().adapt(model, spec, setup)
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise EdgefedError(
                f"bitfit: this {type(model).__name__} has no bias terms (Llama-style models have none), so "
                "nothing would train; use lora, or a model with biases (Qwen2, GPT-2)"
            )
        return model
