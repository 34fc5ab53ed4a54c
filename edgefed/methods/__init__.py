"""Fine-tuning methods, one module each, registered by name in `METHODS`."""

from edgefed.methods.base import (
    METHODS,
    AdapterSpec,
    LowRankPair,
    Method,
    SetupState,
    count_trainable,
    load_trainable_state,
    trainable_state,
)
from edgefed.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "METHODS",
    "AdapterSpec",
    "LowRankPair",
    "Method",
    "SetupState",
    "count_trainable",
    "load_trainable_state",
    "trainable_state",
]
