"""FDAPT and FFDAPT (Jiang, Svoboda and Lane, arXiv 2307.06933): federated domain-adaptive pre-training.

Every client continues the model's own masked-LM pre-training on its unlabelled in-domain text and
the server averages the models (FedAvg). FFDAPT freezes part of the model to save client compute;
frozen tensors neither train nor travel, and backward stops at the lowest trained layer.

The paper leaves the frozen set open. The default, `embeddings,layers:0`, freezes
the embeddings (the largest share of a small BERT: 52 % of MiniLM, including the MLM decoder, which
is tied to the word embeddings) and the first encoder layer (general features). With the embeddings
frozen the vocabulary-sized weight gradient of the decoder is never formed, and no backward runs
through layer 0: on a 6-layer model that is the order of the paper's 12.1 % saving.
"""

from __future__ import annotations

import re

from torch import nn

from edgefed.methods.base import METHODS, AdapterSpec, SetupState
from edgefed.methods.pretraining import MaskedLMPretraining
from edgefed.methods.settings import FreezeSettings, frozen_set

LAYER_NAME = re.compile(r"\.layer\.(\d+)\.")


@METHODS.register("fdapt")
class FDAPT(MaskedLMPretraining):
    name = "fdapt"

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        return True


@METHODS.register("ffdapt")
class FFDAPT(MaskedLMPretraining):
    name = "ffdapt"
    settings_type = FreezeSettings

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        frozen_set(spec.freeze, model.config.num_hidden_layers)  # fits this model?
        return super().adapt(model, spec, setup)

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        embeddings, layers = frozen_set(spec.freeze)
        if embeddings and ".embeddings." in f".{name}":
            return False
        layer = LAYER_NAME.search(name)
        return layer is None or int(layer.group(1)) not in layers
