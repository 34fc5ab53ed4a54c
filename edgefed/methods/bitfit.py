"""BitFit (Ben Zaken et al., 2022): only the bias terms (and the new classification head) train."""

from edgefed.methods.base import METHODS, AdapterSpec, FullWeightsMethod, in_modules


@METHODS.register("bitfit")
class BitFit(FullWeightsMethod):
    name = "bitfit"
    default_lr = 5e-3

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        return name.endswith(".bias") or in_modules(name, spec.head_modules)
