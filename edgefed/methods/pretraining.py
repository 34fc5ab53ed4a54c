"""What the pre-training methods share: a masked-LM model, saved whole with `save_pretrained`, so the
result loads with `transformers` and is a `--model` for fine-tuning runs."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edgefed.methods.base import AdapterSpec, FullWeightsMethod


class MaskedLMPretraining(FullWeightsMethod):
    task = "masked-lm"
    result_dir = "model"
    # Continued pre-training of a small BERT; the same rate for every pre-training method, so their
    # loss curves compare at equal settings.
    default_lr = 1e-4

    def load(self, out_dir: Path, base_model_path: str, num_labels: int, spec: AdapterSpec) -> nn.Module:
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_pretrained(out_dir, local_files_only=True)
