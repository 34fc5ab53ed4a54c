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
from typing import TYPE_CHECKING

from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import METHODS, AdapterSpec, SetupState
from edgefed.methods.pretraining import MaskedLMPretraining

if TYPE_CHECKING:
    from edgefed.config import RunConfig

LAYER_RANGE = re.compile(r"layers:(\d+)(?:-(\d+))?")
LAYER_NAME = re.compile(r"\.layer\.(\d+)\.")


@METHODS.register("fdapt")
class FDAPT(MaskedLMPretraining):
    name = "fdapt"

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        return True


@METHODS.register("ffdapt")
class FFDAPT(MaskedLMPretraining):
    name = "ffdapt"

    def check(self, config: RunConfig) -> None:
        super().check(config)
        frozen_set(config.freeze)

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        frozen_set(spec.freeze, model.config.num_hidden_layers)  # fits this model?
        return super().adapt(model, spec, setup)

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        embeddings, layers = frozen_set(spec.freeze)
        if embeddings and ".embeddings." in f".{name}":
            return False
        layer = LAYER_NAME.search(name)
        return layer is None or int(layer.group(1)) not in layers


def frozen_set(items: tuple[str, ...], num_layers: int | None = None) -> tuple[bool, set[int]]:
    """(embeddings frozen, frozen encoder layers) from `embeddings`, `layers:<i>` and `layers:<i>-<j>`;
    with `num_layers`, checked against a model of that depth."""
    embeddings, layers = False, set()
    for item in items:
        match = LAYER_RANGE.fullmatch(item)
        if item == "embeddings":
            embeddings = True
        elif match:
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if first > last or (num_layers is not None and last >= num_layers):
                raise EdgefedError(
                    f"freeze '{item}': not a range of this model's layers (0-{(num_layers or 1) - 1})"
                )
            layers.update(range(first, last + 1))
        else:
            raise EdgefedError(
                f"freeze '{item}': expected embeddings, layers:<i> or layers:<i>-<j> "
                "(e.g. embeddings,layers:0)"
            )
    if embeddings and num_layers is not None and len(layers) == num_layers:
        raise EdgefedError("freeze leaves only the MLM head to train; unfreeze at least one layer")
    return embeddings, layers
