"""FedBERT (Tian et al., ACM TIST 2022, DOI 10.1145/3510033): federated split-learning pre-training.

A client holds only the model's ends — the embeddings and the masked-LM head, whose decoder stays
tied to the word embeddings as the model ties them — and the server holds the transformer body.
Per micro-batch the client sends the embedding output over the Split stream, the server returns the
body's output, the client sends the gradient there and the server, after one step of the body's
optimizer, returns the gradient at the embedding output (edgefed/split/). Token ids and labels never
leave the client. Each round the client parts are averaged (FedAvg); how the body trains across
clients is the strategy (edgefed/split/body.py): `sequential` (one body, clients take turns) or
`parallel` (a copy per client, averaged at the end of the round).

The server's global model is the whole masked-LM model with its body frozen to the federation: the
federated state is the client part only, and the server copies the trained body in after each round
so that it evaluates and saves the whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import METHODS, AdapterSpec, SetupState
from edgefed.methods.fedbert.bert import BertMaskedLMClient, UnattachedBody
from edgefed.methods.pretraining import MaskedLMPretraining
from edgefed.methods.settings import SplitSettings

if TYPE_CHECKING:
    from edgefed.config import RunConfig


@METHODS.register("fedbert")
class FedBERT(MaskedLMPretraining):
    name = "fedbert"
    splits_model = True
    settings_type = SplitSettings

    def check(self, config: RunConfig) -> None:
        super().check(config)
        if config.transport == "flower":
            raise EdgefedError(
                f"{self.name} trains its body over edgefed's Split service, which Flower does not carry"
            )

    @property
    def trains_in_turns(self) -> bool:
        return self.settings.split_strategy == "sequential"  # one body, so clients take turns on it

    def is_trainable(self, name: str, spec: AdapterSpec) -> bool:
        return ".encoder." not in f".{name}"  # the body trains on the server, over the Split stream

    def prepare_global(self, model: nn.Module, spec: AdapterSpec) -> tuple[nn.Module, SetupState]:
        return super().adapt(model, spec, {}), {}

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        """A client's model: the ends only, with the body to be attached (a RemoteBody)."""
        return BertMaskedLMClient(super().adapt(model, spec, setup), UnattachedBody())
