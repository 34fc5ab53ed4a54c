"""The `Transport` interface: how the server reaches its clients (in-process now, gRPC later)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from edgefed.aggregators.base import ClientUpdate, State


@dataclass
class FitResult:
    update: ClientUpdate
    bytes_down: int  # what the client received this round (the global state; the setup once)
    bytes_up: int  # what it sent back (its delta)


class Transport(ABC):
    @abstractmethod
    def fit(self, client_id: int, round_number: int, global_state: State) -> FitResult:
        """Send the global state to one client, let it train, and return its update."""


def payload_bytes(state: State) -> int:
    """Bytes of a state's tensor data, uncompressed (the `none` codec), without framing."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())
