"""A client runtime's setup files (ONNX Runtime training artifacts, edgefed/ort) made for a gRPC
server in a child process. Making them holds the GIL for seconds at a time (the ONNX export): in the
server's own process that stalled every call, heartbeats included (2.6 s measured with
benchmarks/load.py), so it runs apart, at a lower priority, and the server's thread only waits."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch

from edgefed.client import client_worker
from edgefed.config import RunConfig
from edgefed.errors import EdgefedError
from edgefed.models import load_tokenizer, resolve_model_path
from edgefed.runtimes import RUNTIMES
from edgefed.types import State

NICENESS = 10  # the child yields the CPU to the server's calls


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
