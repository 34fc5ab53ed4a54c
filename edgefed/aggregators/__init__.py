"""Aggregators, one module each, registered by name in `AGGREGATORS`."""

from edgefed.aggregators.base import AGGREGATORS, Aggregator, ClientUpdate, State, client_weights
from edgefed.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["AGGREGATORS", "Aggregator", "ClientUpdate", "State", "client_weights"]
