"""Bearer tokens: one per client, listed in a token file, sent as `authorization: Bearer <token>`.

The token file has one `client-id token` pair per line (`#` starts a comment). A client's line
number is its slot: which shard it trains in a simulation, and where it returns after a restart.

A server without a token file (on loopback only) gives each client a session token at its first
Join (`SessionTokens`), so that its later calls, over any connection, are known to be its own: the
per-client limits hold across connections, and nobody else can speak, or rejoin, as that client.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import grpc

from edgefed.errors import EdgefedError

HEADER = "authorization"
# Where `edgefed client` finds its token when --token is not given (kept off the command line).
TOKEN_ENV = "EDGEFED_TOKEN"


class TokenOwners:
    """Who holds which token, looked up by the token's sha256: one dict probe per call however many
    clients, and what is compared is a digest, which says nothing about how close a guessed token came."""

    _owners: dict[bytes, str]  # sha256 of a token -> its client

    def client_of(self, token: str) -> str | None:
        """The client a token belongs to, or None."""
        return self._owners.get(token_key(token))

    def caller(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """The client whose token a call carries, or None."""
        token = bearer_token(metadata)
        return None if token is None else self.client_of(token)


class TokenBook(TokenOwners):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.clients = [client for client, _ in pairs]
        self.slots = {client: slot for slot, client in enumerate(self.clients)}
        self._tokens = dict(pairs)
        if len(self._tokens) != len(pairs):
            raise EdgefedError("token file: a client id appears twice")
        self._owners = {token_key(token): client for client, token in pairs}
        if len(self._owners) != len(pairs):
            raise EdgefedError("token file: two clients share a token")

    @classmethod
    def read(cls, path: str | Path) -> TokenBook:
        pairs = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            shared = Path(path).stat().st_mode & 0o077
        except (OSError, UnicodeDecodeError) as error:
            raise EdgefedError(f"{path}: cannot read the token file ({error})") from None
        for number, line in enumerate(lines, start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or len(fields[1]) < 16:
                raise EdgefedError(
                    f"{path}:{number}: expected `client-id token` with a token of 16+ characters"
                )
            pairs.append((fields[0], fields[1]))
        if not pairs:
            raise EdgefedError(f"{path}: the token file lists no clients")
        if shared:
            print(f"edgefed: warning: {path} is readable by other users; chmod 600 it", file=sys.stderr)
        return cls(pairs)

    @classmethod
    def generate(cls, clients: Sequence[str]) -> TokenBook:
        return cls([(client, secrets.token_urlsafe(24)) for client in clients])

    def write(self, path: Path) -> None:
        path.write_text("".join(f"{c} {self._tokens[c]}\n" for c in self.clients), encoding="utf-8")
        path.chmod(0o600)

    def token_for(self, client: str) -> str:
        return self._tokens[client]


class SessionTokens(TokenOwners):
    """Tokens a server without a token file issues, one per client at its first Join. Only their
    sha256 is kept (`digests`, which a checkpoint holds, so clients carry on after a restart)."""

    def __init__(self, digests: Mapping[str, str] | None = None) -> None:
        """`digests`: client id -> its token's sha256 in hex (a resumed run's)."""
        self._owners = {bytes.fromhex(digest): client for client, digest in (digests or {}).items()}
        self._clients = set(self._owners.values())
        self._lock = threading.Lock()

    def issue(self, client: str) -> str:
        """A new client's token (the caller makes sure it has none)."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._owners[token_key(token)] = client
            self._clients.add(client)
        return token

    def has(self, client: str) -> bool:
        return client in self._clients

    def digests(self) -> dict[str, str]:
        with self._lock:
            return {client: key.hex() for key, client in self._owners.items()}


def token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ")
    return None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((HEADER, f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses, before any handler runs, every call of every service without a known token, but for
    the `open` methods (a session server's Join, which hands out the tokens)."""

    def __init__(self, tokens: TokenOwners, open_methods: Collection[str] = ()) -> None:
        self.tokens, self.open_methods = tokens, frozenset(open_methods)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = handler_call_details.invocation_metadata
        if handler_call_details.method in self.open_methods or self.tokens.caller(metadata) is not None:
            return handler
        message = "missing bearer token" if bearer_token(metadata) is None else "unknown bearer token"
        return _refusing(handler, message)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call without reading its request: served as a stream (whatever the
    method), the request is never received, so a caller without a token costs the server no memory
    for what it sends."""

    def refuse(requests, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def refuse_stream(requests, context):
        refuse(requests, context)
        yield from ()

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
