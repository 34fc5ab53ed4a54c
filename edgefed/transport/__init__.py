"""Transports: how the server's round reaches its clients (in this process, or over gRPC)."""

from edgefed.transport.base import RoundResult, Transport, state_payload
from edgefed.transport.inproc import InProcessTransport

__all__ = ["InProcessTransport", "RoundResult", "Transport", "state_payload"]
