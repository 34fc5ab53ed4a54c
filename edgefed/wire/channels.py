"""The one place that builds gRPC servers and channels: message limits, TLS, worker threads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from edgefed.errors import EdgefedError


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def open_channel(address: str, tls_ca: bytes | None, max_message_bytes: int) -> grpc.Channel:
    """A channel to `address`, over TLS when `tls_ca` (PEM certificates to trust) is given."""
    options = message_options(max_message_bytes)
    if tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options
    )


def start_server(
    services: Sequence[Callable[[grpc.Server], None]],
    address: str,
    *,
    max_message_bytes: int,
    workers: int,
    max_concurrent_rpcs: int,
    tls: tuple[bytes, bytes] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    thread_prefix: str = "edgefed-rpc",
) -> tuple[grpc.Server, int]:
    """Serve `services` (each adds its servicer to the server) on `address` (port 0: any free port),
    over TLS when `tls` (private key, certificate chain) is given; returns the started server and its port."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
        interceptors=list(interceptors),
        options=message_options(max_message_bytes),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    for add in services:
        add(server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    except RuntimeError:
        port = 0
    if port == 0:
        raise EdgefedError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    return server, port
