"""A client runtime's setup files (ONNX Runtime training artifacts, edgefed/ort), made once for a
gRPC server's devices, in a child process. Making them holds the GIL for seconds at a time (the ONNX
export): in the server's own process that stalled every call, heartbeats included (2.6 s measured
with benchmarks/load.py), so it runs apart, at a lower priority, and the server's thread only waits."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from edgefed.client import client_worker
from edgefed.config import RunConfig
from edgefed.errors import EdgefedError
from edgefed.models import load_tokenizer, resolve_model_path
from edgefed.runtimes import RUNTIMES
from edgefed.transport.clients import Code, Refusal
from edgefed.types import State

NICENESS = 10  # the child yields the CPU to the server's calls
# Devices downloading the files at once; the others are told to come back. With 1,000 clients
# heartbeating on 2 cores, 20 downloads of 92 MB held heartbeats 0.5 s at p99 four at a time, 33 ms two
# at a time, no later (benchmarks/load.py): on loopback a download is as fast as the CPU.
DOWNLOADS = 2


@dataclass(frozen=True)
class FilesRecipe:
    """What the child builds a client's worker from, as a client builds it (picklable)."""

    config: RunConfig
    num_labels: int
    head_modules: tuple[str, ...]
    setup: State
    runtime: str
    folder: Path


def make_files(recipe: FilesRecipe) -> bytes:
    """The runtime's files as one payload, made in a child process (spawned: the server's threads
    and torch's thread pools must not be forked)."""
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(made, recipe).result()
    except BrokenProcessPool:
        raise EdgefedError(f"the process making the {recipe.runtime} runtime's files died") from None


def made(recipe: FilesRecipe) -> bytes:
    """In the child: build the worker a client would, and the runtime's files from it."""
    os.nice(NICENESS)
    config = recipe.config
    worker = client_worker(config, recipe.num_labels, recipe.head_modules, recipe.setup, torch.device("cpu"))
    build = worker.runtime_build(load_tokenizer(resolve_model_path(config.model)), recipe.folder)
    return RUNTIMES.create(recipe.runtime).setup_files(build)


class RuntimeFiles:
    """One runtime's setup files, made once, when the first device asks, by a thread of their own (which
    waits for the child process making them: edgefed/transport/runtime_files.py). Until they are ready
    every asking device is told to come back (UNAVAILABLE, which a client retries with backoff), so no
    number of FetchRuntime calls holds the server's workers while they are made; then DOWNLOADS devices
    at a time download them."""

    def __init__(self, runtime: str, make: Callable[[], bytes], log: Callable[[str], None]) -> None:
        self.runtime, self._make, self._log = runtime, make, log
        self._lock = threading.Lock()
        self._payload: bytes | None = None
        self._refusal: Refusal | None = None
        self._making = False
        self._downloads = threading.BoundedSemaphore(DOWNLOADS)

    def payload(self) -> bytes:
        """The files, or a Refusal: UNAVAILABLE while they are being made, else why they cannot be."""
        with self._lock:
            if self._payload is not None:
                return self._payload
            if self._refusal is not None:  # a fresh exception per call: each gets its own traceback
                raise Refusal(self._refusal.code, self._refusal.message)
            if not self._making:
                self._making = True
                self._log(f"edgefed: making the {self.runtime} runtime's files for its devices")
                threading.Thread(target=self._made, name=f"{self.runtime}-files", daemon=True).start()
        raise Refusal(Code.UNAVAILABLE, f"the {self.runtime} runtime's files are being made; ask again")

    @contextmanager
    def download(self) -> Iterator[bytes]:
        """The files for one device to download, within DOWNLOADS at once (else UNAVAILABLE)."""
        payload = self.payload()
        if not self._downloads.acquire(blocking=False):
            raise Refusal(
                Code.UNAVAILABLE,
                f"{DOWNLOADS} devices are downloading the {self.runtime} runtime's files; ask again",
            )
        try:
            yield payload
        finally:
            self._downloads.release()

    def _made(self) -> None:
        try:
            payload, refusal = self._make(), None
        except EdgefedError as error:
            payload, refusal = None, Refusal(Code.FAILED_PRECONDITION, f"runtime {self.runtime}: {error}")
        except Exception as error:  # a thread's error is otherwise lost, and its devices would ask forever
            payload = None
            refusal = Refusal(Code.INTERNAL, f"runtime {self.runtime}: its files were not made ({error!r})")
        if refusal is not None:
            self._log(f"edgefed: {refusal.message}")
        with self._lock:
            self._payload, self._refusal, self._making = payload, refusal, False
