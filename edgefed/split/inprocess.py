"""Both sides of the Split stream in one process (simulated clients): the servicer is called directly,
every message serialised and parsed as gRPC would carry it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

import grpc

from edgefed.wire.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from edgefed.split.servicer import SplitBodyServicer


class InProcessAbort(Exception):
    """A servicer here refused a message (what `context.abort` raises under gRPC)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status, self.text = code, details


class InProcessRpcError(grpc.RpcError):
    """A refusal as a RemoteBody sees one from a real channel."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InProcessContext:
    def __init__(self, metadata: Sequence[tuple[str, str]], peer: str) -> None:
        self.metadata = tuple(metadata)
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return self._peer

    def cancel(self) -> None:
        """An in-process stream moves only when its own client's thread drives it: an idle one holds
        no worker thread, so the servicer's idle limit has nothing to free."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise InProcessAbort(code, details)


class InProcessSplitStub:
    """A Split stub for a servicer in this process (simulated clients): every message is serialised and
    parsed as gRPC would carry it, so the servicer checks and counts exactly what a remote client sends."""

    def __init__(self, servicer: SplitBodyServicer) -> None:
        self.servicer = servicer

    def Exchange(
        self, request_iterator: Iterator[pb.SplitMessage], metadata: Sequence[tuple[str, str]] = ()
    ) -> Iterator[pb.SplitMessage]:
        requests = (pb.SplitMessage.FromString(m.SerializeToString()) for m in request_iterator)
        try:
            context = InProcessContext(metadata, peer=f"in-process:{id(self):x}")  # a stub per client
            for reply in self.servicer.Exchange(requests, context):
                yield pb.SplitMessage.FromString(reply.SerializeToString())
        except InProcessAbort as refused:
            raise InProcessRpcError(refused.status, refused.text) from None
