"""The one place that builds gRPC servers and channels: message limits, TLS, keepalive, worker threads."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from edgefed.errors import EdgefedError

# Both ends ping an idle connection every KEEPALIVE_S and close it when a ping goes unanswered for
# KEEPALIVE_TIMEOUT_S: a device whose link died is noticed, and the calls it held end.
KEEPALIVE_S = 20
KEEPALIVE_TIMEOUT_S = 10
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
# Room above the chunk size for a chunk's other fields; anything larger is refused by gRPC itself.
MESSAGE_HEADROOM = 64 << 10
# What a server lets a stream send before it has read any of it: a fixed HTTP/2 window instead of the one
# gRPC's bandwidth-delay probing grows (to many MB per stream on a fast link), so that a caller refused
# for its token leaves the server holding at most this per stream. One chunk's worth: per-stream
# throughput is at most this per round trip (1 MiB over a 50 ms WAN: 20 MB/s).
SERVER_STREAM_WINDOW = 1 << 20


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes of the server's TLS identity; `client_ca` asks every client for a certificate it signed
    (mutual TLS)."""

    key: bytes
    certificate: bytes
    client_ca: bytes | None = None


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes: the certificates a client trusts, and its own identity for servers that ask (mutual TLS)."""

    ca: bytes
    key: bytes | None = None
    certificate: bytes | None = None


def is_loopback(address: str) -> bool:
    return address.rsplit(":", 1)[0] in LOOPBACK_HOSTS


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # The other end pings every KEEPALIVE_S: accept that, however idle the connection.
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    ]


def open_channel(address: str, tls: ClientTls | None, max_message_bytes: int) -> grpc.Channel:
    """A channel to `address`, over TLS when `tls` is given."""
    options = message_options(max_message_bytes)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.certificate
    )
    return grpc.secure_channel(address, credentials, options=options)


def check_address(address: str) -> None:
    """HOST:PORT, with a port from 0 to 65535 (0: any free port); one clear line otherwise (gRPC would
    listen on :443 for a bare host and wrap a port over 65535)."""
    host, _, port = address.rpartition(":")
    # A host of printable ASCII (gRPC cannot encode a non-UTF-8 name); a port of at most 5 ASCII digits
    # (`isdigit` alone takes '²', and int() refuses 5,000 digits).
    if (
        not re.fullmatch(r"[!-~]+", host)
        or not re.fullmatch(r"[0-9]{1,5}", port)
        or not 0 <= int(port) <= 65535
    ):
        raise EdgefedError(
            f"address '{address}': expected HOST:PORT with a port from 0 to 65535 (0: any free port), "
            "e.g. 0.0.0.0:50051"
        )


def start_server(
    services: Sequence[Callable[[grpc.Server], None]],
    address: str,
    *,
    max_message_bytes: int,
    workers: int,
    max_concurrent_rpcs: int | None,
    tls: ServerTls | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    thread_prefix: str = "edgefed-rpc",
) -> tuple[grpc.Server, int]:
    """Serve `services` (each adds its servicer to the server) on `address` (port 0: any free port),
    over TLS when `tls` is given; returns the started server and its port."""
    check_address(address)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
        interceptors=list(interceptors),
        options=[
            *message_options(max_message_bytes),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", SERVER_STREAM_WINDOW),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    for add in services:
        add(server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key, tls.certificate)],
                root_certificates=tls.client_ca,
                require_client_auth=tls.client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise EdgefedError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    return server, port
