"""Limits on a server's streaming calls, so that one client cannot hold the server's worker threads.

A gRPC server answers each call on a worker thread, and a stream holds its thread for as long as
it is open: a client that opens streams and sends nothing (or a device whose link died mid-push)
would otherwise keep threads until none is left for anyone's heartbeat. `StreamGuard` admits at
most `per_caller` streams per caller at a time (refusing the next with RESOURCE_EXHAUSTED at once)
and cancels any stream that has moved no message for `idle_s` seconds, which frees its thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

# A client needs one stream at a time; the second leaves room for a retry while the first one's
# end (a dead link) is still on its way to the server.
STREAMS_PER_CALLER = 2
STREAM_IDLE_S = 30.0

T = TypeVar("T")


@dataclass
class Stream:
    caller: str
    method: str
    context: Any  # the call's grpc.ServicerContext
    last: float = field(default_factory=time.monotonic)  # when it last moved a message
    timed_out: bool = False

    def touch(self) -> None:
        self.last = time.monotonic()

    def follow(self, messages: Iterable[T]) -> Iterator[T]:
        """`messages` (a request or a response stream), each one counting as activity."""
        for message in messages:
            self.touch()
            yield message
            self.touch()


class StreamGuard:
    def __init__(
        self,
        per_caller: int = STREAMS_PER_CALLER,
        idle_s: float = STREAM_IDLE_S,
        log: Callable[[str], None] = print,
    ) -> None:
        self.per_caller = per_caller
        self.idle_s = idle_s
        self.log = log
        self._open: dict[int, Stream] = {}
        self._held: dict[str, int] = {}  # caller -> open streams
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="edgefed-stream-watch", daemon=True).start()

    @contextmanager
    def admit(self, caller: str, method: str, context) -> Iterator[Stream]:
        """Hold one of `caller`'s streams for the block, or abort the call when it holds all of them."""
        with self._lock:
            held = self._held.get(caller, 0)
            if held < self.per_caller:
                key, stream = next(self._ids), Stream(caller, method, context)
                self._open[key] = stream
                self._held[caller] = held + 1
        if held >= self.per_caller:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller} has {held} streams open, the most a client may; finish or cancel one first",
            )
        try:
            yield stream
        finally:
            with self._lock:
                del self._open[key]
                self._held[caller] -= 1
                if not self._held[caller]:
                    del self._held[caller]

    def open_streams(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.idle_s / 4)):
            horizon = time.monotonic() - self.idle_s
            with self._lock:
                stale = [s for s in self._open.values() if s.last < horizon and not s.timed_out]
            for stream in stale:
                stream.timed_out = True
                self.log(
                    f"edgefed: cancelled {stream.method} of {stream.caller}: no message for {self.idle_s:g} s"
                )
                stream.context.cancel()
