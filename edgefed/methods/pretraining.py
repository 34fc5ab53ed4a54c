"""What the pre-training methods share: a masked-LM model, saved whole with `save_pretrained`, so the
result loads with `transformers` and is a `--model` for fine-tuning runs."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edgefed.methods.base import AdapterSpec, FullWeightsMethod, SetupState, freeze_all_but


class MaskedLMPretraining(FullWeightsMethod):
    task = "masked-lm"
    result_dir = "model"
    # Continued pre-training of a small BERT; the same rate for every pre-training method, so their
    # loss curves compare at equal settings.
    default_lr = 1e-4

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        # The checkpoint's pooler (edgefed/models.py) gets no MLM gradient: it neither trains nor travels.
        return freeze_all_but(
            model, lambda name: ".pooler." not in f".{name}" and self.is_trainable(name, spec)
        )

    def load(self, out_dir: Path, base: nn.Module, spec: AdapterSpec) -> nn.Module:
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_pretrained(out_dir, local_files_only=True)
