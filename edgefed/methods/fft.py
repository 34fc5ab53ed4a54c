"""Full fine-tuning (FFT): every parameter trains and travels — the baseline the papers time against."""

from edgefed.methods.base import METHODS, AdapterSpec, FullWeightsMethod


@METHODS.register("fft")
class FullFineTuning(FullWeightsMethod):
    name = "fft"
    default_lr = 5e-5
    trains_decoders = True

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        return True
