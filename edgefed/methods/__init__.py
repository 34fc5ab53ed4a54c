"""Fine-tuning methods, one module each, registered by name in `METHODS`; their settings in
`edgefed.methods.settings`, which imports without the methods (and torch) until a name below is read."""

from typing import TYPE_CHECKING

from edgefed.registry import lazy_package

if TYPE_CHECKING:
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
__getattr__ = lazy_package(__name__, __path__, "base", __all__)
