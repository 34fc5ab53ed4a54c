"""Aggregators, one module each, registered by name in `AGGREGATORS`."""

from edgefed.aggregators.base import AGGREGATORS, Aggregator, client_weights
from edgefed.registry import import_submodules
from edgefed.types import ClientUpdate, State

import_submodules(__name__, __path__)

__all__ = ["AGGREGATORS", "Aggregator", "ClientUpdate", "State", "client_weights"]
