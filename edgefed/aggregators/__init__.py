"""Aggregators, one module each, registered by name in `AGGREGATORS`; their settings in
`edgefed.aggregators.settings`, which imports without them (and torch) until a name below is read."""

from typing import TYPE_CHECKING

from edgefed.registry import lazy_package

if TYPE_CHECKING:
    from edgefed.aggregators.base import AGGREGATORS, Aggregator, ClientUpdate, State, client_weights

__all__ = ["AGGREGATORS", "Aggregator", "ClientUpdate", "State", "client_weights"]
__getattr__ = lazy_package(__name__, __path__, "base", __all__)
