"""What `edgefed client` (edgefed/transport/grpc_client.py) and the runtime that trains on the device ask
of each other. The client owns the connection (joins, heartbeats, retries, fetches, pushes); a runtime
builds the model and trains it: torch (edgefed/transport/torch_device.py) or ONNX Runtime without torch
(edgefed/ort/device.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edgefed.wire.channels import ClientTls
from edgefed.wire.framing import Received
from edgefed.wire.sending import EncodedUpdate
from edgefed.wire.v1 import federation_pb2 as pb


class DeviceLink(Protocol):
    """The client as its runtime sees it: its settings, and the calls a runtime makes while it builds."""

    server: str
    data: str
    client_id: str
    model: str | None
    tls: ClientTls | None
    metadata: tuple[tuple[str, str], ...]
    run_id: str
    echo: Callable[[str], None]

    def fetch(self, method: str, max_bytes: int = ...) -> Received:
        """The payload of a one-off stream of the run (`FetchSetup`, `FetchRuntime`), reassembled; one
        larger than `max_bytes` (default: the wire's limit for a state) is refused."""
        ...

    def declare(self, num_examples: int) -> None:
        """Tell the server the client's training examples (its weight), once, before the first round."""
        ...


class DeviceRuntime(Protocol):
    chunk_bytes: int  # the run's chunk size, for the pushes

    def build(self, joined: pb.JoinReply) -> None:
        """Read the client's data and build what trains it, for the run `joined` describes."""
        ...

    def fit(self, round_number: int, payload: Received) -> EncodedUpdate:
        """Check and read the round's global state (`payload`), train, and return the encoded update."""
        ...
