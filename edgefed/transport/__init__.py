"""Transports: how the server's round reaches its clients."""

from edgefed.transport.base import FitResult, Transport, payload_bytes
from edgefed.transport.inproc import InProcessTransport

__all__ = ["FitResult", "InProcessTransport", "Transport", "payload_bytes"]
